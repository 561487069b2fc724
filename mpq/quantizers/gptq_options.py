"""The ``gptq`` quantizer's options (recipe ``options:``), parsed and validated once; see
mpq.quantizers.gptq for what each one does."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError, did_you_mean


def _number(name: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (int or float; bools rejected), else SchemeError."""
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        what = "an integer" if kind is int else "a number"
        raise SchemeError(f"gptq option {name} must be {what}, got {value!r}",
                          hint=f"e.g. {name}: {GPTQOptions.defaults()[name]}")
    if kind is float and not math.isfinite(value):
        raise SchemeError(f"gptq option {name} must be finite, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class GPTQOptions:
    """Parsed and validated ``scheme.options`` of a gptq layer."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    max_damp: float = 1.0
    clip_search: bool = False
    error_feedback: bool = False
    feedback_alpha: float = 0.25

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def from_scheme(cls, scheme: LayerScheme) -> "GPTQOptions":
        known = cls.defaults()
        values: dict[str, Any] = {}
        for name, value in scheme.options:
            if name not in known:
                raise SchemeError(f"unknown gptq option '{name}'",
                                  hint=did_you_mean(name, known) or f"known: {', '.join(known)}")
            if isinstance(known[name], bool):
                if not isinstance(value, bool):
                    raise SchemeError(f"gptq option {name} must be true or false, got {value!r}")
                values[name] = value
            else:
                values[name] = _number(name, value, type(known[name]))
        opts = cls(**values)
        if opts.damp < 0:
            raise SchemeError(f"gptq damp must be ≥ 0, got {opts.damp}", hint="e.g. damp: 0.01")
        if opts.max_damp < opts.damp or opts.max_damp <= 0:
            raise SchemeError(f"gptq max_damp ({opts.max_damp}) must be > 0 and ≥ damp "
                              f"({opts.damp})", hint="raise max_damp or lower damp")
        if opts.feedback_alpha < 0:
            raise SchemeError(f"gptq feedback_alpha must be ≥ 0, got {opts.feedback_alpha}",
                              hint="e.g. feedback_alpha: 0.25")
        if "feedback_alpha" in values and not opts.error_feedback:
            raise SchemeError("gptq feedback_alpha only applies with error_feedback: true",
                              hint="add error_feedback: true or remove feedback_alpha")
        if opts.block_size < 1:
            raise SchemeError(f"gptq block_size must be ≥ 1, got {opts.block_size}",
                              hint="e.g. block_size: 128")
        return opts

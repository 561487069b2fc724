"""The ``autoround`` quantizer's options (recipe ``options:``), parsed and validated once; see
mpq.quantizers.autoround for what each one does.

``effort`` picks a setting (iterations, samples per step, learning rate); explicit options
override its values.  The published method's recipes (intel/auto-round) are ``light`` = 50
iterations at lr 5e-3, ``default`` = 200 at lr 1/iters, ``best`` = 1000 at lr 1/iters (2/iters at
3 bits and below), each with 8 samples of 2048 tokens per step.  mpq's take fewer samples per
step, and its ``light`` fewer iterations with a larger step (30 at lr 1e-2: about the published
light's total step, lr·iters/2), so that a CPU run of a small model stays affordable (README,
"Algorithms", autoround).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError, did_you_mean

EFFORTS: dict[str, dict[str, Any]] = {
    "light": {"iters": 30, "batch_size": 1, "lr": 1e-2},
    "default": {"iters": 200, "batch_size": 4},
    "best": {"iters": 1000, "batch_size": 8},
}
DEFAULT_EFFORT = "default"


@dataclass(frozen=True)
class AutoRoundOptions:
    """Parsed ``scheme.options`` of an autoround layer, with the effort's values filled in.

    ``lr``/``minmax_lr`` None in the recipe mean 1/iters (2/iters for ``best`` at ≤ 3 bits) and
    ``lr``; here they are resolved.
    """

    effort: str = DEFAULT_EFFORT
    iters: int = 200
    batch_size: int = 4
    lr: float = 0.005
    minmax_lr: float = 0.005
    clip: bool = True
    error_feedback: bool = True
    seed: int = 0

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_scheme(cls, scheme: LayerScheme) -> "AutoRoundOptions":
        given = dict(scheme.options)
        known = cls.keys()
        for name in given:
            if name not in known:
                raise SchemeError(f"unknown autoround option '{name}'",
                                  hint=did_you_mean(name, known) or f"known: {', '.join(known)}")
        effort = given.get("effort", DEFAULT_EFFORT)
        if effort not in EFFORTS:
            raise SchemeError(f"autoround effort must be one of {', '.join(EFFORTS)}, "
                              f"got {effort!r}", hint="e.g. effort: light")
        values = {**EFFORTS[effort], **{k: v for k, v in given.items() if k != "effort"}}
        iters = _integer("iters", values.get("iters", 200), minimum=0)
        batch = _integer("batch_size", values.get("batch_size", 4), minimum=1)
        seed = _integer("seed", values.get("seed", 0), minimum=0)
        clip = _flag("clip", values.get("clip", True))
        feedback = _flag("error_feedback", values.get("error_feedback", True))
        lr = values.get("lr")
        if lr is None:
            low_bits = scheme.weights.bits <= 3 and effort == "best"
            lr = (2.0 if low_bits else 1.0) / max(iters, 1)
        lr = _positive("lr", lr)
        minmax_lr = _positive("minmax_lr", values.get("minmax_lr", lr))
        return cls(effort=effort, iters=iters, batch_size=batch, lr=lr, minmax_lr=minmax_lr,
                   clip=clip, error_feedback=feedback, seed=seed)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SchemeError(f"autoround option {name} must be an integer ≥ {minimum}, "
                          f"got {value!r}", hint=f"e.g. {name}: {EFFORTS['light'].get(name, 0)}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SchemeError(f"autoround option {name} must be true or false, got {value!r}",
                          hint=f"e.g. {name}: true")
    return value


def _positive(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise SchemeError(f"autoround option {name} must be a positive number, got {value!r}",
                          hint=f"e.g. {name}: 0.005")
    return float(value)

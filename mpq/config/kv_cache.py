"""The recipe's ``kv_cache:`` settings: how the attention KV cache is quantized.

- ``fp8_e4m3``: symmetric static scales per ``tensor`` or per kv ``head`` (calibrated abs-max).
- ``int8`` / ``int4``: asymmetric (scale and zero point) per kv ``head`` or per ``group`` of
  ``group_size`` consecutive channels within a head; ``dynamic: false`` calibrates one range per
  head (or head × group), ``dynamic: true`` takes one per token × head (or × group) at run time
  and needs no calibration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mpq.errors import SchemeError

FP8_FORMATS = ("fp8_e4m3",)
INT_FORMATS = {"int8": 8, "int4": 4}
KV_FORMATS = FP8_FORMATS + tuple(INT_FORMATS)
KV_GRANULARITIES = {"fp8_e4m3": ("tensor", "head"), "int8": ("head", "group"),
                    "int4": ("head", "group")}
DEFAULT_GRANULARITY = {"fp8_e4m3": "tensor", "int8": "head", "int4": "head"}


@dataclass(frozen=True)
class KVCacheArgs:
    """How the KV cache is quantized (see the module docstring).  ``granularity`` defaults to
    ``tensor`` for fp8 and ``head`` for int; ``group_size`` only with ``granularity: group``;
    ``dynamic`` only for int formats."""

    format: str = "fp8_e4m3"
    granularity: str | None = None
    group_size: int | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.format not in KV_FORMATS:
            raise SchemeError(f"unknown kv_cache format '{self.format}'",
                              hint=f"use one of {', '.join(KV_FORMATS)}")
        if self.granularity is None:
            object.__setattr__(self, "granularity", DEFAULT_GRANULARITY[self.format])
        allowed = KV_GRANULARITIES[self.format]
        if self.granularity not in allowed:
            other = [f for f, g in KV_GRANULARITIES.items() if self.granularity in g]
            extra = f"; it is for {', '.join(other)}" if other else ""
            raise SchemeError(f"granularity '{self.granularity}' does not apply to "
                              f"{self.format}{extra}", hint=f"use one of {', '.join(allowed)}")
        if self.format in FP8_FORMATS and self.dynamic:
            raise SchemeError(f"{self.format} KV scales are static (calibrated); dynamic is for "
                              "int8/int4", hint="remove dynamic: or use format: int8")
        if self.granularity == "group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) \
                    or self.group_size < 1:
                raise SchemeError(f"granularity group needs a positive group_size, got "
                                  f"{self.group_size!r}",
                                  hint="e.g. group_size: 32 (it must divide head_dim)")
        elif self.group_size is not None:
            raise SchemeError(f"group_size only applies to granularity group, not "
                              f"{self.granularity}",
                              hint="remove group_size: or set granularity: group")

    @property
    def is_int(self) -> bool:
        return self.format in INT_FORMATS

    @property
    def bits(self) -> int:
        return INT_FORMATS.get(self.format, 8)

    @property
    def calibrated(self) -> bool:
        """Whether the scheme needs calibration data (static scales)."""
        return not self.dynamic

    def group_of(self, head_dim: int) -> int:
        """Channels per range: group_size, or the whole head."""
        return self.group_size if self.granularity == "group" else head_dim

    def check_head_dim(self, head_dim: int) -> None:
        """SchemeError when group_size does not divide ``head_dim``."""
        if self.granularity == "group" and head_dim % self.group_size:
            raise SchemeError(f"group_size {self.group_size} does not divide the "
                              f"model's head_dim {head_dim}",
                              hint="pick a divisor of head_dim, e.g. "
                                   f"{next(g for g in (32, 16, 8, 4, 2, 1) if head_dim % g == 0)}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "granularity": self.granularity}
        if self.is_int:
            if self.granularity == "group":
                out["group_size"] = self.group_size
            out["dynamic"] = self.dynamic
        return out

    def describe(self) -> str:
        if not self.is_int:
            return f"kv cache: {self.format} static per {self.granularity}"
        where = (f"group of {self.group_size} channels" if self.granularity == "group"
                 else "head")
        when = "dynamic (per token, nothing calibrated)" if self.dynamic else "static (calibrated)"
        return f"kv cache: {self.format} asymmetric per {where}, {when}"

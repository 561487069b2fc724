"""The recipe's ``kv_cache:`` settings: how the attention KV cache is quantized."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mpq.errors import SchemeError

KV_FORMATS = ("fp8_e4m3",)
KV_GRANULARITIES = ("tensor", "head")


@dataclass(frozen=True)
class KVCacheArgs:
    """How the KV cache is quantized: ``format`` fp8_e4m3, static scales per ``granularity``."""

    format: str = "fp8_e4m3"
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        if self.format not in KV_FORMATS:
            raise SchemeError(f"unknown kv_cache format '{self.format}'",
                              hint=f"use one of {', '.join(KV_FORMATS)}")
        if self.granularity not in KV_GRANULARITIES:
            raise SchemeError(f"unknown kv_cache granularity '{self.granularity}'",
                              hint=f"use one of {', '.join(KV_GRANULARITIES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"kv cache: {self.format} static per {self.granularity}"

"""The recipe's ``experts:`` settings: how fused mixture-of-experts experts are calibrated
(mpq.engine.expert_steps)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mpq.errors import SchemeError

# Fewer routed calibration tokens than this and an expert slice whose algorithm needs
# statistics is quantized with RTN instead (a Hessian from fewer tokens than 32 says little
# about an expert's inputs).
DEFAULT_MIN_TOKENS = 32


@dataclass(frozen=True)
class ExpertArgs:
    """``min_tokens``: an expert slice routed fewer calibration tokens than this is quantized
    with RTN on its scheme's grid instead of its planned algorithm (one routed no token at all
    always is: it has no statistics)."""

    min_tokens: int = DEFAULT_MIN_TOKENS

    def __post_init__(self) -> None:
        value = self.min_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SchemeError(f"experts min_tokens must be an integer ≥ 0, got {value!r}",
                              hint=f"e.g. min_tokens: {DEFAULT_MIN_TOKENS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

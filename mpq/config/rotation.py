"""The recipe's ``rotation:`` settings (kept apart from mpq.rotation.quarot, which needs the
model-walking modules that the recipe parser must not import)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mpq.errors import SchemeError

R1_KINDS = ("hadamard", "random")


@dataclass(frozen=True)
class QuaRotArgs:
    """Recipe ``rotation: {type: quarot, r1: hadamard|random, r2: true, r4: true, seed: 0}``."""

    type: str = "quarot"
    r1: str = "hadamard"
    r2: bool = True
    r4: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.type != "quarot":
            raise SchemeError(f"unknown rotation type '{self.type}'", hint="use type: quarot")
        if self.r1 not in R1_KINDS:
            raise SchemeError(f"rotation r1 must be one of {', '.join(R1_KINDS)}, got {self.r1!r}")
        for key in ("r2", "r4"):
            if not isinstance(getattr(self, key), bool):
                raise SchemeError(f"rotation {key} must be true or false")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SchemeError(f"rotation seed must be an integer ≥ 0, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

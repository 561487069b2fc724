"""The per-layer scheme: which algorithm produces a layer's weight, with which per-tensor args
(mpq.numerics.args) for its weight and, optionally, its input activations.  Validated on
construction (SchemeError); the recipe parser re-raises with the YAML path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpq.numerics.args import ActivationArgs, WeightArgs
from mpq.numerics.format import NUMBER_FORMATS


@dataclass(frozen=True)
class LayerScheme:
    """What happens to one layer: the algorithm, the weight args and, optionally, how its input
    activations are quantized at inference.

    ``options`` holds algorithm-specific settings (e.g. GPTQ damping) as sorted key/value pairs,
    so the scheme stays hashable.
    """

    algorithm: str = "rtn"
    weights: WeightArgs = field(default_factory=WeightArgs)
    options: tuple[tuple[str, Any], ...] = ()
    input_activations: ActivationArgs | None = None

    def describe(self) -> str:
        """Weights label, plus the input activations when quantized, e.g.
        'int8 sym channel, inputs int8 dynamic token'."""
        label = self.weights.describe()
        if self.input_activations is not None:
            label += f", inputs {self.input_activations.describe()}"
        return label

    @property
    def stores_g_idx(self) -> bool:
        """Whether the stored weight carries a column → group map (GPTQ act-order on grouped
        weights)."""
        return (self.algorithm == "gptq" and bool(dict(self.options).get("act_order", False))
                and self.weights.granularity == "group")

    def stored_bytes(self, shape: tuple[int, int], container: str = "mpq",
                     dtype_bytes: int = 4) -> int:
        """Bytes of a layer's stored weight tensors (a bias is dense) in checkpoint format
        ``container``, as its number format counts them (scales in ``dtype_bytes`` bytes where
        that format stores them in the model's dtype)."""
        args = self.weights
        return NUMBER_FORMATS.get(args.format).stored_bytes(
            args, shape, container, dtype_bytes=dtype_bytes, act_order=self.stores_g_idx,
            quantized_inputs=self.input_activations is not None)

    def ideal_bits(self, shape: tuple[int, int]) -> float:
        """Bits per weight of the unpadded encoding (codes, scales, zero points, g_idx)."""
        args = self.weights
        return NUMBER_FORMATS.get(args.format).ideal_bits(args, shape,
                                                          act_order=self.stores_g_idx)

    def to_dict(self) -> dict[str, Any]:
        out = {"algorithm": self.algorithm, "weights": self.weights.to_dict(),
               "options": dict(self.options)}
        if self.input_activations is not None:
            out["input_activations"] = self.input_activations.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerScheme":
        acts = data.get("input_activations")
        return cls(algorithm=data["algorithm"], weights=WeightArgs(**data["weights"]),
                   options=tuple(sorted(data.get("options", {}).items())),
                   input_activations=ActivationArgs(**acts) if acts is not None else None)

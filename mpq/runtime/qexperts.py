"""Fused MoE experts whose expert slices stay quantized, decoded on the fly.

:class:`QuantExperts` replaces a transformers experts module (mpq.models.experts) in a loaded
model.  Each quantized projection is a ``ModuleList`` of :class:`QuantLinear`, one per expert,
so its tensors keep the artifact's names (``...experts.gate_up_proj.3.qweight``); a projection
the plan kept stays a dense 3-D parameter.  A forward decodes the quantized projections to dense
[E, out, in] tensors in the input's dtype and runs the original module's own forward (whichever
experts implementation its config selects) on them, so its results are those of the float model
with the dequantized values written into its parameters.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from mpq.models.experts import PROJECTIONS
from mpq.runtime.qlinear import QuantLinear


class QuantExperts(nn.Module):
    """``original``: the experts module built from config.json (its quantized projections'
    parameters are not used); ``quantized``: projection → one QuantLinear per expert."""

    def __init__(self, original: nn.Module, quantized: dict[str, list[QuantLinear]]):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not a submodule: no state of its own
        self.quantized_projections = tuple(p for p in PROJECTIONS if p in quantized)
        self.num_experts = original.num_experts
        for projection in PROJECTIONS:
            if projection in quantized:
                setattr(self, projection, nn.ModuleList(quantized[projection]))
            else:
                setattr(self, projection, getattr(original, projection))

    def dense(self, projection: str, dtype: torch.dtype) -> torch.Tensor:
        """Projection ``projection`` as a dense [E, out, in] tensor of ``dtype``."""
        value = getattr(self, projection)
        if projection in self.quantized_projections:
            return torch.stack([expert.dequantized_weight(dtype) for expert in value])
        return value.to(dtype)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stand_in = copy.copy(self._original)  # the original's attributes, dense weights
        stand_in._parameters = {p: self.dense(p, hidden_states.dtype) for p in PROJECTIONS}
        return type(self._original).forward(stand_in, hidden_states, *args, **kwargs)

    def extra_repr(self) -> str:
        first = getattr(self, self.quantized_projections[0])[0] if self.quantized_projections \
            else None
        weights = f", weights={first.args.describe()}" if first is not None else ""
        return (f"experts={self.num_experts}, quantized={list(self.quantized_projections)}"
                f"{weights}")

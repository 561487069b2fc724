"""A linear layer that keeps its weight quantized and dequantizes it on the fly.

It holds the native format's encoded tensors as buffers (packed codes, scales, zero points), so a
loaded model stays small; each forward decodes them to a dense [out, in] weight in the input's
dtype and applies ``F.linear``.  It replaces both ``nn.Linear`` and GPT-2's ``Conv1D`` (mpq stores
every weight as [out, in]).

With ``kernels=True``, a weight that one of torch's packed low-bit CPU kernels computes exactly
up to float rounding (mpq.runtime.kernels) is packed once at construction and each forward runs
that kernel instead of decoding; ``path`` names what the layer runs (``int4pack``, ``int8pack``
or ``decode``) and ``path_reason`` why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpq.numerics.activations import fake_quantize
from mpq.runtime import kernels as packed_kernels
from mpq.checkpoint.native_codec import decode
from mpq.numerics.args import ActivationArgs, WeightArgs


class QuantLinear(nn.Module):
    """``input_args`` (optional): the input activations are fake-quantized before the matmul
    (:func:`mpq.numerics.activations.fake_quantize`), with ``input_scale`` (fp32 [1]) when static."""

    def __init__(self, args: WeightArgs, shape: tuple[int, int],
                 encoded: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                 input_args: ActivationArgs | None = None,
                 input_scale: torch.Tensor | None = None, kernels: bool = False):
        super().__init__()
        self.args = args
        self.input_args = input_args
        self.input_scale = input_scale
        self.out_features, self.in_features = shape
        self._keys = tuple(sorted(encoded))
        for key in self._keys:
            self.register_buffer(key, encoded[key])
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._kernel = None
        self.path, self.path_reason = packed_kernels.DECODE, "kernels off"
        if kernels:
            self.path, self.path_reason = packed_kernels.select(
                args, shape, encoded.get("g_idx"), input_args)
            if self.path != packed_kernels.DECODE:
                self._kernel = packed_kernels.pack(encoded, args, shape, self.path)

    def quantized_weight(self):
        tensors = {key: getattr(self, key) for key in self._keys}
        return decode(tensors, self.args, (self.out_features, self.in_features))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_args is not None:
            x = fake_quantize(x, self.input_args, self.input_scale)
        if self._kernel is not None:
            out = packed_kernels.run(self._kernel, x)
            return out + self.bias.to(x.dtype) if self.bias is not None else out
        weight = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        acts = f", inputs={self.input_args.describe()}" if self.input_args is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weights={self.args.describe()}{acts}, bias={self.bias is not None}, "
                f"path={self.path}")


def quantize_inputs_hook(args: ActivationArgs, scale: torch.Tensor | None):
    """A forward pre-hook that fake-quantizes a module's first input (for dense linears)."""
    def hook(module, inputs):
        return (fake_quantize(inputs[0], args, scale), *inputs[1:])
    return hook


def layer_paths(model: nn.Module) -> dict[str, str]:
    """Module name → the path its quantized matmul takes (``int4pack``, ``int8pack`` or
    ``decode``) for every QuantLinear in ``model`` (MoE expert slices always decode)."""
    return {name: module.path for name, module in model.named_modules()
            if isinstance(module, QuantLinear)}

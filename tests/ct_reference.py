"""compressed-tensors (≥ 0.20) as the reference for mpq's mxfp4, mxfp8, nvfp4 and fp8 block grids.

Each ``ct_*`` function runs what llm-compressor's min-max weight observer and compressed-tensors do
for one weight [N, K]: per-group (or per-tile) min/max → ``calculate_qparams`` (NVFP4: with the
``generate_gparam`` global scale of the tensor's absmax, as the observer's ``get_global_scale``) →
``fake_quantize``.  They return (fake-quantized weight, scale as compressed-tensors holds it before
compression, global scale or None).  ``ct_compress`` runs the format's compressor on that state:
the tensors a compressed-tensors checkpoint stores.

Importing this module skips the importing test module when compressed-tensors ≥ 0.20 is missing.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("compressed_tensors", minversion="0.20")

from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.naive_quantized.base import (  # noqa: E402
    NaiveQuantizationCompressor)
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs,  # noqa: E402
                                             QuantizationScheme)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import (calculate_qparams,  # noqa: E402
                                                   generate_gparam,
                                                   maybe_pad_tensor_for_block_quant)

# the weight args of compressed-tensors' MXFP4A16 / MXFP8A16 / NVFP4A16 / FP8_BLOCK presets
ARGS = {
    "mxfp4": QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32,
                              symmetric=True, scale_dtype=torch.uint8, zp_dtype=torch.uint8),
    "mxfp8": QuantizationArgs(num_bits=8, type="float", strategy="group", group_size=32,
                              symmetric=True, scale_dtype=torch.uint8, zp_dtype=torch.uint8),
    "nvfp4": QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16,
                              symmetric=True, scale_dtype=torch.float8_e4m3fn,
                              zp_dtype=torch.float8_e4m3fn),
    "fp8_block": QuantizationArgs(num_bits=8, type="float", strategy="block",
                                  block_structure=[128, 128], symmetric=True),
}
COMPRESSORS = {"mxfp4": MXFP4PackedCompressor, "mxfp8": MXFP8QuantizationCompressor,
               "nvfp4": NVFP4PackedCompressor, "fp8_block": NaiveQuantizationCompressor}


def ct_group(w: torch.Tensor, name: str):
    """mxfp4 / mxfp8 / nvfp4: (fake-quantized w, scale, global scale or None)."""
    args = ARGS[name]
    groups = w.unflatten(-1, (-1, args.group_size))
    gs = None
    if name == "nvfp4":
        gs = generate_gparam(w.amin().reshape(1), w.amax().reshape(1))
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args, global_scale=gs)
    return fake_quantize(w, scale, None, args, global_scale=gs), scale, gs


def ct_fp8_block(w: torch.Tensor):
    """fp8 128×128 blocks: (fake-quantized w, scale [ceil(N/128), ceil(K/128)], None)."""
    args = ARGS["fp8_block"]
    padded = maybe_pad_tensor_for_block_quant(w, (128, 128))
    rows, cols = padded.shape[0] // 128, padded.shape[1] // 128
    tiles = padded.reshape(rows, 128, cols, 128).transpose(1, 2).flatten(-2)
    scale, _ = calculate_qparams(tiles.amin(-1), tiles.amax(-1), args)
    return fake_quantize(w, scale, None, args), scale, None


def ct_compress(name: str, w: torch.Tensor, scale: torch.Tensor,
                gs: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The compressed tensors (local names) compressed-tensors writes for this state."""
    state = {"weight": w, "weight_scale": scale}
    if gs is not None:
        state["weight_global_scale"] = gs
    scheme = QuantizationScheme(targets=["Linear"], weights=ARGS[name])
    return COMPRESSORS[name].compress(state, scheme)


def ct_decompress(name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight compressed-tensors rebuilds from compressed ``tensors``."""
    scheme = QuantizationScheme(targets=["Linear"], weights=ARGS[name])
    return COMPRESSORS[name].decompress(dict(tensors), scheme)["weight"]

"""mxfp4, mxfp8, nvfp4 and fp8_e4m3 128×128-block weights end to end: mpq.quantize → native
artifact → mpq.load, on tiny random models (K = 64 and 128; N = 64, 128 and 256, so fp8 blocks are
partial)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mpq
from mpq.quantize import quantize
from mpq.numerics.base import NUMBER_FORMATS
from mpq.config.recipe import parse_recipe
from tests.tiny_models import save_tiny_model

# weights: → (label, local key -> dtype of the stored tensors)
CASES = {
    "{format: mxfp4}": ("mxfp4", {"packed": torch.uint8, "scale": torch.uint8}),
    "{format: mxfp8}": ("mxfp8", {"weight": torch.float8_e4m3fn, "scale": torch.uint8}),
    "{format: nvfp4}": ("nvfp4", {"packed": torch.uint8, "scale": torch.float8_e4m3fn,
                                  "global_scale": torch.float32}),
    "{format: fp8_e4m3, granularity: block}": ("fp8_e4m3 block128",
                                               {"weight": torch.float8_e4m3fn,
                                                "scale": torch.float32}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    return {arch: (save_tiny_model(arch, root / arch), root / arch) for arch in ("llama", "gpt2")}


@pytest.mark.parametrize("weights", CASES)
def test_quantize_load_same_weights(weights, sources, tmp_path):
    label, stored = CASES[weights]
    source, src_dir = sources["llama"]
    recipe = parse_recipe(f"mpq_recipe: 1\nrules: [{{targets: Linear, weights: {weights}}}]\n",
                          "t.yaml")
    result = quantize(src_dir, recipe, tmp_path / "out")
    layers = result.plan.quantized()
    assert layers and all(layer.scheme.describe() == label for layer in layers)

    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    prefix = "model.layers.1.mlp.down_proj."
    assert {k[len(prefix):]: v.dtype for k, v in tensors.items() if k.startswith(prefix)} == stored

    loaded = mpq.load(tmp_path / "out")
    dense = mpq.load(tmp_path / "out", dequantize=True)
    for layer in layers:
        args = layer.scheme.weights
        expected = NUMBER_FORMATS.get(args.format).quantize(
            source.get_submodule(layer.name).weight, args).dequantize()
        assert torch.equal(loaded.get_submodule(layer.name).dequantized_weight(), expected)
        assert torch.equal(dense.get_submodule(layer.name).weight, expected)

    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, dense_logits, original = loaded(ids).logits, dense(ids).logits, source(ids).logits
    assert torch.isfinite(logits).all() and (logits - dense_logits).abs().max() <= 1e-5
    assert (logits - original).abs().max() > 1e-4  # quantization did something


def test_conv1d_model_with_nvfp4(sources, tmp_path):
    """GPT-2 stores Conv1D weights transposed; mpq quantizes them as [out, in] all the same."""
    _, src_dir = sources["gpt2"]
    result = quantize(src_dir, parse_recipe(
        "mpq_recipe: 1\nrules: [{targets: [Linear, Conv1D], weights: {format: nvfp4}}]\n",
        "t.yaml"), tmp_path / "out")
    assert result.plan.quantized()
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = mpq.load(tmp_path / "out")(ids).logits
        dense = mpq.load(tmp_path / "out", dequantize=True)(ids).logits
    assert torch.isfinite(packed).all() and (packed - dense).abs().max() <= 1e-5

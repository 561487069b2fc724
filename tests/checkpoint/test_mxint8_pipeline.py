"""mxint8 end to end: ``mpq quantize`` with a recipe using it (RTN and GPTQ) writes a native
artifact that mpq.load runs; compressed-tensors and GPTQ v1 refuse it (exit 9) with its reason."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mpq
from mpq.numerics.base import NUMBER_FORMATS
from tests.helpers import run_cli, write_tokenizer
from tests.tiny_models import save_tiny_model

RECIPE = ("mpq_recipe: 1\nname: mxint8\ndefaults:\n  algorithm: {algorithm}\n"
          "rules:\n  - targets: [Linear]\n    weights: {{format: mxint8}}\n")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("mxint8") / "llama"
    model = save_tiny_model("llama", path)
    write_tokenizer(path)
    return model, path


def _recipe(tmp_path, algorithm: str):
    path = tmp_path / f"{algorithm}.yaml"
    path.write_text(RECIPE.format(algorithm=algorithm))
    return path


def test_rtn_artifact_loads_and_runs(source, tmp_path):
    model, src = source
    out = tmp_path / "out"
    result = run_cli("quantize", src, "-r", _recipe(tmp_path, "rtn"), "-o", out)
    assert result.exit_code == 0, result.output
    tensors = load_file(str(out / "model.safetensors"))
    prefix = "model.layers.1.mlp.down_proj."
    assert {k[len(prefix):]: v.dtype for k, v in tensors.items() if k.startswith(prefix)} == {
        "weight": torch.int8, "scale": torch.uint8}
    loaded = mpq.load(out)
    fmt = NUMBER_FORMATS.get("mxint8")
    layer = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.args.describe() == "mxint8"
    expected = fmt.quantize(model.get_submodule("model.layers.1.mlp.down_proj").weight,
                            layer.args).dequantize()
    assert torch.equal(layer.dequantized_weight(), expected)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, original = loaded(ids).logits, model(ids).logits
    assert torch.isfinite(logits).all()
    assert 0 < float((logits - original).abs().max()) < 0.05 * float(original.abs().max())
    inspect = run_cli("inspect", out)
    assert inspect.exit_code == 0 and "mxint8" in inspect.output


def test_gptq_artifact_loads(source, tmp_path, calib_text):
    _, src = source
    out = tmp_path / "out"
    result = run_cli("quantize", src, "-r", _recipe(tmp_path, "gptq"), "-o", out,
                     "--calib", calib_text, "--num-samples", 4, "--seq-len", 32)
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(mpq.load(out)(ids).logits).all()


@pytest.mark.parametrize("fmt, reason", [
    ("compressed-tensors", "mxint8 weights have no compressed-tensors format"),
    ("gptq", "mxint8 weights (GPTQ v1 stores float16 scales"),
])
def test_other_checkpoint_formats_refuse_it(source, tmp_path, fmt, reason):
    _, src = source
    out = tmp_path / "out"
    result = run_cli("quantize", src, "-r", _recipe(tmp_path, "rtn"), "-o", out, "--format", fmt)
    assert result.exit_code == 9
    assert reason in result.output and not out.exists()

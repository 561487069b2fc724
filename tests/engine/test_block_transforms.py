"""Block transforms (SmoothQuant, AWQ) on mixture-of-experts blocks: the attention's scale
groups are transformed, the fused experts are not, and every block's record says so and why."""
from __future__ import annotations

import pytest
import torch

import mpq
from mpq.calibration import CalibrationOptions
from mpq.checkpoint.native import open_artifact
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import RunOptions
from mpq.models.experts import NO_SMOOTHING
from mpq.quantize import quantize
from mpq.quantizers.rtn import rtn_dequant
from tests.helpers import run_cli
from tests.tiny_models import MOE_ARCHITECTURES, save_tiny_model

SMOOTHQUANT = parse_recipe("""\
mpq_recipe: 1
transforms:
  - {type: smoothquant, alpha: 0.5}
defaults: {algorithm: rtn}
rules:
  - targets: ['re:.*mlp\\.experts\\..*']
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
  - targets: [Linear]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
    input_activations: {format: int, bits: 8, dynamic: true, granularity: token}
""", "sq.yaml")


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
@pytest.mark.parametrize("recipe", ["w4a16-awq", SMOOTHQUANT], ids=["awq", "smoothquant"])
def test_experts_are_left_untransformed_and_the_record_says_why(arch, recipe, tmp_path,
                                                                calib_text):
    source = save_tiny_model(arch, tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64)
    quantize(tmp_path / "src", recipe, tmp_path / "out", RunOptions(calibration=calibration))
    artifact = open_artifact(tmp_path / "out")
    (records,) = artifact.log.transforms
    assert len(records) == source.config.num_hidden_layers
    for record in records:
        assert record["not_transformed"] == {"layers": 16, "reason": NO_SMOOTHING}
        assert record["groups"] and all(".experts" not in name for group in record["groups"]
                                        for name in group["linears"])
    # the experts' values are plain RTN of the float weights: nothing rescaled or clipped them
    loaded = mpq.load(tmp_path / "out")
    for index, layer in enumerate(loaded.model.layers):
        experts = layer.mlp.experts
        scheme = artifact.plan.get(f"model.layers.{index}.mlp.experts.down_proj.0").scheme
        original = source.model.layers[index].mlp.experts.down_proj
        expected = torch.stack([rtn_dequant(original[e].float(), scheme.weights)
                                for e in range(8)])
        assert torch.equal(experts.dense("down_proj", torch.float32), expected)
    shown = run_cli("plan", tmp_path / "out")
    assert "not applied to the 32 quantized expert slices" in shown.stdout
    assert "no per-channel scale folds into one expert alone" in " ".join(shown.stdout.split())

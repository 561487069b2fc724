"""Sensitivity and --target-bits under a rotating (QuaRot) base recipe: the damage is measured on
the rotated weights, the table records the rotation, and a table of the other kind is refused."""
from __future__ import annotations

import json

import pytest
import torch

from mpq.analysis.candidates import load_candidates
from mpq.analysis.sensitivity import measure_damage, sensitivity, target_layers
from mpq.analysis.sensitivity_table import SensitivityTable
from mpq.calibration import CalibrationOptions, build_calibration_set
from mpq.config.recipe import parse_recipe
from mpq.errors import RecipeError
from mpq.models.layout import layout_of
from mpq.models.source import load_model
from mpq.rotation.quarot import apply_quarot
from tests.helpers import run_cli, tiny_folder

ROTATED_BASE = """mpq_recipe: 1
rotation: {type: quarot, r1: hadamard, r2: true, r4: true, seed: 0}
rules:
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 16}
"""
CANDIDATES = "w8a16,w4a16,w3a16"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama folder with a byte tokenizer, a corpus, a rotating base recipe and the
    sensitivity tables measured with it and without."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tiny_folder(tmp_path_factory.mktemp("sens-rot"))
    (root / "rotated.yaml").write_text(ROTATED_BASE)
    for name, base in (("rotated", ["-r", root / "rotated.yaml"]), ("plain", [])):
        result = run_cli("sensitivity", root / "src", "--calib", root / "calib.txt",
                         "--num-samples", 4, "--seq-len", 32, "--candidates", CANDIDATES,
                         *base, "-o", root / f"{name}.json")
        assert result.exit_code == 0, result.output
    yield root
    torch.set_num_threads(threads)


def _options(root):
    return CalibrationOptions(source=str(root / "calib.txt"), num_samples=4, seq_len=32, seed=0)


def test_damage_is_that_of_the_rotated_weights(tiny):
    from transformers import AutoTokenizer

    base = parse_recipe(ROTATED_BASE, "base")
    table = sensitivity(tiny / "src", CANDIDATES, _options(tiny), base=base)
    assert table.rotation == base.rotation.to_dict()
    model = load_model(tiny / "src", dtype=torch.float32)
    layers = target_layers(model, load_candidates(CANDIDATES), base)
    apply_quarot(model, layout_of(model), base.rotation)
    calib = build_calibration_set(_options(tiny), AutoTokenizer.from_pretrained(tiny / "src"))
    expected = measure_damage(model, layers, calib.samples, "fisher", seed=0)
    plain = SensitivityTable.load(tiny / "plain.json")
    for row in table.layers:
        assert row.damage == pytest.approx(expected[row.name], rel=1e-5)
    assert any(row.damage != pytest.approx(plain.row(row.name).damage, rel=1e-2)
               for row in table.layers)  # rotation changes what a layer's rounding costs
    assert plain.rotation is None


def test_the_rotation_travels_in_the_table_file(tiny):
    data = json.loads((tiny / "rotated.json").read_text())
    assert data["rotation"] == {"type": "quarot", "r1": "hadamard", "r2": True, "r4": True,
                                "seed": 0}
    assert SensitivityTable.load(tiny / "rotated.json").rotation == data["rotation"]
    assert json.loads((tiny / "plain.json").read_text())["rotation"] is None
    shown = run_cli("sensitivity", tiny / "src", "--calib", tiny / "calib.txt", "--num-samples", 2,
                    "--seq-len", 16, "--candidates", "w4a16", "-r", tiny / "rotated.yaml",
                    "--top", 2)
    assert shown.exit_code == 0, shown.output
    assert "fisher; on the rotated model" in shown.output


def test_target_bits_on_a_rotating_base_writes_a_rotated_mixed_artifact(tiny, tmp_path):
    import mpq
    from mpq.checkpoint.native import open_artifact

    out = tmp_path / "mixed"
    result = run_cli("quantize", tiny / "src", "-r", tiny / "rotated.yaml", "-o", out,
                     "--target-bits", 4.5, "--sensitivity", tiny / "rotated.json")
    assert result.exit_code == 0, result.output
    artifact = open_artifact(out)
    assert artifact.plan.rotation is not None
    schemes = {l.scheme.weights.describe() for l in artifact.plan.quantized()}
    assert len(schemes) > 1
    uniform = tmp_path / "uniform-w4"  # no rotation, 4.5 bits/weight (int4 g64, fp32 scales)
    assert run_cli("quantize", tiny / "src", "-r", "w4a16", "-o", uniform).exit_code == 0
    model = load_model(tiny / "src", dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits.flatten()
        mixed, plain = (mpq.load(path, dequantize=True)(ids).logits.flatten()
                        for path in (out, uniform))
    # the rotated mixed model computes the float model's function closer than plain int4 does
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(mixed, reference, dim=0) > cosine(plain, reference, dim=0)


@pytest.mark.parametrize("recipe, table, message", [
    ("rotated.yaml", "plain.json", "was measured on the unrotated model"),
    ("w4a16", "rotated.json", "was measured on the model rotated by"),
])
def test_a_table_of_the_other_rotation_is_refused(tiny, tmp_path, recipe, table, message):
    chosen = tiny / recipe if recipe.endswith(".yaml") else recipe
    result = run_cli("quantize", tiny / "src", "-r", chosen, "-o", tmp_path / "x",
                     "--target-bits", 4.5, "--sensitivity", tiny / table)
    assert result.exit_code == 3, result.output
    assert message in result.output
    assert not (tmp_path / "x").exists()


def test_a_rotating_base_that_quantizes_the_head_is_refused(tiny):
    base = parse_recipe(ROTATED_BASE + "  - targets: lm_head\n"
                                       "    weights: {bits: 8, granularity: channel}\n", "base")
    with pytest.raises(RecipeError, match="cannot measure the input embedding or output head"):
        sensitivity(tiny / "src", CANDIDATES, _options(tiny), base=base)

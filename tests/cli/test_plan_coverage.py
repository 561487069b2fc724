"""``mpq plan`` / ``mpq quantize`` and the parameter account: the kept weights by category, the
unquantized share of every tiny family (asserted against an independent count), and
``--strict`` / ``--max-unquantized``."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mpq.cli.main import cli
from mpq.errors import RecipeError
from tests.models.test_coverage import ALL_LAYERS, DENSE, expected_kept, unique_bytes
from tests.tiny_models import MOE_ARCHITECTURES, save_tiny_model
from tests.models.test_coverage import EMBEDDING, LINEARS


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny family saved once, with its independently counted unquantized share."""
    root = tmp_path_factory.mktemp("coverage")
    (root / "all.yaml").write_text(ALL_LAYERS)
    models = {}
    for arch in DENSE + MOE_ARCHITECTURES:
        model = save_tiny_model(arch, root / arch)
        models[arch] = sum(expected_kept(model).values()) / unique_bytes(model.parameters())
    return root, models


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


@pytest.mark.parametrize("arch", DENSE + MOE_ARCHITECTURES)
def test_plan_prints_the_unquantized_share_of_each_family(saved, arch):
    root, shares = saved
    share = shares[arch]
    shown = invoke("plan", root / arch, "-r", root / "all.yaml")
    assert shown.exit_code == 0, shown.output
    assert f"unquantized: {100 * share:.1f}% of the weight bytes" in shown.stdout
    assert "kept in the source dtype" in shown.stdout
    data = json.loads(invoke("plan", root / arch, "-r", root / "all.yaml", "--json").stdout)
    assert data["coverage"]["unquantized_share"] == pytest.approx(share)
    assert {"recipe_name", "precision_policy", "layers"} <= set(data)  # the plan's keys stay
    kept = sum(t["bytes"] for t in data["coverage"]["kept_tensors"])
    assert kept == data["coverage"]["unquantized_bytes"]
    assert sum(g["bytes"] for g in data["coverage"]["kept"]) == kept


SKIP_EXPERTS = """\
mpq_recipe: 1
rules:
  - targets: ["re:.*experts.*"]
    skip: true
  - targets: [Linear]
    weights: {bits: 4, group_size: 64}
"""


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_strict_passes_quantized_experts_and_refuses_skipped_ones(saved, arch, tmp_path):
    root, shares = saved
    shown = invoke("plan", root / arch, "-r", "w4a16-gptq", "--strict")
    assert shown.exit_code == 0, shown.output
    assert "experts 0-7 of model.layers.*.mlp.experts.gate_up_proj (blocks 0-1)" in shown.stdout
    assert "moe-experts" not in shown.stdout
    assert "32 expert slices are calibrated on the tokens routed to them" in shown.stdout
    (tmp_path / "skip.yaml").write_text(SKIP_EXPERTS)
    refused = invoke("plan", root / arch, "-r", tmp_path / "skip.yaml", "--strict")
    assert refused.exit_code == RecipeError.exit_code
    assert "skipped" in refused.stderr and "--strict" in refused.stderr
    assert refused.stderr.count("error:") == 1
    out = tmp_path / "out"
    stopped = invoke("quantize", root / arch, "-r", tmp_path / "skip.yaml", "-o", out, "--strict")
    assert stopped.exit_code == RecipeError.exit_code and "skipped" in stopped.stderr
    assert not out.exists() and not (tmp_path / "out.mpq-work").exists()


def test_strict_passes_a_dense_plan_and_needs_a_recipe(saved):
    root, _ = saved
    assert invoke("plan", root / "llama", "-r", "w4a16", "--strict").exit_code == 0
    tight = invoke("plan", root / "llama", "-r", "w4a16", "--max-unquantized", 0.1)
    assert tight.exit_code == RecipeError.exit_code and "embedding" in tight.stderr


def test_quantize_reports_the_share(saved, tmp_path):
    root, shares = saved
    out = tmp_path / "q"
    result = invoke("quantize", root / "qwen3_moe", "-r", "w4a16", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    coverage = next(e for e in events if e["event"] == "coverage")
    final = events[-1]
    assert final["event"] == "result"
    assert final["unquantized_share"] == pytest.approx(coverage["unquantized_share"])
    assert coverage["kept"][0]["category"] in ("embedding", "head")  # experts are quantized
    text = invoke("quantize", root / "qwen3_moe", "-r", "w4a16", "-o", tmp_path / "t")
    assert text.exit_code == 0, text.output
    expected = f"unquantized: {100 * final['unquantized_share']:.1f}% of the weight bytes"
    assert expected in text.stdout and "moe-experts" not in text.stdout
    stored = invoke("plan", out, "--strict")
    assert stored.exit_code == 2 and "pass --recipe" in stored.output


def test_dry_run_shows_the_share(saved, tmp_path):
    root, shares = saved
    args = ("quantize", root / "mixtral", "-r", "w4a16", "-o", tmp_path / "d", "--dry-run")
    data = json.loads(invoke(*args, "--json").stdout)
    assert data["coverage"]["unquantized_share"] == pytest.approx(shares["mixtral"])
    text = invoke(*args)
    assert f"unquantized: {100 * shares['mixtral']:.1f}% of the weight bytes" in text.stdout
    assert invoke(*args, "--strict").exit_code == 0  # its experts are quantized
    assert invoke(*args, "--max-unquantized", 0.05).exit_code == RecipeError.exit_code


TIED_EMBEDDING = EMBEDDING + LINEARS  # the embedding int8 per row: the tied head unties


def test_plan_shows_the_quantized_embedding_and_the_untying(saved, tmp_path):
    root, _ = saved
    save_tiny_model("llama_tied", tmp_path / "tied")
    (tmp_path / "r.yaml").write_text(TIED_EMBEDDING)
    shown = invoke("plan", tmp_path / "tied", "-r", tmp_path / "r.yaml")
    assert shown.exit_code == 0, shown.output
    assert "model.embed_tokens" in shown.stdout and "rule 0 (Embedding)" in shown.stdout
    assert ("tied model.embed_tokens / lm_head: untied (only model.embed_tokens is quantized"
            in " ".join(shown.stdout.split()))
    data = json.loads(invoke("plan", tmp_path / "tied", "-r", tmp_path / "r.yaml",
                             "--json").stdout)
    layer = next(item for item in data["layers"] if item["name"] == "model.embed_tokens")
    assert layer["embedding"] is True and layer["scheme"]["weights"]["bits"] == 8
    assert data["tying"]["shared"] is False
    assert data["coverage"]["tying"]["untied_bytes"] == 256 * 64 * 4
    kept = {t["name"]: t for t in data["coverage"]["kept_tensors"]}
    assert "model.embed_tokens.weight" not in kept and "lm_head.weight" in kept

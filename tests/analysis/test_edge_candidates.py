"""The input embedding and the output head as sensitivity / mixed-precision items
(mpq.analysis.edge_candidates): which items, their damage, the choice and the artifact it gives."""
from __future__ import annotations

import json

import pytest
import torch

from mpq.analysis.candidates import load_candidates
from mpq.analysis.sensitivity_table import FLOAT
from mpq.analysis.mixed_precision import build_recipe, choose
from mpq.analysis.sensitivity import ExactKL, measure_damage, rtn_error, target_layers
from mpq.analysis.sensitivity_table import SensitivityTable, build_table
from mpq.config.recipe import parse_recipe
from tests.helpers import run_cli, tiny_folder
from tests.tiny_models import tiny_model

EDGE_BASE = """mpq_recipe: 1
name: edge-base
rules:
  - targets: [Embedding, lm_head]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}
"""
CANDIDATES = "int8,int4-g32,int2-g32"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _base():
    return parse_recipe(EDGE_BASE, "edge-base.yaml")


def _samples(n=4, length=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, length), generator=g) for _ in range(n)]


def _edges(model, storage="fp32"):
    layers = target_layers(model, load_candidates(CANDIDATES), _base(), storage=storage)
    return [layer for layer in layers if layer.block is None]


def test_a_tied_pair_is_one_item_and_an_untied_model_has_two():
    (tied,) = _edges(tiny_model("llama_tied"))
    assert (tied.name, tied.role, tied.tied_with) == ("model.embed_tokens", "tied", "lm_head")
    assert list(tied.schemes) == ["int8", "int4-g32", "int2-g32", FLOAT]
    assert tied.schemes[FLOAT] is None and tied.schemes["int4-g32"].algorithm == "rtn"
    untied = _edges(tiny_model("llama"))
    assert [(e.name, e.role, e.tied_with) for e in untied] == [
        ("model.embed_tokens", "embedding", None), ("lm_head", "head", None)]


def test_no_edge_item_unless_the_base_quantizes_one():
    model = tiny_model("llama_tied")
    cands = load_candidates(CANDIDATES)
    assert all(layer.block is not None for layer in target_layers(model, cands))
    body_only = parse_recipe(EDGE_BASE.replace("  - targets: [Embedding, lm_head]\n    weights: "
                                               "{format: int, bits: 8, symmetric: true, "
                                               "granularity: channel}\n", ""), "body.yaml")
    assert all(layer.block is not None for layer in target_layers(model, cands, body_only))


@pytest.mark.parametrize("arch", ["llama_tied", "llama"])
def test_edge_damage_fisher_agrees_with_the_exact_kl_and_grows_with_coarser_grids(arch):
    model = tiny_model(arch)
    edges = _edges(model)
    samples = _samples()
    fisher = measure_damage(model, edges, samples, "fisher")
    exact = measure_damage(model, edges, samples, "kl")
    for edge in edges:
        f, k = fisher[edge.name], exact[edge.name]
        assert f[FLOAT] == 0.0 and k[FLOAT] == pytest.approx(0.0, abs=1e-9)  # fp32 storage
        assert 0 < k["int8"] < k["int4-g32"] < k["int2-g32"]
        assert 0.5 < f["int4-g32"] / k["int4-g32"] < 2.0  # measured 1.03-1.15 here


def test_the_head_alone_replays_every_block_and_gives_the_full_forward_kl():
    model = tiny_model("llama")
    (_, head) = _edges(model)
    samples = _samples(2)
    exact = measure_damage(model, [head], samples, "kl")[head.name]["int2-g32"]
    module = model.lm_head
    weight = module.weight.detach().clone()
    with torch.no_grad():
        reference = [torch.log_softmax(model(ids).logits[0], -1) for ids in samples]
        module.weight.data = weight + rtn_error(weight, head.schemes["int2-g32"])
        quantized = [torch.log_softmax(model(ids).logits[0], -1) for ids in samples]
        module.weight.data = weight
    full = sum(float((p.exp() * (p - q)).sum()) for p, q in zip(reference, quantized))
    assert exact == pytest.approx(full / sum(p.shape[0] for p in reference), rel=1e-4)
    assert ExactKL(model, samples).kl(2) == pytest.approx(0.0, abs=1e-9)


def test_bf16_storage_makes_float_cost_16_bits_and_a_small_damage():
    model = tiny_model("llama_tied")
    (tied,) = _edges(model, storage="bf16")
    damage = measure_damage(model, [tied], _samples(), "fisher")
    table = build_table("m", [tied], damage, measure="fisher", candidates=CANDIDATES.split(","))
    row = table.layers[0]
    assert row.bits[FLOAT] == 16.0 and row.bytes[FLOAT] == tied.shape[0] * tied.shape[1] * 2
    assert 0 < row.damage[FLOAT] < row.damage["int8"]


def _table(model):
    layers = target_layers(model, load_candidates(CANDIDATES), _base())
    damage = measure_damage(model, layers, _samples(), "fisher")
    return layers, build_table("m", layers, damage, measure="fisher",
                               candidates=CANDIDATES.split(","))


def test_the_table_keeps_edge_rows_through_json_and_lists_float_last():
    model = tiny_model("llama_tied")
    _, table = _table(model)
    assert table.candidates == CANDIDATES.split(",") + [FLOAT]
    assert table.measured_candidates() == CANDIDATES.split(",")
    again = SensitivityTable.from_dict(json.loads(json.dumps(table.to_dict())))
    row = again.row("model.embed_tokens")
    assert (row.block, row.role, row.tied_with, row.names) == (
        None, "tied", "lm_head", ["model.embed_tokens", "lm_head"])
    assert row.scheme(FLOAT) is None and row.options(["int8"]) == ["int8", FLOAT]
    assert table.cheapest() == "int2-g32"


@pytest.mark.parametrize("budget, expect", [(10**9, FLOAT), (0, "int2-g32")])
def test_the_choice_spends_bytes_on_the_edge_only_when_they_buy_the_most(budget, expect):
    model = tiny_model("llama_tied")
    layers, table = _table(model)
    cheapest = sum(min(row.bytes.values()) for row in table.layers)
    choice = choose(table, target_bytes=max(budget, cheapest), fixed_bytes=0,
                    candidates=CANDIDATES.split(","), layers=[layer.name for layer in layers])
    assert choice.picks["model.embed_tokens"] == expect
    text, recipe = build_recipe(_base(), table, choice, model)
    from mpq.engine.spec import plan_model

    _, plan = plan_model(model, recipe)
    if expect == FLOAT:  # kept in float: the pair stays as it was, tied
        assert plan.get("lm_head").scheme is None and plan.tying is None
    else:  # one scheme on both sides: one shared tensor
        assert plan.tying is not None and plan.tying.shared
        assert plan.get("lm_head").scheme == plan.get("model.embed_tokens").scheme


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory, _one_thread):
    root = tiny_folder(tmp_path_factory.mktemp("edges"), "llama_tied", words=3000)
    (root / "base.yaml").write_text(EDGE_BASE)
    return root


def test_quantize_target_size_quantizes_the_tied_embedding_to_fit(tied_folder, tmp_path):
    from mpq.checkpoint.native import open_artifact

    root = tied_folder
    keep = tmp_path / "keep"
    plain = run_cli("quantize", root / "src", "-r", root / "base.yaml", "-o", keep, "--json")
    assert plain.exit_code == 0, plain.output
    size = sum(f.stat().st_size for f in keep.glob("*.safetensors"))
    out = tmp_path / "sized"
    target = int(size * 0.9)  # below the base's own int8 embedding: needs a coarser edge
    result = run_cli("quantize", root / "src", "-r", root / "base.yaml", "-o", out,
                     "--target-size", str(target), "--calib", root / "calib.txt", "--seq-len", 32,
                     "--sensitivity-samples", 2, "--candidates", CANDIDATES, "--json")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    chosen = next(e for e in events if e["event"] == "mixed_precision")
    assert chosen["picks"]["model.embed_tokens"] in ("int4-g32", "int2-g32")
    assert sum(f.stat().st_size for f in out.glob("*.safetensors")) <= target
    plan = open_artifact(out).plan
    assert plan.tying is not None and plan.tying.shared


def test_a_table_measured_under_one_base_is_costed_for_another():
    from mpq.engine.spec import as_recipe

    model = tiny_model("llama_tied")
    cands = load_candidates(CANDIDATES)
    compact = target_layers(model, cands, as_recipe("w4a16-gptq-compact"))
    table = build_table("m", compact, measure_damage(model, compact, _samples(2), "fisher"),
                        measure="fisher", candidates=CANDIDATES.split(","))
    plain = target_layers(model, cands, as_recipe("w4a16-gptq"))  # fp32 scales, no edges
    costed = table.costed_for(plain)
    name = plain[0].name
    before, after = table.row(name), costed.row(name)
    assert after.damage == before.damage
    assert after.scheme("int4-g32").weights.scale_dtype == "fp32"
    assert before.scheme("int4-g32").weights.scale_dtype == "fp16"
    assert after.bytes["int4-g32"] > before.bytes["int4-g32"]  # fp32 scales cost more
    assert costed.row("model.embed_tokens") == table.row("model.embed_tokens")  # not in plain

"""Per-expert calibration of fused MoE experts (mpq.engine.expert_steps): each expert's
statistics come from the tokens its router sent it (gate_up: the block's hidden states; down:
the expert's own intermediate activation), routed-token counts reach the run log and the
artifact, a starved expert takes the RTN fallback with its reason, and GPTQ's artifact beats
RTN's on KL to the float model on held-out text."""
from __future__ import annotations

import pytest
import torch

import mpq
from mpq.analysis.eval import compare
from mpq.calibration import CalibrationOptions
from mpq.checkpoint.native import open_artifact
from mpq.config.recipe import parse_recipe
from mpq.engine.collect import run_block
from mpq.engine.expert_steps import MIN_EXPERT_TOKENS, collecting_experts
from mpq.engine.spec import RunOptions
from mpq.engine.stats import Hessian
from mpq.quantize import quantize
from tests.helpers import byte_tokenizer, run_cli
from tests.tiny_models import MOE_ARCHITECTURES, save_tiny_model, tiny_model


def experts_recipe(algorithm: str):
    options = "\n  options: {damp: 0.01, block_size: 32}" if algorithm == "gptq" else ""
    return parse_recipe(f"mpq_recipe: 1\ndefaults:\n  algorithm: {algorithm}{options}\nrules:\n"
                        "  - targets: ['re:.*experts.*']\n    weights: {bits: 3, group_size: 32}\n",
                        f"{algorithm}.yaml")


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_each_expert_is_fed_only_its_routed_tokens(arch):
    model = tiny_model(arch)
    block, mlp = model.model.layers[0], model.model.layers[0].mlp
    hidden = torch.randn(1, 40, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(40).unsqueeze(0)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position_ids),
              "attention_mask": None, "position_ids": position_ids}
    names = {f"model.layers.0.mlp.experts.{p}.{e}": frozenset({"hessian"})
             for p in ("gate_up_proj", "down_proj") for e in range(8)}
    with torch.no_grad():
        with collecting_experts(block, "model.layers.0.", names) as (collectors, counts):
            run_block(block, [((hidden,), kwargs)], keep_outputs=False)
        # the reference: what the MoE block's router does with the same normalized input
        seen = {}
        mlp.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].reshape(-1, args[0].shape[-1])))
        block(hidden, **kwargs)
        _, _, chosen = mlp.gate(seen["x"])
    k = model.config.num_experts_per_tok
    assert sum(counts[f"model.layers.0.mlp.experts.gate_up_proj.{e}"] for e in range(8)) == 40 * k
    for e in range(8):
        tokens = (chosen == e).any(dim=-1)
        up = f"model.layers.0.mlp.experts.gate_up_proj.{e}"
        assert counts[up] == int(tokens.sum())
        if not tokens.any():
            assert collectors[up]["hessian"].count == 0
            continue
        expected = Hessian()
        expected.add(seen["x"][tokens])
        torch.testing.assert_close(collectors[up]["hessian"].result(), expected.result())
        gate, up_part = torch.nn.functional.linear(seen["x"][tokens],
                                                   mlp.experts.gate_up_proj[e]).chunk(2, dim=-1)
        expected = Hessian()
        expected.add(mlp.experts.act_fn(gate) * up_part)
        down = f"model.layers.0.mlp.experts.down_proj.{e}"
        torch.testing.assert_close(collectors[down]["hessian"].result(), expected.result())


def starve_experts(model) -> set[int]:
    """Make block 0's router send every token to experts 0/1 or 5/6 only (by the sign of one
    input channel): experts 2, 3, 4 and 7 see no calibration token."""
    with torch.no_grad():
        block = model.model.layers[0]
        block.post_attention_layernorm.weight.zero_()
        block.post_attention_layernorm.weight[0] = 1.0
        block.mlp.gate.weight.zero_()
        block.mlp.gate.weight[:, 0] = torch.tensor([3.0, 2.0, 1.0, -1.0, -2.0, -3.0, -4.0, 0.0])
    return {2, 3, 4, 7}


def test_routed_tokens_are_recorded_and_starved_experts_take_the_fallback(tmp_path, calib_text):
    model = save_tiny_model("qwen3_moe", tmp_path / "src")
    starved = starve_experts(model)
    model.save_pretrained(tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=8, seq_len=64)
    result = quantize(tmp_path / "src", "w4a16-gptq", tmp_path / "out",
                      RunOptions(calibration=calibration))
    log = open_artifact(tmp_path / "out").log  # what the artifact stores
    k, tokens = model.config.num_experts_per_tok, 8 * 64
    for block in range(2):
        for projection in ("gate_up_proj", "down_proj"):
            names = [f"model.layers.{block}.mlp.experts.{projection}.{e}" for e in range(8)]
            counts = [log.layers[name]["routed_tokens"] for name in names]
            assert sum(counts) == k * tokens
            for e, name in enumerate(names):
                record = log.layers[name]
                assert record == result.log.layers[name]
                if counts[e] < MIN_EXPERT_TOKENS:
                    why = (f"{counts[e]} routed calibration tokens < {MIN_EXPERT_TOKENS}"
                           if counts[e] else "no routed calibration token")
                    assert record["fallback"] == f"{why}: rtn instead of gptq"
                    assert "gptq_loss" not in record
                else:
                    assert "fallback" not in record and record["gptq_loss"] >= 0
    # the calibration coverage report: routed tokens per expert, outliers of the other layers
    report = open_artifact(tmp_path / "out").json_field("calibration_coverage")
    assert report["experts"] == {
        f"model.layers.{block}.mlp.experts": {
            str(e): log.layers[f"model.layers.{block}.mlp.experts.gate_up_proj.{e}"]["routed_tokens"]
            for e in range(8)} for block in range(2)}
    assert report["activations"] and not any(".experts." in name for name in report["activations"])
    fallen = {e for e in range(8)
              if "fallback" in log.layers[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]}
    assert starved <= fallen
    assert all(log.layers[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]["routed_tokens"] == 0
               for e in starved)
    shown = run_cli("plan", tmp_path / "out")
    assert shown.exit_code == 0, shown.output
    again = run_cli("quantize", tmp_path / "src", "-r", "w4a16-gptq", "-o", tmp_path / "cli",
                    "--calib", calib_text, "--num-samples", 8, "--seq-len", 64)
    assert again.exit_code == 0, again.output
    for output in (shown.stdout, again.stdout):  # the stored plan, and the run's own report
        assert "gate_up_proj (blocks 0-1): routed tokens per expert min 0," in output
    line = next(l for l in shown.stdout.splitlines() if "gate_up_proj (blocks 0-1): routed" in l)
    fallbacks = sum("fallback" in log.layers[f"model.layers.{b}.mlp.experts.gate_up_proj.{e}"]
                    for b in range(2) for e in range(8))
    assert "min 0," in line and f"{fallbacks} of 16 on the rtn fallback" in line
    loaded = mpq.load(tmp_path / "out")  # a fallen-back expert loads like any other
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randint(0, 256, (1, 12))).logits).all()


@pytest.mark.slow  # about 15 s per model on 2 cores
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_gptq_beats_rtn_on_held_out_kl(arch, tmp_path, corpora, monkeypatch):
    """Only the experts are quantized (3-bit, group 32), calibrated on enwiki's training
    excerpt; KL to the float model is measured on its test excerpt."""
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained",
                        lambda *a, **k: byte_tokenizer())
    source = save_tiny_model(arch, tmp_path / "src")
    text = (corpora / "enwiki_excerpt.test.txt").read_text(encoding="utf-8")[:20000]
    held_out = torch.tensor(byte_tokenizer()(text, add_special_tokens=False)["input_ids"])
    calibration = CalibrationOptions(source=str(corpora / "enwiki_excerpt.train.txt"),
                                     num_samples=32, seq_len=128)  # every expert gets >= 32
    kl = {}
    for algorithm in ("rtn", "gptq"):
        result = quantize(tmp_path / "src", experts_recipe(algorithm), tmp_path / algorithm,
                          RunOptions(calibration=calibration))
        assert len(result.plan.quantized()) == 2 * 2 * 8
        assert not any("fallback" in r for r in result.log.layers.values())
        kl[algorithm] = compare(mpq.load(tmp_path / algorithm), source, held_out, window=128,
                                num_windows=8).kl_mean
    assert 0 < kl["gptq"] < 0.8 * kl["rtn"], kl


@pytest.mark.parametrize("min_tokens", [0, 100_000])
def test_the_recipe_sets_the_fallback_threshold(min_tokens, tmp_path, calib_text):
    """``experts: {min_tokens: N}``: 0 falls back only for experts no token reached (block 0's
    four starved ones), a huge N for every expert slice of both blocks' gate_up and down."""
    model = save_tiny_model("qwen3_moe", tmp_path / "src")
    starve_experts(model)
    model.save_pretrained(tmp_path / "src")
    recipe = parse_recipe(f"mpq_recipe: 1\nexperts: {{min_tokens: {min_tokens}}}\n"
                          "defaults: {algorithm: gptq}\nrules:\n  - targets: [Linear]\n"
                          "    weights: {bits: 4, group_size: 32}\n", "e.yaml")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64)
    result = quantize(tmp_path / "src", recipe, tmp_path / "out",
                      RunOptions(calibration=calibration))
    artifact = open_artifact(tmp_path / "out")
    assert artifact.plan.min_expert_tokens == min_tokens
    slices = {name: r for name, r in artifact.log.layers.items() if ".experts." in name}
    fallen = {name for name, r in slices.items() if "fallback" in r}
    if min_tokens:
        assert len(fallen) == len(slices) == 32
    else:
        assert fallen == {name for name, r in slices.items() if r["routed_tokens"] == 0}
        assert len(fallen) >= 8  # gate_up and down of block 0's four starved experts
    assert not any("fallback" in r for name, r in result.log.layers.items()
                   if ".experts." not in name)

"""mpq.analysis.estimate and ``mpq quantize --dry-run``: no weight read, nothing written, sizes exact."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import mpq.analysis.estimate as estimate_mod
import mpq.models.source
from mpq.cli.main import cli
from mpq.errors import ResourceError
from mpq.analysis.estimate import RunEstimate, available_memory, check_fits, estimate_run
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions, resolve_run
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from tests.helpers import write_tokenizer
from tests.tiny_models import save_tiny_model

# w4a16 with min-max scales: RTN that reads --calib but runs no calibration pass
W4A16_MINMAX = parse_recipe("mpq_recipe: 1\ndefaults: {algorithm: rtn}\nrules:\n"
                            "  - targets: [Linear, Conv1D]\n    weights: {bits: 4, "
                            "granularity: group, group_size: 64}\n", "w4a16-minmax.yaml")
TEXT = "The quick brown fox jumps over the lazy dog, and then some more words follow. " * 200


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    for arch in ("llama", "llama_tied"):
        save_tiny_model(arch, root / arch)
        write_tokenizer(root / arch)
    (root / "calib.txt").write_text(TEXT)
    return root


@pytest.fixture()
def no_weights(monkeypatch):
    """Reading weights in any way fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run read the model's weights")

    monkeypatch.setattr(mpq.models.source, "load_model", refuse)
    monkeypatch.setattr("mpq.quantize.load_model", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr("safetensors.safe_open", refuse)


def _calib(models, **kw):
    return CalibrationOptions(source=str(models / "calib.txt"), **{"num_samples": 4,
                                                                  "seq_len": 32, **kw})


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
@pytest.mark.parametrize("preset", ["w4a16", "w8a16", "w4a16-gptq"])
def test_size_estimate_matches_a_real_artifact(models, tmp_path, arch, preset):
    calib = _calib(models)
    est = estimate_run(resolve_run(models / arch, preset, RunOptions(calibration=calib)), probe=False)
    out = tmp_path / "out"
    result = quantize(models / arch, preset, out, RunOptions(calibration=calib))
    stored = result.sizes["stored_bytes"]
    assert abs(est.size["tensor_bytes"] - stored) <= 0.05 * stored
    files = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert abs(est.size["file_bytes"] - files) <= 0.05 * files


def test_dry_run_reads_no_weights_and_writes_nothing(models, tmp_path, no_weights):
    out = tmp_path / "never"
    result = CliRunner().invoke(cli, ["quantize", str(models / "llama"), "-r", "w4a16-gptq",
                                      "-o", str(out), "--calib", str(models / "calib.txt"),
                                      "--num-samples", "8", "--seq-len", "32", "--dry-run"],
                                obj={})
    assert result.exit_code == 0, result.output
    assert not out.exists() and not (tmp_path / "never.mpq-work").exists()
    assert list(tmp_path.iterdir()) == []
    for word in ("gptq int4 sym g64", "artifact", "peak memory", "time", "fits"):
        assert word in result.stdout
    assert "≈" in result.stdout


def test_dry_run_json(models, tmp_path, no_weights):
    result = CliRunner().invoke(cli, ["quantize", str(models / "llama"), "-r", "w8a16",
                                      "-o", str(tmp_path / "o"), "--dry-run", "--json"], obj={})
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert data["event"] == "estimate" and data["fits"] is True
    assert data["plan"]["quantized_layers"] == 14 and data["plan"]["kept_layers"] == 1
    assert data["size"]["tensor_bytes"] > 0 and data["memory"]["peak_bytes"] > 0
    assert data["time"]["seconds"] > 0
    assert data["calibration"]["tokens"] == 0  # RTN without --calib: no forward pass


def test_dry_run_exit_11_when_it_does_not_fit(models, tmp_path, monkeypatch, no_weights):
    monkeypatch.setattr(estimate_mod, "available_memory", lambda device="cpu": 1 << 20)
    result = CliRunner().invoke(cli, ["quantize", str(models / "llama"), "-r", "w4a16",
                                      "-o", str(tmp_path / "o"), "--dry-run", "--json"], obj={})
    assert result.exit_code == ResourceError.exit_code == 11, result.output
    assert json.loads(result.stdout.splitlines()[0])["fits"] is False
    assert "--num-samples" in result.stderr and "available" in result.stderr
    assert not (tmp_path / "o").exists()


def test_memory_parts_positive_and_grow_with_samples(models, no_weights):
    small = estimate_run(resolve_run(models / "llama", "w4a16-gptq", RunOptions(calibration=_calib(models))), probe=False)
    large = estimate_run(resolve_run(models / "llama", "w4a16-gptq", RunOptions(calibration=_calib(models, num_samples=64))), probe=False)
    for part in ("overhead", "weights", "activations", "statistics", "solver",
                 "block_temporaries", "outputs"):
        assert small.memory[part] > 0, part
    assert large.memory["activations"] == 16 * small.memory["activations"]
    assert large.peak_bytes > small.peak_bytes
    assert large.seconds > small.seconds
    assert small.memory["statistics"] == large.memory["statistics"]  # Hessians: K×K only


def test_check_fits(models):
    est = estimate_run(resolve_run(models / "llama", "w4a16", RunOptions()), probe=False)
    assert isinstance(est, RunEstimate)
    check_fits(est, est.peak_bytes)  # exactly enough
    with pytest.raises(ResourceError) as info:
        check_fits(est, 1024)
    message = info.value.one_line()
    assert "GiB" in message and "--num-samples" in message and "--seq-len" in message
    assert info.value.exit_code == 11


def test_available_memory_cpu(monkeypatch):
    assert available_memory("cpu") > 0
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    assert available_memory("cpu") > 0  # os.sysconf fallback


def test_dry_run_bad_input_fails_like_quantize(models, tmp_path):
    result = CliRunner().invoke(cli, ["quantize", str(tmp_path / "missing"), "-r", "w4a16",
                                      "-o", str(tmp_path / "o"), "--dry-run"], obj={})
    assert result.exit_code == 4


def test_quantize_refuses_a_run_that_would_not_fit(models, tmp_path, monkeypatch):
    monkeypatch.setattr(estimate_mod, "available_memory", lambda device="cpu": 1 << 20)
    result = CliRunner().invoke(cli, ["quantize", str(models / "llama"), "-r", "w4a16",
                                      "-o", str(tmp_path / "out")], obj={})
    assert result.exit_code == ResourceError.exit_code, result.output
    assert "only 0.00 GiB is available" in result.stderr and not (tmp_path / "out").exists()
    forced = CliRunner().invoke(cli, ["quantize", str(models / "llama"), "-r", "w4a16",
                                      "-o", str(tmp_path / "out"), "--no-memory-check"], obj={})
    assert forced.exit_code == 0, forced.output


def test_streamed_estimate_holds_one_block(models, no_weights):
    """Streamed (the default): the weights part is the tensors outside the blocks plus one
    block's; --no-stream and recipes that cannot stream count the whole model."""
    calib = _calib(models)
    streamed = estimate_run(resolve_run(models / "llama", "w4a16-gptq", RunOptions(calibration=calib)), probe=False)
    whole = estimate_run(resolve_run(models / "llama", "w4a16-gptq", RunOptions(calibration=calib, stream=False)), probe=False)
    assert streamed.streaming is None and whole.streaming == "--no-stream"
    assert streamed.memory["weights"] < whole.memory["weights"]
    assert streamed.memory["outputs"] < whole.memory["outputs"]
    assert streamed.to_dict()["streaming"] == {"streamed": True, "why_not": None}
    rotation = parse_recipe("mpq_recipe: 1\nname: r\nrotation: {type: quarot, seed: 0}\n"
                            "rules:\n  - targets: [Linear]\n    weights: {format: int, bits: 4,"
                            " granularity: channel}\n", "r.yaml")
    rotated = estimate_run(resolve_run(models / "llama", rotation, RunOptions(calibration=calib)), probe=False)
    assert "rotation" in rotated.streaming
    assert rotated.memory["weights"] == whole.memory["weights"]


def test_calibration_reading_is_bounded_by_the_budget_not_the_source(models, tmp_path, no_weights):
    """Reading --calib is its own phase: the tokenizer and what reading holds up to the reading
    budget (the same for a 4 kB and a 40 MB source), with the weights opened before it."""
    from mpq.calibration.stream import read_budget

    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * 8_000_000)
    spec = resolve_run(models / "llama", W4A16_MINMAX, RunOptions(calibration=_calib(models)))
    small_est = estimate_run(spec, probe=False)
    big_est = estimate_run(resolve_run(models / "llama", W4A16_MINMAX, RunOptions(
        calibration=CalibrationOptions(source=str(big), num_samples=4, seq_len=32))), probe=False)
    none_est = estimate_run(resolve_run(models / "llama", W4A16_MINMAX, RunOptions()), probe=False)
    assert small_est.memory == big_est.memory
    assert small_est.memory["tokenizer"] > 0 and small_est.memory["calibration_reading"] > 0
    assert none_est.memory["tokenizer"] == none_est.memory["calibration_reading"] == 0
    assert big_est.calibration["read_budget_tokens"] == read_budget(4, 32)
    assert big_est.time_parts["calibration"] > small_est.time_parts["calibration"]
    parts = big_est.memory
    assert big_est.peak_bytes >= (parts["overhead"] + parts["tokenizer"]
                                  + parts["calibration_reading"])
    more = estimate_run(resolve_run(models / "llama", W4A16_MINMAX, RunOptions(
        calibration=_calib(models, num_samples=4096, seq_len=512))), probe=False)
    assert more.memory["calibration_reading"] - parts["calibration_reading"] >= 4 * (
        read_budget(4096, 512) - read_budget(4, 32))
    assert more.peak_phase == "calibration"


EMBEDDING_RECIPES = {
    "shared": "  - targets: [Embedding, lm_head]\n    weights: {format: int, bits: 8, "
              "granularity: channel}\n",
    "embedding only": "  - targets: [Embedding]\n    weights: {format: int, bits: 4, "
                      "symmetric: false, granularity: group, group_size: 32}\n",
}


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
@pytest.mark.parametrize("case", sorted(EMBEDDING_RECIPES))
def test_size_estimate_counts_the_quantized_embedding_and_the_tie(models, tmp_path, arch, case):
    recipe = parse_recipe("mpq_recipe: 1\ndefaults: {algorithm: rtn}\nrules:\n"
                          + EMBEDDING_RECIPES[case] + "  - targets: [Linear]\n"
                          "    weights: {bits: 4, group_size: 32}\n", "emb.yaml")
    est = estimate_run(resolve_run(models / arch, recipe), probe=False)
    result = quantize(models / arch, recipe, tmp_path / "out")
    stored = result.sizes["stored_bytes"]
    assert abs(est.size["tensor_bytes"] - stored) <= 0.02 * stored
    tying = est.size.get("tying")
    if arch == "llama":
        assert tying is None
    elif case == "shared":
        assert tying["shared"] and tying["untie_bytes"] == 0
    else:  # the head keeps its float copy: 256 × 64 fp32
        assert not tying["shared"] and tying["untie_bytes"] == 256 * 64 * 4


def test_error_feedback_adds_the_float_stream(models, tmp_path):
    recipe = tmp_path / "ef.yaml"
    recipe.write_text("mpq_recipe: 1\ndefaults:\n  algorithm: gptq\n"
                      "  options: {error_feedback: true}\nrules:\n  - targets: [Linear]\n"
                      "    weights: {bits: 4, group_size: 32}\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text(recipe.read_text().replace("{error_feedback: true}", "{}"))
    runs = {name: estimate_run(resolve_run(models / "llama", str(path),
                                           RunOptions(calibration=_calib(models))), probe=False)
            for name, path in (("plain", plain), ("feedback", recipe))}
    for part in ("activations", "statistics"):
        assert runs["feedback"].memory[part] > runs["plain"].memory[part], part

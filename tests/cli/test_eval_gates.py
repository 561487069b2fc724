"""Eval gates fail on figures that are not finite (and --json stays valid JSON); windows fit the model."""
from __future__ import annotations

import json
import math

from safetensors import safe_open
from safetensors.torch import save_file

from mpq.cli.eval_cmd import check_gates
from mpq.quantize import quantize
from tests.helpers import run_cli, write_tokenizer
from tests.tiny_models import save_tiny_model


def test_not_finite_figures_fail_their_gates():
    finite = {"ppl": 10.0, "ref_ppl": 9.9, "kl_mean": 0.01}
    assert check_gates(finite, (0.02, True), 0.1) == []
    for key in ("ppl", "ref_ppl"):
        for bad in (math.nan, math.inf):
            failures = check_gates({**finite, key: bad}, (0.02, True), None)
            assert len(failures) == 1 and "not finite" in failures[0]
    failures = check_gates({**finite, "kl_mean": math.nan}, None, 0.1)
    assert len(failures) == 1 and "not finite" in failures[0]


def test_a_nan_artifact_fails_the_gates_with_valid_json(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    write_tokenizer(tmp_path / "src")
    quantize(tmp_path / "src", "w4a16", tmp_path / "art")
    weights = tmp_path / "art" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["model.layers.0.mlp.down_proj.scale"][0, 0] = math.nan
    save_file(tensors, str(weights), metadata=metadata)
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat " * 200)
    result = run_cli("eval", tmp_path / "art", "--data", data, "--reference", tmp_path / "src",
                     "--num-windows", 1, "--window", 64, "--max-kl", 100, "--max-ppl-delta",
                     "1000%", "--json", "--no-verify")
    assert result.exit_code == 10, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1],
                        parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert record["kl_mean"] is None and record["ppl"] is None
    assert len(record["gates_failed"]) == 2


def test_a_window_beyond_a_learned_position_table_is_a_usage_error(tmp_path):
    save_tiny_model("gpt2", tmp_path / "gpt2")  # n_positions 128
    write_tokenizer(tmp_path / "gpt2")
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat " * 200)
    result = run_cli("eval", tmp_path / "gpt2", "--data", data, "--window", 256)
    assert result.exit_code == 2 and "exceeds the model's maximum of 128 positions" in result.output
    assert run_cli("eval", tmp_path / "gpt2", "--data", data, "--window", 128,
                   "--num-windows", 1).exit_code == 0

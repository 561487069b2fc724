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
    assert result.stderr.strip().splitlines() == [  # one line, the failed gates in it
        "error: gate failed: ppl nan or reference ppl "
        f"{json.loads(result.stdout)['ref_ppl']} is not finite; mean KL nan is not finite (a NaN "
        "or inf figure means the model's outputs are broken: check the artifact with mpq "
        "verify and mpq inspect)"]
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
    assert result.exit_code == 2
    assert result.stderr == ("error: --window 256 exceeds the model's maximum of 128 positions "
                             "(use --window 128 or less)\n")
    assert run_cli("eval", tmp_path / "gpt2", "--data", data, "--window", 128,
                   "--num-windows", 1).exit_code == 0


def test_a_reference_with_another_vocabulary_is_refused_before_running(tmp_path):
    """Token ids of the evaluated model's tokenizer beyond the reference's vocabulary would
    index past its embedding table: refused up front, naming both."""
    import transformers

    from tests.tiny_models import model_from_config

    save_tiny_model("llama", tmp_path / "src")  # vocabulary 256
    write_tokenizer(tmp_path / "src")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, num_hidden_layers=2)
    model_from_config(config).save_pretrained(tmp_path / "small")
    write_tokenizer(tmp_path / "small")
    data = tmp_path / "data.txt"
    data.write_text("café crème brûlée " * 40)  # byte ids above 127
    result = run_cli("eval", tmp_path / "src", "--data", data, "--window", 32,
                     "--reference", tmp_path / "small")
    assert result.exit_code == 4, result.output
    assert result.stderr.startswith(f"error: --reference '{tmp_path / 'small'}' has a "
                                    f"vocabulary of 128 tokens, '{tmp_path / 'src'}' one of 256")

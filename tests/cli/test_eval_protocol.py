"""mpq eval states its protocol (window, stride, BOS) and follows the tokenizer's BOS unless
--bos/--no-bos say otherwise; mpq quantize records the BOS next to the calibration hash."""
from __future__ import annotations


import pytest

from mpq.checkpoint.native import open_artifact
from tests.helpers import BOS_ID, bos_tokenizer, eval_json, run_cli, write_tokenizer
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama twice: with a tokenizer that adds BOS and with the byte tokenizer (none)."""
    root = tmp_path_factory.mktemp("bos")
    save_tiny_model("llama", root / "bos")
    bos_tokenizer().save_pretrained(root / "bos")
    save_tiny_model("llama", root / "plain")
    write_tokenizer(root / "plain")
    data = root / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    return root, data


def test_eval_follows_the_tokenizer_and_states_the_protocol(folders):
    root, data = folders
    with_bos = eval_json(root / "bos", "--data", data, "--window", 64)
    assert with_bos["protocol"] == {"window": 64, "stride": 63, "bos": True,
                                    "bos_token_id": BOS_ID, "numerics": "mpq"}
    assert with_bos["windows"] == 1800 // 63 and with_bos["tokens_scored"] == 28 * 63
    without = eval_json(root / "bos", "--data", data, "--window", 64, "--no-bos")
    assert without["protocol"] == {"window": 64, "stride": 64, "bos": False,
                                   "bos_token_id": None, "numerics": "mpq"}
    assert (without["windows"], without["tokens_scored"]) == (28, 28 * 63)
    assert without["ppl"] != with_bos["ppl"]
    plain = eval_json(root / "plain", "--data", data, "--window", 64, "--stride", 32)
    assert plain["protocol"] == {"window": 64, "stride": 32, "bos": False, "bos_token_id": None,
                                 "numerics": "mpq"}


def test_eval_protocol_in_human_output_and_with_a_reference(folders):
    root, data = folders
    text = run_cli("eval", root / "bos", "--data", data, "--window", 64, "--num-windows", 2)
    assert text.exit_code == 0, text.output
    assert text.stdout.splitlines()[-1] == (
        f"protocol: window 64 (BOS id {BOS_ID} + 63 text tokens), stride 63")
    compared = eval_json(root / "bos", "--data", data, "--reference", root / "bos",
                         "--window", 64, "--num-windows", 2)
    assert compared["protocol"]["bos"] and compared["tokens"] == 2 * 63
    assert compared["kl_mean"] == pytest.approx(0, abs=1e-6)


def test_forced_bos_on_a_tokenizer_without_one_is_refused(folders):
    root, data = folders
    result = run_cli("eval", root / "plain", "--data", data, "--bos")
    assert result.exit_code == 2
    assert result.stderr == (f"error: --bos: the tokenizer of '{root / 'plain'}' has no BOS "
                             "token (leave --bos out (or pass --no-bos) for this model)\n")


def test_quantize_records_the_bos_next_to_the_calibration_hash(folders, tmp_path):
    root, data = folders
    for name, bos in (("bos", BOS_ID), ("plain", None)):
        out = tmp_path / name
        result = run_cli("quantize", root / name, "-r", "w4a16", "-o", out, "--calib", data,
                         "--num-samples", 4, "--seq-len", 32)
        assert result.exit_code == 0, result.output
        calibration = open_artifact(out).json_field("calibration")
        assert calibration.get("bos_token_id") == bos
        shown = run_cli("inspect", out)
        assert (f"each sample begins with BOS (id {BOS_ID})" in shown.stdout) == (bos is not None)
        card = (out / "README.md").read_text()
        assert ("each sample begins with BOS" in card) == (bos is not None)

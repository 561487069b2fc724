"""mpq eval's per-position report: the table, by_position in --json, and --plot."""
from __future__ import annotations

import sys

import pytest
from transformers import LlamaConfig

from tests.helpers import eval_json, run_cli, write_tokenizer
from tests.tiny_models import model_from_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with 4096 positions and the byte tokenizer, and 5000 bytes of text."""
    root = tmp_path_factory.mktemp("long")
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096)
    model_from_config(config).save_pretrained(root / "model")
    write_tokenizer(root / "model")
    data = root / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 112, encoding="utf-8")
    return root, data


def test_json_has_the_buckets_the_window_reaches(folder):
    root, data = folder
    r = eval_json(root / "model", "--data", data, "--window", 2100)
    assert r["windows"] == 2
    buckets = r["by_position"]
    assert [(b["start"], b["end"], b["tokens"]) for b in buckets] == [
        (0, 512, 2 * 511), (512, 2048, 2 * 1536), (2048, 4096, 2 * 52)]
    assert all(set(b) == {"start", "end", "tokens", "nll_mean", "ppl"} for b in buckets)
    assert sum(b["tokens"] for b in buckets) == r["tokens_scored"]
    compared = eval_json(root / "model", "--data", data, "--window", 600,
                         "--reference", root / "model")
    assert [b["start"] for b in compared["by_position"]] == [0, 512]
    assert all(b["kl_mean"] == pytest.approx(0, abs=1e-6) and b["top1_agreement"] == 1.0
               for b in compared["by_position"])


def test_human_output_has_the_table(folder):
    root, data = folder
    out = run_cli("eval", root / "model", "--data", data, "--window", 2100, "--num-windows", 1)
    assert out.exit_code == 0, out.output
    rows = [line for line in out.stdout.splitlines() if "│" in line]
    assert [row.split("│")[1].strip() for row in rows] == ["0–512", "512–2k", "2k–4k"]
    assert [int(row.split("│")[2]) for row in rows] == [511, 1536, 52]
    assert out.stdout.splitlines()[-1].startswith("protocol: window 2100")


def test_plot_is_written(folder, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the mpq[plot] extra)")
    root, data = folder
    png = tmp_path / "positions.png"
    out = run_cli("eval", root / "model", "--data", data, "--window", 600,
                  "--reference", root / "model", "--plot", png)
    assert out.exit_code == 0, out.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert out.stdout.splitlines()[-1] == f"wrote {png}"


def test_plot_without_matplotlib_is_one_error_line(folder, tmp_path, monkeypatch):
    root, data = folder
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    png = tmp_path / "positions.png"
    out = run_cli("eval", root / "model", "--data", data, "--window", 600, "--plot", png)
    assert out.exit_code == 6  # OutputError
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: --plot needs matplotlib, which is not installed "
                      "(pip install 'mpq[plot]' (or pip install matplotlib))"]
    assert not png.exists()

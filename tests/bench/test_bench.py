"""mpq bench (mpq.bench): inputs planned into rows, each row measured (in-process and in a child
process through the CLI), the JSON rows and the table.  No timing is asserted: only that every
figure is there, positive and finite."""
from __future__ import annotations

import json
import math
import sys
import time
import types

import pytest

from mpq.bench import configs, gguf, measure, report
from mpq.bench.configs import Config, Settings
from mpq.errors import ModelError, OptionError
from mpq.quantize import quantize
from tests.helpers import byte_tokenizer, run_cli
from tests.tiny_models import save_tiny_model

SMALL = Settings(threads=1, prompt_tokens=6, new_tokens=4, prefill_tokens=24, batches=(1, 3),
                 repeats=1)
FIGURES = ("decode_tok_s_b1", "decode_tok_s_b3", "prefill_tok_s", "ttft_ms", "peak_rss_mb",
           "rss_after_load_mb")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    save_tiny_model("llama", root / "src")
    byte_tokenizer().save_pretrained(root / "src")
    quantize(root / "src", "w4a16", root / "w4")
    return root / "src", root / "w4"


def check_row(row: dict, batches=(1, 3)) -> None:
    for key in ("model", "threads", "paths", *FIGURES[2:],
                *(f"decode_tok_s_b{b}" for b in batches)):
        assert key in row, key
    for key in (*FIGURES[2:], *(f"decode_tok_s_b{b}" for b in batches)):
        assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_parse_batches_and_baselines():
    assert configs.parse_batches("1, 8") == (1, 8)
    assert configs.parse_baselines("int8,fp32") == ("int8", "fp32")
    assert configs.parse_baselines("none") == ()
    for bad in ("", "1,,8", "0", "2,2", "a"):
        with pytest.raises(OptionError):
            configs.parse_batches(bad)
    for bad in ("fp16", "fp32,fp32", ","):
        with pytest.raises(OptionError):
            configs.parse_baselines(bad)


def test_an_artifact_is_planned_beside_baselines_of_its_recorded_source(folders):
    src, art = folders
    rows, source = configs.plan(str(art), ("fp32", "bf16", "int8"), None)
    assert source.resolve() == src.resolve()
    assert [(r.kind, r.dtype) for r in rows] == [("mpq", "auto"), ("hf", "float32"),
                                                 ("hf", "bfloat16"), ("int8", "auto")]
    assert configs.plan(str(art), (), None) == ([rows[0]], None)


def test_a_model_folder_is_its_own_source(folders):
    src, _ = folders
    rows, source = configs.plan(str(src), ("bf16",), None)
    assert source == src and [(r.kind, r.dtype) for r in rows] == [("hf", "bfloat16")]
    rows, _ = configs.plan(str(src), ("int8",), None)  # its own dtype, then int8
    assert [(r.kind, r.dtype) for r in rows] == [("hf", "auto"), ("int8", "auto")]


def test_a_gguf_file_needs_a_source_for_baselines(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))
    monkeypatch.setattr(configs.importlib.util, "find_spec", lambda name: object())
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(OptionError, match="need the float model the GGUF file came from"):
        configs.plan(str(path), ("fp32",), None)
    rows, source = configs.plan(str(path), ("fp32",), str(folders[0]))
    assert [r.kind for r in rows] == ["gguf", "hf"] and source == folders[0]


def test_a_missing_recorded_source_is_named(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "recorded_source", lambda path: tmp_path / "moved")
    with pytest.raises(ModelError, match="from the artifact's provenance"):
        configs.plan(str(folders[1]), ("fp32",), None)


@pytest.mark.parametrize("load", ["kernels", "decode"])
def test_measure_gives_every_figure(folders, load):
    row = measure.measure(Config("w4", "mpq", str(folders[1]), load=load), SMALL)
    check_row(row)
    assert row["paths"] == ({"int4pack": 14} if load == "kernels" else {"decode": 14})
    assert row["ttft_ms"] == row["ttft_ms_b1"]


def test_measure_a_float_model_in_bf16(folders):
    row = measure.measure(Config("src bf16", "hf", str(folders[0]), "bfloat16"), SMALL)
    check_row(row)
    assert row["dtype"] == "bfloat16" and row["paths"] == {}


def test_gguf_rows_through_the_binding(monkeypatch, tmp_path):
    """The llama.cpp path with a stand-in binding: one token per generate step, batch 1 only."""
    calls = []

    class Llama:
        def __init__(self, model_path, **options):
            calls.append(("init", model_path, options["n_threads"]))

        def n_vocab(self):
            return 50

        def reset(self):
            calls.append(("reset",))

        def eval(self, tokens):
            calls.append(("eval", len(tokens)))
            time.sleep(0.002)

        def generate(self, tokens, **options):
            assert options["top_k"] == 1 and options["temp"] == 0.0
            while True:
                time.sleep(0.002)  # a token's work
                yield 7

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    row = gguf.measure(Config("m", "gguf", str(tmp_path / "m.gguf")), SMALL)
    check_row(row, batches=(1,))
    assert row["decode_tok_s_b3"] is None and row["ttft_ms_b3"] is None
    assert ("eval", SMALL.prefill_tokens) in calls and calls[0][2] == SMALL.threads


def test_cli_json_rows_and_table(folders):
    _, art = folders
    args = ["bench", art, "--baselines", "int8", "--threads", "1", "--prompt-tokens", "6",
            "--new-tokens", "4", "--prefill-tokens", "24", "--batch", "1,3", "--repeats", "1"]
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [row["model"] for row in rows] == ["w4 (kernels)", "src int8 weight-only (kernels)"]
    for row in rows:
        check_row(row)
    assert rows[0]["paths"] == {"int4pack": 14} and rows[1]["paths"] == {"int8pack": 14}
    table = report.markdown_table(rows, SMALL)
    assert table.count("\n") == 2 + len(rows) - 1 and "int8pack 14" in table

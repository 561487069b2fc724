"""Calibration sources: every loader on small real files, format detection, bad inputs."""
from __future__ import annotations

import json
import time

import pytest

from mpq.calibration.sources import SOURCES, detect_source, load_documents, read_text_file
from mpq.errors import CalibrationError


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


DOCS = ["First document, line one.\nline two.", "Second document.", "Third one here."]


def test_text_paragraph_blocks(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First document, line one.\nline two.\n\n\nSecond document.\n  \r\nThird one here.\n\n",
                    encoding="utf-8")
    assert detect_source(str(path)) == ("text", str(path))
    assert load_documents(str(path)) == ("text", DOCS)


def test_text_without_blank_lines_is_one_document_per_line(tmp_path):
    path = tmp_path / "lee.md"
    path.write_text("article one\narticle two\r\narticle three\n", encoding="utf-8")
    assert load_documents(str(path))[1] == ["article one", "article two", "article three"]


def test_text_bom_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffhello\n".encode("utf-8"))
    assert read_text_file(path) == "hello\n"


def test_jsonl_custom_field_skips_blank_lines_and_empty_docs(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)]
    path.write_text("\n".join([lines[0], "", lines[1], json.dumps({"body": "  "}), lines[2]]) + "\n",
                    encoding="utf-8")
    assert load_documents(str(path), field="body") == ("jsonl", DOCS)


def test_json_array(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"text": d} for d in DOCS]), encoding="utf-8")
    assert load_documents(str(path)) == ("jsonl", DOCS)


@pytest.mark.parametrize("line, match", [
    ("not json", r"c\.jsonl:2: not valid JSON"),
    ('{"other": "x"}', r"c\.jsonl:2: no field 'text' \(keys: other\)"),
    ('{"text": 3}', r"c\.jsonl:2: field 'text' is int"),
    ("[1, 2]", r"c\.jsonl:2: no field 'text'"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, match):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=match):
        load_documents(str(path))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": DOCS[:1] + [None] + DOCS[1:], "n": [1, 2, 3, 4]}), path,
                   row_group_size=2)
    assert load_documents(str(path), field="content") == ("parquet", DOCS)
    with pytest.raises(CalibrationError, match="no column 'text'.*columns: content, n"):
        load_documents(str(path))
    with pytest.raises(CalibrationError, match="int64 values|int values"):
        load_documents(str(path), field="n")


def test_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(single))
    assert load_documents(str(single)) == ("disk", DOCS)

    both = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"t": DOCS}),
        "validation": datasets.Dataset.from_dict({"t": ["held out"]}),
    }).save_to_disk(str(both))
    assert detect_source(str(both)) == ("disk", str(both))
    assert load_documents(str(both), field="t")[1] == DOCS
    assert load_documents(str(both), field="t", split="validation")[1] == ["held out"]
    with pytest.raises(CalibrationError, match="no split 'test'.*train, validation"):
        load_documents(str(both), field="t", split="test")


def test_hub_offline_fails_fast_without_network(monkeypatch):
    def no_network(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("load_dataset called in offline mode")

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    assert detect_source("hf:wikitext:wikitext-2-raw-v1") == ("hub", "wikitext:wikitext-2-raw-v1")
    start = time.monotonic()
    with pytest.raises(CalibrationError, match="offline.*pass a local file"):
        load_documents("hf:wikitext:wikitext-2-raw-v1")
    assert time.monotonic() - start < 5


def test_hub_connection_error_becomes_calibration_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def unreachable(name, config=None, split=None):
        calls.append((name, config, split))
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(CalibrationError, match="not reachable; pass a local file"):
        load_documents("hf:wikitext:wikitext-2-raw-v1")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train")]


def test_hub_with_stubbed_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config=None, split=None: datasets.Dataset.from_dict({"text": DOCS}))
    assert load_documents("hf:some/set", split="train[:3]") == ("hub", DOCS)


def test_explicit_loader_prefix(tmp_path):
    path = tmp_path / "corpus.cor"
    path.write_text("a\n\nb\n", encoding="utf-8")
    assert detect_source(f"text:{path}") == ("text", str(path))
    assert load_documents(f"text:{path}")[1] == ["a", "b"]
    with pytest.raises(CalibrationError, match="cannot tell the format.*'.cor'"):
        detect_source(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="calibration file .*nope.txt does not exist") as info:
        detect_source(str(tmp_path / "nope.txt"))
    assert "hf:NAME" in info.value.hint


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(CalibrationError, match="not a datasets save_to_disk folder"):
        detect_source(str(tmp_path))


def test_unreadable_path(tmp_path):
    with pytest.raises(CalibrationError, match="cannot read calibration file"):
        load_documents(f"text:{tmp_path}")


@pytest.mark.parametrize("content", [b"", b"  \n\n \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "e.txt"
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match="contains no text"):
        load_documents(str(path))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_names_byte_offset(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    good = b'{"text": "fine"}\n' if suffix == ".jsonl" else b"fine text\n"
    path.write_bytes(good + b'{"text": "caf\xe9"}\n')
    offset = len(good) + len(b'{"text": "caf')
    with pytest.raises(CalibrationError, match=f"not valid UTF-8: byte 0xe9 at byte offset {offset}"):
        load_documents(str(path))


def test_registry_lists_loaders():
    assert list(SOURCES) == ["disk", "hub", "jsonl", "parquet", "text"]

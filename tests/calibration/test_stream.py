"""The reading budget: a source is tokenized only as far as the run needs; small sources give the
samples of a whole read; the provenance says when a source was cut."""
from __future__ import annotations

import json

import pytest
import torch

from mpq.calibration import CalibrationOptions, build_calibration_set, reading, stream
from mpq.calibration.dataset import _draw, token_sha256
from mpq.calibration.sources import load_documents, read_text_file
from mpq.errors import CalibrationError
from tests.calibration.test_dataset import doc, make_tokenizer

CUT_KEYS = {"read_to_end", "read_budget_tokens", "read_characters"}


def whole_read_sha256(path, tokenizer, mode, num_samples, seq_len, seed, use_eos=False):
    """The samples' hash as computed before the budget: every document read and tokenized."""
    docs = load_documents(str(path))[1]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    if mode == "concat":
        sep = [tokenizer.eos_token_id] if use_eos else tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        joined = []
        for i, one in enumerate(ids):
            joined += (sep if i else []) + one
        candidates = [joined[k * seq_len:(k + 1) * seq_len] for k in range(len(joined) // seq_len)]
    else:
        candidates = [one[:seq_len] for one in ids if len(one) >= min(16, seq_len)]
    picked = _draw(len(candidates), num_samples, seed)
    return token_sha256([torch.tensor([candidates[i]]) for i in picked])


@pytest.fixture
def small_pieces(monkeypatch):
    """Tiny chunk, part and batch sizes: every document of the tests below comes in many parts."""
    monkeypatch.setattr(reading, "CHUNK_BYTES", 64)
    monkeypatch.setattr(reading, "PIECE_CHARS", 50)
    monkeypatch.setattr(stream, "TOKENIZE_CHARS", 50)


@pytest.mark.parametrize("layout", ["paragraphs", "lines", "late_blank_line"])
@pytest.mark.parametrize("mode", ["concat", "document"])
def test_small_source_gives_the_samples_of_a_whole_read(tmp_path, small_pieces, layout, mode):
    docs = [doc(i, 5 + (i * 7) % 40) for i in range(60)]
    text = {"paragraphs": "\n\n".join(docs), "lines": "\n".join(docs),
            "late_blank_line": "\n".join(docs) + "\n\nlast w1 w2"}[layout]
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    tok = make_tokenizer()
    for seed in (0, 1):
        cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=5, seq_len=16,
                                                      seed=seed, mode=mode), tok)
        assert cs.sha256 == whole_read_sha256(path, tok, mode, 5, 16, seed)
        assert not CUT_KEYS & set(cs.provenance)


def _long_line(path, words: int, tail: bytes = b"") -> int:
    """One line of ``words`` words (one token each), then ``tail``; returns the file size."""
    line = " ".join(f"w{i % 40}" for i in range(words)).encode()
    path.write_bytes(line + tail)
    return len(line) + len(tail)


def test_large_single_line_is_read_only_to_the_budget(tmp_path):
    """Default sizes: a 12 MB one-line file whose end is not UTF-8; the run needs 2 x 16 tokens."""
    path = tmp_path / "big.txt"
    size = _long_line(path, 3_000_000, tail=b" caf\xe9 w1")
    with pytest.raises(CalibrationError, match="not valid UTF-8"):  # a whole read fails
        read_text_file(path)
    cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=2, seq_len=16),
                               make_tokenizer())
    p = cs.provenance
    assert len(cs) == 2 and p["read_to_end"] is False
    assert p["read_budget_tokens"] == stream.MIN_READ_TOKENS and p["documents"] == 1
    assert p["corpus_tokens"] >= stream.MIN_READ_TOKENS
    assert p["read_characters"] < 0.5 * size  # about 4 MB of 12 MB
    json.dumps(p)


def test_budget_grows_with_the_samples_and_cuts_concat_stream(tmp_path, small_pieces, monkeypatch):
    monkeypatch.setattr(stream, "MIN_READ_TOKENS", 64)
    path = tmp_path / "line.txt"
    _long_line(path, 20_000, tail=b" \xff")
    cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=3, seq_len=8),
                               make_tokenizer())
    assert cs.provenance["read_budget_tokens"] == 16 * 3 * 8
    # the candidates are the first 384 tokens' 48 chunks: w0..w39 repeating
    expected = [[2 + (k * 8 + j) % 40 for j in range(8)] for k in range(48)]
    assert all(s[0].tolist() in expected for s in cs.samples)


def test_document_mode_cut_keeps_the_documents_up_to_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "MIN_READ_TOKENS", 64)
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": doc(i, 30)}) for i in range(300)] + ["not json"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=1, seq_len=20,
                                                  mode="document"), make_tokenizer())
    p = cs.provenance
    assert p["read_to_end"] is False and p["read_budget_tokens"] == 320
    assert p["documents"] < 300  # the bad last line was never parsed
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_documents(str(path))


def test_source_ending_at_the_budget_is_read_to_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "MIN_READ_TOKENS", 64)
    path = tmp_path / "exact.txt"
    _long_line(path, 16 * 2 * 8)  # exactly the budget of 2 samples of 8 tokens
    cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=2, seq_len=8),
                               make_tokenizer())
    assert not CUT_KEYS & set(cs.provenance)
    assert cs.provenance["corpus_tokens"] == 256

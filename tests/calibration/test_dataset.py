"""build_calibration_set: shapes per mode, determinism and hash, seeds, too little text."""
from __future__ import annotations

import hashlib
import json
import logging
import struct

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mpq.calibration import CalibrationOptions, CalibrationSet, build_calibration_set
from mpq.calibration.dataset import token_sha256
from mpq.errors import CalibrationError

WORDS = [f"w{i}" for i in range(40)]


def make_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one token per whitespace-separated word w0..w39, id = index + 2."""
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"eos_token": "</s>"} if eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **kwargs)


def doc(i: int, n: int) -> str:
    """Document i: n words, w(i), w(i+1), ... (mod 40)."""
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


@pytest.fixture
def corpus(tmp_path):
    """20 documents of 30 words (= 30 tokens) and 5 of 4 words, blank-line separated."""
    docs = [doc(i, 30) for i in range(20)] + [doc(i, 4) for i in range(5)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


def test_concat_shapes_and_provenance(corpus):
    tok = make_tokenizer()
    cs = build_calibration_set(CalibrationOptions(source=corpus, num_samples=8, seq_len=16, seed=0), tok)
    assert isinstance(cs, CalibrationSet) and len(cs) == 8
    assert all(s.shape == (1, 16) and s.dtype == torch.long for s in cs.samples)
    # paragraphs of a text file are joined with the tokens of "\n\n", which this word-level
    # tokenizer drops: they abut (EOS separates records only; see the jsonl test)
    stream_len = 20 * 30 + 5 * 4
    p = cs.provenance
    assert p["corpus_tokens"] == stream_len
    assert p["num_samples"] == 8 and p["requested_samples"] == 8 and p["total_tokens"] == 128
    assert (p["loader"], p["mode"], p["seq_len"], p["seed"], p["documents"]) == ("text", "concat", 16, 0, 25)
    assert p["field"] is None and p["sha256"] == cs.sha256 == token_sha256(cs.samples)
    json.dumps(p)  # provenance is JSON-serialisable
    # samples are chunks of the stream, in stream order
    stream = []
    for i, ids in enumerate(tok([doc(i, 30) for i in range(20)] + [doc(i, 4) for i in range(5)],
                                add_special_tokens=False)["input_ids"]):
        stream += ids
    chunks = [stream[k * 16:(k + 1) * 16] for k in range(len(stream) // 16)]
    positions = [chunks.index(s[0].tolist()) for s in cs.samples]
    assert positions == sorted(positions)


def test_concat_without_eos_joins_with_newlines(corpus):
    tok = make_tokenizer(eos=False)  # "\n\n" gives no word-level token: documents simply abut
    cs = build_calibration_set(CalibrationOptions(source=corpus, num_samples=4, seq_len=16), tok)
    assert cs.provenance["corpus_tokens"] == 20 * 30 + 5 * 4
    assert all(1 not in s[0].tolist() for s in cs.samples)


def test_document_mode_truncates_and_drops_short_documents(corpus):
    cs = build_calibration_set(CalibrationOptions(source=corpus, num_samples=50, seq_len=24, mode="document", seed=1), make_tokenizer())
    assert len(cs) == 20  # the five 4-token documents are below the 16-token floor
    assert all(s.shape == (1, 24) for s in cs.samples)
    assert 1 not in torch.cat(cs.samples, dim=1).tolist()[0]  # no separators in document mode
    long_docs = build_calibration_set(CalibrationOptions(source=corpus, num_samples=3, seq_len=64, mode="document"), make_tokenizer())
    assert [s.shape for s in long_docs.samples] == [(1, 30)] * 3


def test_same_inputs_same_samples_and_hash(corpus):
    tok = make_tokenizer()
    a = build_calibration_set(CalibrationOptions(source=corpus, num_samples=6, seq_len=16, seed=3), tok)
    b = build_calibration_set(CalibrationOptions(source=corpus, num_samples=6, seq_len=16, seed=3), make_tokenizer())
    assert a.sha256 == b.sha256
    assert all(torch.equal(x, y) for x, y in zip(a.samples, b.samples))


def test_seed_changes_samples_and_hash(corpus):
    tok = make_tokenizer()
    a = build_calibration_set(CalibrationOptions(source=corpus, num_samples=6, seq_len=16, seed=0), tok)
    b = build_calibration_set(CalibrationOptions(source=corpus, num_samples=6, seq_len=16, seed=1), tok)
    assert a.sha256 != b.sha256
    assert [s.tolist() for s in a.samples] != [s.tolist() for s in b.samples]


def test_hash_definition():
    samples = [torch.tensor([[1, 2, 3]]), torch.tensor([[7]])]
    h = hashlib.sha256()
    h.update(struct.pack("<qq", 1, 3) + struct.pack("<3q", 1, 2, 3))
    h.update(struct.pack("<qq", 1, 1) + struct.pack("<q", 7))
    assert token_sha256(samples) == h.hexdigest()
    assert token_sha256(samples[::-1]) != h.hexdigest()


def test_too_few_chunks_uses_what_exists_and_warns(corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="mpq.calibration.dataset"):
        cs = build_calibration_set(CalibrationOptions(source=corpus, num_samples=100, seq_len=128), make_tokenizer())
    assert len(cs) == 620 // 128 == cs.provenance["num_samples"]
    assert cs.provenance["requested_samples"] == 100
    assert "only 4 samples of 100 requested" in caplog.text


def test_no_chunk_at_all_is_an_error(corpus):
    with pytest.raises(CalibrationError, match="too short: 620 tokens, fewer than one sample"):
        build_calibration_set(CalibrationOptions(source=corpus, num_samples=4, seq_len=1000), make_tokenizer())


def test_document_mode_without_long_documents_is_an_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("w1 w2\n\nw3 w4 w5\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="no document with at least 16 tokens"):
        build_calibration_set(CalibrationOptions(source=str(path), mode="document"), make_tokenizer())


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "concatenate"}, "unknown calibration mode 'concatenate'.*did you mean 'concat'"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1"),
    ({"seq_len": 1}, "seq_len must be an integer >= 2"),
])
def test_bad_arguments(corpus, kwargs, match):
    with pytest.raises(CalibrationError, match=match):
        build_calibration_set(CalibrationOptions(source=corpus, **kwargs), make_tokenizer())


def test_jsonl_field_in_provenance(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": doc(i, 30)}) for i in range(4)), encoding="utf-8")
    cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=2, seq_len=16, field="body"), make_tokenizer())
    assert (cs.provenance["loader"], cs.provenance["field"]) == ("jsonl", "body")


def test_concat_joins_records_with_eos(tmp_path):
    tok = make_tokenizer()
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc(i, 30)}) + "\n" for i in range(4)))
    cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=100, seq_len=31, seed=0), tok)
    assert cs.provenance["corpus_tokens"] == 4 * 30 + 3
    assert [s[0, 30].item() for s in cs.samples[:3]] == [1, 1, 1]  # EOS after each record

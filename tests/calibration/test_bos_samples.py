"""Calibration samples begin with BOS where the tokenizer adds one; tokenizers without keep theirs."""
from __future__ import annotations

import json

import pytest
from mpq.calibration import CalibrationOptions, build_calibration_set
from mpq.calibration.dataset import token_sha256
from mpq.errors import CalibrationError
from tests.calibration.test_conventions import declared_bos_only
from tests.helpers import BOS_ID, bos_tokenizer, byte_tokenizer

TEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog.\n\n"
               for i in range(40))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def stream_of(path: str) -> list[int]:
    """The concat stream byte_tokenizer gives (paragraphs joined by the tokens of "\\n\\n")."""
    tok = byte_tokenizer()
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for k, para in enumerate(p for p in open(path, encoding="utf-8").read().split("\n\n") if p):
        out += (sep if k else []) + tok(para, add_special_tokens=False)["input_ids"]
    return out


@pytest.mark.parametrize("appends_eos", [False, True])
def test_concat_samples_are_bos_then_seq_len_minus_one_text_tokens(corpus, appends_eos):
    options = CalibrationOptions(source=corpus, num_samples=6, seq_len=32, seed=3)
    cs = build_calibration_set(options, bos_tokenizer(appends_eos=appends_eos))
    stream = stream_of(corpus)
    chunks = [stream[k * 31:(k + 1) * 31] for k in range(len(stream) // 31)]
    assert len(cs) == 6
    for sample in cs.samples:
        ids = sample[0].tolist()
        assert sample.shape == (1, 32) and ids[0] == BOS_ID
        assert ids[1:] in chunks  # then a chunk of the stream, no EOS put at its end
        assert BOS_ID not in ids[1:] and 1 not in ids
    p = cs.provenance
    assert p["bos_token_id"] == BOS_ID and p["seq_len"] == 32 and p["total_tokens"] == 6 * 32
    assert p["sha256"] == token_sha256(cs.samples)  # the hash covers the BOS
    json.dumps(p)


def test_document_samples_are_bos_then_the_document(tmp_path):
    path = tmp_path / "docs.jsonl"
    docs = [f"document {i} " + "x" * (10 + 3 * i) for i in range(8)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    options = CalibrationOptions(source=str(path), num_samples=8, seq_len=24, mode="document")
    cs = build_calibration_set(options, bos_tokenizer())
    tok = byte_tokenizer()
    expected = [[BOS_ID] + tok(d, add_special_tokens=False)["input_ids"][:23] for d in docs]
    assert [s[0].tolist() for s in cs.samples] == expected
    assert cs.provenance["bos_token_id"] == BOS_ID


def test_jsonl_records_keep_eos_between_them(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "abcdefgh" * 3}) + "\n" for _ in range(10)),
                    encoding="utf-8")
    options = CalibrationOptions(source=str(path), num_samples=100, seq_len=26)
    cs = build_calibration_set(options, bos_tokenizer())
    first = cs.samples[0][0].tolist()
    assert first[0] == BOS_ID and first[25] == 1  # 24 text tokens, then the EOS separator


@pytest.mark.parametrize("make", [byte_tokenizer, declared_bos_only])
def test_tokenizers_without_bos_give_the_samples_they_gave_before(corpus, make):
    options = CalibrationOptions(source=corpus, num_samples=6, seq_len=32, seed=3)
    cs = build_calibration_set(options, make())
    stream = stream_of(corpus)
    chunks = [stream[k * 32:(k + 1) * 32] for k in range(len(stream) // 32)]
    assert all(s[0].tolist() in chunks for s in cs.samples)
    assert "bos_token_id" not in cs.provenance
    assert cs.sha256 == build_calibration_set(options, byte_tokenizer()).sha256


def test_too_short_for_one_sample_names_the_bos(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"10 tokens, fewer than one sample of "
                                               r"seq_len=12 \(BOS \+ 11 text tokens\)"):
        build_calibration_set(CalibrationOptions(source=str(path), seq_len=12), bos_tokenizer())
    ok = build_calibration_set(CalibrationOptions(source=str(path), seq_len=11), bos_tokenizer())
    assert ok.samples[0].tolist() == [[BOS_ID] + list(b"abcdefghij")]

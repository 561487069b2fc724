"""The calibration coverage report's data part: script mix, vocabulary share, documents cut in
concat and document mode, sample lengths; the input outlier statistic."""
from __future__ import annotations

import json

import pytest
import torch

from mpq.calibration import CalibrationOptions, build_calibration_set
from mpq.calibration.coverage import (char_script, concat_cuts, longest_sample, script_mix,
                                      vocabulary_seen)
from mpq.engine.stats import InputOutliers
from tests.calibration.test_dataset import doc, make_tokenizer


@pytest.fixture
def corpus(tmp_path):
    """20 documents of 30 words (= 30 tokens) and 5 of 4 words, blank-line separated."""
    docs = [doc(i, 30) for i in range(20)] + [doc(i, 4) for i in range(5)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return str(path)


def test_script_mix_of_latin_cyrillic_and_han():
    shares, characters = script_mix(["Hello мир 你好世界 42!", "ab\n\tЖ"])
    # Latin: Hello ab (7); Cyrillic: мир Ж (4); Han: 你好世界 (4); digits 2; punctuation 1
    assert characters == 18
    assert shares == {"Latin": round(7 / 18, 6), "Cyrillic": round(4 / 18, 6),
                      "Han": round(4 / 18, 6), "digits": round(2 / 18, 6),
                      "punctuation": round(1 / 18, 6)}
    assert list(shares)[:1] == ["Latin"]  # largest first
    assert char_script(" ") is None and char_script("\u3000") is None
    assert char_script("ا") == "Arabic" and char_script("か") == "Kana"
    assert char_script("€") == "punctuation" and char_script("\u0301") == "other"


def test_vocabulary_share():
    seen = vocabulary_seen([torch.tensor([[1, 2, 2, 3]]), torch.tensor([[3, 7]])], 10)
    assert seen == {"distinct_tokens": 4, "vocab_size": 10, "share": 0.4}


def test_report_of_a_calibration_set(corpus):
    tok = make_tokenizer()
    cs = build_calibration_set(CalibrationOptions(source=corpus, num_samples=8, seq_len=16), tok)
    report = cs.coverage
    ids = set(torch.cat(cs.samples, dim=1)[0].tolist())
    assert report["vocabulary"] == {"distinct_tokens": len(ids), "vocab_size": len(tok),
                                    "share": round(len(ids) / len(tok), 6)}
    assert report["samples"] == 8 and report["mode"] == "concat" and report["seq_len"] == 16
    assert report["sample_tokens"] == {"min": 16, "median": 16, "max": 16, "total": 128}
    text = tok.batch_decode([s[0].tolist() for s in cs.samples])
    letters = sum(t.count("w") for t in text)  # every word is "w" and digits
    characters = sum(len(t.replace(" ", "")) for t in text)
    assert report["characters"] == characters
    assert report["scripts"] == {"digits": round((characters - letters) / characters, 6),
                                 "Latin": round(letters / characters, 6)}
    assert report["version"] == 1
    json.dumps(report)


def test_documents_cut_in_concat_mode(corpus):
    # 20 documents of 30 tokens then 5 of 4, abutting (the word-level tokenizer drops "\n\n"):
    # 38 chunks of 16 tokens cover tokens 0..607, i.e. the 20 long documents (each spans two
    # or three chunks) and the short ones at 600 and 604 (inside chunk 37)
    cs = build_calibration_set(CalibrationOptions(source=corpus, num_samples=100, seq_len=16),
                               make_tokenizer())
    assert len(cs) == 38
    assert cs.coverage["documents"] == {"in_samples": 22, "cut": 20}
    # chunks 0 and 37 only: documents 0 and 1 (cut) and the two short ones (whole)
    assert concat_cuts([30 * d for d in range(20)] + [600, 604, 608, 612, 616], 620, 0, 16,
                       [0, 37]) == {"in_samples": 4, "cut": 2}


def test_concat_cuts_leave_the_separator_out():
    # documents of 7 tokens + 1 separator: [0, 7), [8, 15), [16, 23); chunks of 8 tokens
    assert concat_cuts([0, 8, 16], 23, 1, 8, [0, 1, 2]) == {"in_samples": 3, "cut": 0}
    assert concat_cuts([0, 8, 16], 23, 1, 4, [1]) == {"in_samples": 1, "cut": 1}


def test_documents_cut_in_document_mode(corpus):
    options = dict(source=corpus, num_samples=50, mode="document")
    short = build_calibration_set(CalibrationOptions(seq_len=24, **options), make_tokenizer())
    assert short.coverage["documents"] == {"in_samples": 20, "cut": 20}  # 30 tokens > 24
    assert short.coverage["sample_tokens"]["max"] == 24
    whole = build_calibration_set(CalibrationOptions(seq_len=64, **options), make_tokenizer())
    assert whole.coverage["documents"] == {"in_samples": 20, "cut": 0}
    assert whole.coverage["sample_tokens"] == {"min": 30, "median": 30, "max": 30,
                                               "total": 600}


def test_document_mode_counts_a_cut_long_document(tmp_path):
    docs = [doc(0, 20), doc(1, 40), doc(2, 10)]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    cs = build_calibration_set(CalibrationOptions(source=str(path), num_samples=5, seq_len=32,
                                                  mode="document"), make_tokenizer())
    assert cs.coverage["documents"] == {"in_samples": 2, "cut": 1}  # 10 tokens < floor 16
    assert cs.coverage["sample_tokens"] == {"min": 20, "median": 20, "max": 32, "total": 52}


def test_longest_sample_falls_back_to_the_provenance():
    assert longest_sample({"sample_tokens": {"max": 300}}, {"seq_len": 512}) == 300
    assert longest_sample(None, {"seq_len": 512}) == 512
    assert longest_sample(None, None) is None


def test_input_outliers_statistic():
    torch.manual_seed(0)
    x = torch.randn(3000, 32)
    x[5, 3] = 40.0  # one outlier
    collector = InputOutliers()
    for part in x.split(700):
        collector.add(part.reshape(1, -1, 32))
    tokens, absmax, p99, p999, kurtosis = collector.result().tolist()
    flat = x.flatten().double()
    assert tokens == 3000 and absmax == 40.0
    for got, q in ((p99, 0.99), (p999, 0.999)):
        exact = float(flat.abs().quantile(q))
        assert exact <= got <= exact * 1.0625  # a bin's upper edge: 16 bins per octave
    centred = flat - flat.mean()
    expected = float((centred ** 4).mean() / (centred ** 2).mean() ** 2)
    assert abs(kurtosis - expected) < 1e-6 * expected and kurtosis > 3.5

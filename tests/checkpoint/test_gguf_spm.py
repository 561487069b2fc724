"""SentencePiece-style BPE recognised from tokenizer.json: what it lacks when it is not, the space
prefix llama.cpp adds, and the merge-rank scores."""
from __future__ import annotations

from mpq.checkpoint.gguf_spm import adds_space_prefix, merge_gaps, merge_scores, spm_problem

SPACE = "\u2581"
REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
DECODER = {"type": "Sequence", "decoders": []}


def bpe(**parts) -> dict:
    return {"model": {"type": "BPE", "byte_fallback": True, "merges": []}, "decoder": DECODER,
            **parts}


def test_what_a_sentencepiece_style_bpe_needs():
    assert spm_problem(bpe(normalizer=REPLACE)) is None
    assert spm_problem(bpe(pre_tokenizer={"type": "Metaspace", "replacement": SPACE,
                                          "prepend_scheme": "first"})) is None
    assert spm_problem(bpe(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SPACE}, REPLACE]})) is None
    no_space = spm_problem(bpe(pre_tokenizer={"type": "Whitespace"}))
    assert "it lacks spaces written as '▁'" in no_space
    data = bpe(normalizer=REPLACE, decoder={"type": "ByteLevel"})
    data["model"]["byte_fallback"] = False
    assert "it lacks byte_fallback, a Sequence decoder;" in spm_problem(data)


def test_space_prefix():
    assert adds_space_prefix(bpe(normalizer=REPLACE)) is False  # Gemma
    assert adds_space_prefix(bpe(normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": SPACE}, REPLACE]})) is True  # Llama 2 (tokenizers < 0.14)
    for scheme, prefix in (("first", True), ("always", True), ("never", False)):
        data = bpe(pre_tokenizer={"type": "Metaspace", "replacement": SPACE,
                                  "prepend_scheme": scheme})
        assert adds_space_prefix(data) is prefix, scheme
    assert adds_space_prefix(bpe(pre_tokenizer={"type": "Metaspace", "replacement": SPACE,
                                                "add_prefix_space": False})) is False


def test_merge_scores_rank_the_first_merge_of_each_token():
    data = bpe(normalizer=REPLACE)
    data["model"]["merges"] = ["e r", ["t", "h"], "th e", "t he", "h e"]  # both spellings
    assert merge_scores(data) == {"er": 0.0, "th": -1.0, "the": -2.0, "he": -4.0}


def test_merge_gaps_are_tokens_joined_without_a_rule():
    data = bpe(normalizer=REPLACE)
    data["model"]["vocab"] = {c: i for i, c in enumerate(["t", "h", "e", "th", "he", "the"])}
    data["model"]["merges"] = ["t h", "th e", "h e"]
    assert merge_gaps(data) == ["the"]  # t + he is no rule
    data["model"]["merges"].append(["t", "he"])
    assert merge_gaps(data) == []

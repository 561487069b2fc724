"""llama.cpp's pre-tokenizer names and tokenizer models recognised from tokenizer.json, and what
is refused."""
from __future__ import annotations

import json

from mpq.checkpoint.gguf_tokenizer import (pre_tokenizer_name, tokenizer_model,
                                           tokenizer_problems)

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


def split_then_byte_level(pattern: str) -> dict:
    return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"},
        {**BYTE_LEVEL, "use_regex": False}]}}


def test_pre_tokenizer_names():
    assert pre_tokenizer_name({"pre_tokenizer": BYTE_LEVEL}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}}) == "smollm"
    assert pre_tokenizer_name(split_then_byte_level(LLAMA3)) == "llama-bpe"
    assert pre_tokenizer_name(split_then_byte_level(QWEN2)) == "qwen2"
    assert pre_tokenizer_name(split_then_byte_level(r"\w+")) is None
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) is None
    assert pre_tokenizer_name({"pre_tokenizer": None}) is None


def test_tokenizer_problems(tmp_path):
    writes = "byte-level and SentencePiece-style BPE tokenizers"
    assert tokenizer_problems({}) == [f"no tokenizer.json (format 'gguf' writes {writes} from "
                                      "tokenizer.json)"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "Unigram"}}))
    assert tokenizer_problems({"tokenizer.json": path}) == [
        f"a Unigram tokenizer (format 'gguf' writes {writes} only)"]
    path.write_text(json.dumps({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Metaspace"},
                                "decoder": {"type": "Sequence"}}))
    assert tokenizer_problems({"tokenizer.json": path}) == [
        "a BPE tokenizer that is neither byte-level nor SentencePiece-style (it lacks "
        f"byte_fallback; format 'gguf' writes {writes} only)"]
    path.write_text(json.dumps({"model": {"type": "BPE"}, "pre_tokenizer": BYTE_LEVEL}))
    assert tokenizer_problems({"tokenizer.json": path}) == []
    assert tokenizer_model({"model": {"type": "BPE"}, "pre_tokenizer": BYTE_LEVEL}) == "gpt2"


def test_sentencepiece_style_bpe_is_the_llama_model(tmp_path):
    from tests.helpers import spm_tokenizer

    spm_tokenizer().save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    assert tokenizer_problems({"tokenizer.json": path}) == []
    assert tokenizer_model(json.loads(path.read_text())) == "llama"

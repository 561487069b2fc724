"""The model's tokenizer as GGUF ``tokenizer.ggml.*`` metadata, from ``tokenizer.json``: byte-level
BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2 …) as llama.cpp's ``gpt2`` tokenizer model, and
SentencePiece-style BPE tokenizers (Gemma, Llama 2: byte fallback, spaces as "▁") as its
``llama`` model (mpq.checkpoint.gguf_spm: tokens, scores, types, add_space_prefix).  Byte-level:

- tokens: id → token string for every id below the config's ``vocab_size`` (ids the tokenizer
  lacks become ``[PAD<id>]``, type UNUSED), types CONTROL for special added tokens,
  USER_DEFINED for other added tokens, NORMAL otherwise (as llama.cpp's converter does);
- merges through the ``gguf`` package's ``SpecialVocab``;
- ``tokenizer.ggml.pre``, llama.cpp's pre-tokenizer, recognised from ``tokenizer.json``'s
  ``pre_tokenizer`` (:func:`pre_tokenizer_name`); an unrecognised one is written as ``default``
  and the writer's pre-flight warns that llama.cpp may split text differently.

Both: special token ids, add-BOS/EOS flags and the chat template through ``SpecialVocab``;
whether the tokenizer puts a BOS first is then read from the tokenizer itself
(mpq.calibration.conventions), which overrides what its files claim.  Other tokenizers are
refused.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from mpq.checkpoint.gguf_spm import adds_space_prefix, spm_problem, spm_vocab
from mpq.errors import FormatError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "added_tokens.json")


def read_tokenizer_json(files: Mapping[str, Path | str]) -> dict[str, Any] | None:
    """The parsed ``tokenizer.json`` among the artifact's side ``files`` (None when absent)."""
    src = files.get("tokenizer.json")
    if src is None:
        return None
    text = src.read_text(encoding="utf-8") if isinstance(src, Path) else src
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"tokenizer.json is not valid JSON ({exc})") from None


WRITES = "byte-level and SentencePiece-style BPE tokenizers"


def tokenizer_model(data: Mapping[str, Any]) -> str | None:
    """llama.cpp's tokenizer model for ``tokenizer.json`` ``data``: ``gpt2`` (byte-level BPE),
    ``llama`` (SentencePiece-style BPE) or None (neither)."""
    if (data.get("model") or {}).get("type") != "BPE":
        return None
    if _has(data.get("pre_tokenizer"), "ByteLevel"):
        return "gpt2"
    return "llama" if spm_problem(data) is None else None


def tokenizer_problems(files: Mapping[str, Path | str]) -> list[str]:
    """Why the tokenizer among ``files`` cannot be written as GGUF metadata (empty: it can)."""
    data = read_tokenizer_json(files)
    if data is None:
        return [f"no tokenizer.json (format 'gguf' writes {WRITES} from tokenizer.json)"]
    kind = (data.get("model") or {}).get("type")
    if kind != "BPE":
        return [f"a {kind} tokenizer (format 'gguf' writes {WRITES} only)"]
    if tokenizer_model(data) is None:
        return [spm_problem(data)]
    return []


def _has(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == kind:
            return True
        return any(_has(v, kind) for v in node.get("pretokenizers", []) or [])
    return False


def _split_patterns(node: Any) -> list[str]:
    if not isinstance(node, dict):
        return []
    out = []
    if node.get("type") == "Split":
        out.append(str((node.get("pattern") or {}).get("Regex", "")))
    for child in node.get("pretokenizers", []) or []:
        out.extend(_split_patterns(child))
    return out


def pre_tokenizer_name(data: Mapping[str, Any]) -> str | None:
    """llama.cpp's name of the pre-tokenizer of ``tokenizer.json`` ``data``, or None when not
    recognised: ByteLevel alone (its own regex) is ``gpt-2``; individual digits then ByteLevel is
    ``smollm``; a Split regex taking digits in runs of up to three (Llama 3's) is
    ``llama-bpe``, one taking single digits with an optional leading non-letter (Qwen2's) is
    ``qwen2``."""
    pre = data.get("pre_tokenizer")
    if not isinstance(pre, dict) or not _has(pre, "ByteLevel"):
        return None
    patterns = _split_patterns(pre)
    digits = _has(pre, "Digits")
    if not patterns:
        return "smollm" if digits else "gpt-2"
    if len(patterns) == 1 and not digits:
        pattern = patterns[0]
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" in pattern:
            return "qwen2"
    return None


def _materialize(files: Mapping[str, Path | str], folder: Path) -> None:
    for name in TOKENIZER_FILES:
        src = files.get(name)
        if isinstance(src, Path):
            shutil.copyfile(src, folder / name)
        elif isinstance(src, str):
            (folder / name).write_text(src, encoding="utf-8")


def add_tokenizer(writer, files: Mapping[str, Path | str], vocab_size: int) -> None:
    """Write the tokenizer among ``files`` into ``writer`` (a gguf.GGUFWriter)."""
    import gguf
    from transformers import AutoTokenizer

    from mpq.calibration.conventions import token_conventions

    data = read_tokenizer_json(files)
    problems = tokenizer_problems(files)
    if problems:
        raise FormatError(f"format 'gguf' cannot write the tokenizer: {problems[0]}")
    with tempfile.TemporaryDirectory(prefix="mpq-gguf-tok-") as tmp:
        folder = Path(tmp)
        _materialize(files, folder)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = tokenizer_model(data)
        if model == "llama":
            tokens, scores, types = spm_vocab(folder, data, vocab_size)
        special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=vocab_size)
    if model == "gpt2":
        tokens, types = _byte_level_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(data) or "default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(adds_space_prefix(data))
    conventions = token_conventions(tokenizer)
    special.add_special_token["bos"] = conventions.bos_id is not None
    special.add_special_token["eos"] = conventions.appends_eos
    special.add_to_gguf(writer, quiet=True)


def _byte_level_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token]
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types

"""SentencePiece-style BPE tokenizers as GGUF metadata: llama.cpp's ``llama`` tokenizer model.

Gemma, Llama 2 and Mistral ship ``tokenizer.json`` with a BPE model that falls back to byte
tokens (``<0x41>``) and writes spaces as "▁" (a ``Replace`` normalizer or a ``Metaspace``
pre-tokenizer).  llama.cpp runs such a vocabulary with its SentencePiece tokenizer, which needs
per-token scores and types:

- tokens and types come from the ``gguf`` package's reader of that kind of file
  (``gguf.vocab.LlamaHfVocab``: BYTE for ``<0xNN>``, CONTROL for special ids, USER_DEFINED for
  other added tokens), with every added token of ``tokenizer.json`` typed by its own ``special``
  flag (CONTROL or USER_DEFINED) as llama.cpp's converter does; ids the tokenizer lacks below the
  config's ``vocab_size`` become ``[PAD<id>]``, type UNUSED;
- scores: LlamaHfVocab gives every token the same placeholder score (-1000), but llama.cpp's
  tokenizer merges the adjacent pair whose merged token scores highest, so equal scores merge
  left to right whatever the merge order.  Here a token made by a merge scores -(rank of its
  first merge), which makes llama.cpp merge in the BPE model's order; a token no merge makes
  scores 0 when it is one symbol (a starting piece) and below every merge otherwise (BPE never
  produces it);
- ``add_space_prefix``: whether the tokenizer puts "▁" in front of a text (a ``Prepend``
  normalizer, or a Metaspace pre-tokenizer whose prepend scheme is not ``never``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

SPACE = "\u2581"


def _nodes(node: Any, children: str) -> Iterator[dict]:
    """``node`` and, for a Sequence, its members (depth first)."""
    if isinstance(node, dict):
        yield node
        for child in node.get(children, []) or []:
            yield from _nodes(child, children)


def _normalizers(data: Mapping[str, Any]) -> list[dict]:
    return list(_nodes(data.get("normalizer"), "normalizers"))


def _pre_tokenizers(data: Mapping[str, Any]) -> list[dict]:
    return list(_nodes(data.get("pre_tokenizer"), "pretokenizers"))


def writes_spaces_as_metaspace(data: Mapping[str, Any]) -> bool:
    """Whether ``tokenizer.json`` ``data`` turns spaces into "▁" before its model runs."""
    replaced = any(n.get("type") == "Replace" and n.get("content") == SPACE
                   and (n.get("pattern") or {}).get("String") == " " for n in _normalizers(data))
    metaspace = any(n.get("type") == "Metaspace" and n.get("replacement", SPACE) == SPACE
                    for n in _pre_tokenizers(data))
    return replaced or metaspace


def spm_problem(data: Mapping[str, Any]) -> str | None:
    """Why the BPE tokenizer ``data`` is not SentencePiece-style (None: it is)."""
    model = data.get("model") or {}
    missing = []
    if not model.get("byte_fallback"):
        missing.append("byte_fallback")
    if not writes_spaces_as_metaspace(data):
        missing.append("spaces written as '▁'")
    if (data.get("decoder") or {}).get("type") != "Sequence":
        missing.append("a Sequence decoder")
    if missing:
        return ("a BPE tokenizer that is neither byte-level nor SentencePiece-style (it lacks "
                f"{', '.join(missing)}; format 'gguf' writes byte-level and SentencePiece-style "
                "BPE tokenizers only)")
    return None


def adds_space_prefix(data: Mapping[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" in front of every text (llama.cpp's add_space_prefix)."""
    if any(n.get("type") == "Prepend" and n.get("prepend") == SPACE
           for n in _normalizers(data)):
        return True
    for n in _pre_tokenizers(data):
        if n.get("type") == "Metaspace":
            scheme = n.get("prepend_scheme")
            if scheme is None:  # tokenizers before 0.14
                return bool(n.get("add_prefix_space", True))
            return scheme != "never"
    return False


def merge_scores(data: Mapping[str, Any]) -> dict[str, float]:
    """Score of each token a merge makes: -(rank of its first merge)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate((data.get("model") or {}).get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def merge_gaps(data: Mapping[str, Any]) -> list[str]:
    """Tokens that two vocabulary entries join into without a merge rule for that pair: llama.cpp
    merges any adjacent pair whose text is a token, the BPE model only its rules, so such a
    token can split text differently there (none in a tokenizer converted from SentencePiece,
    whose merges are every such pair)."""
    model = data.get("model") or {}
    vocab = model.get("vocab") or {}
    rules = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
             for m in model.get("merges") or []}
    return [token for token in vocab
            if any(token[:k] in vocab and token[k:] in vocab and (token[:k], token[k:]) not in rules
                   for k in range(1, len(token)))]


def spm_vocab(folder: Path, data: Mapping[str, Any], vocab_size: int
              ) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, GGUF token types) of ids 0 … vocab_size - 1 of the tokenizer saved in
    ``folder`` (its parsed ``tokenizer.json``: ``data``)."""
    import gguf

    vocab = gguf.LlamaHfVocab(folder)
    added = {t["content"]: bool(t.get("special")) for t in data.get("added_tokens") or []}
    merged = merge_scores(data)
    lowest = -float(len(merged) + 1)
    tokens, scores, types = [], [], []
    for text, _placeholder, kind in vocab.all_tokens():
        token = text.decode("utf-8")
        if token in added:
            kind = gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED
        tokens.append(text)
        types.append(int(kind))
        if token in merged:
            scores.append(merged[token])
        else:
            scores.append(0.0 if len(token) == 1 or kind != gguf.TokenType.NORMAL else lowest)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(lowest)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens[:vocab_size], scores[:vocab_size], types[:vocab_size]

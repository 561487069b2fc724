"""The model's tokenizer conventions that calibration and evaluation follow: its BOS token.

Whether a tokenizer adds BOS is read from the tokenizer itself, not from its flags (transformers 5
tokenizers add special tokens through post-processors and templates as often as through
``add_bos_token``): a short probe text is encoded with and without special tokens, and the
tokenizer adds BOS when the first id with them is ``bos_token_id`` and the first without them is
not.  Whether it also appends EOS is read the same way from the last id (Llama 2's does not,
some do): mpq never tokenizes text with special tokens, it puts the BOS id in front itself, so an
EOS the tokenizer would append never ends a calibration sample or an evaluation window.

Where a tokenizer adds BOS, each calibration sample and each evaluation window begins with it
(mpq.calibration.dataset, mpq.analysis.eval), as in the model's training and in lm-eval's and
llama.cpp's perplexity.  Where it adds none (GPT-2, SmolLM2), nothing changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from mpq.errors import OptionError

PROBE = "Hello world. The cat sat on the mat."


@dataclass(frozen=True)
class TokenConventions:
    """What the tokenizer does with special tokens: ``bos_id`` is the BOS id it puts first (None:
    it adds none); ``appends_eos``: it ends an encoded text with its EOS."""

    bos_id: int | None
    appends_eos: bool

    @property
    def prefix(self) -> list[int]:
        """The ids a sample or window begins with: [BOS] or nothing."""
        return [] if self.bos_id is None else [self.bos_id]


def token_conventions(tokenizer) -> TokenConventions:
    """The conventions of ``tokenizer``, read by encoding :data:`PROBE` (module docstring)."""
    with_special = _encode(tokenizer, True)
    plain = _encode(tokenizer, False)
    bos = _int_or_none(getattr(tokenizer, "bos_token_id", None))
    eos = _int_or_none(getattr(tokenizer, "eos_token_id", None))
    adds_bos = (bos is not None and bool(with_special) and with_special[0] == bos
                and (not plain or plain[0] != bos))
    appends_eos = (eos is not None and bool(with_special) and with_special[-1] == eos
                   and (not plain or plain[-1] != eos))
    return TokenConventions(bos_id=bos if adds_bos else None, appends_eos=appends_eos)


def eval_bos(tokenizer, bos: bool | None, where: str = "the model's tokenizer") -> int | None:
    """The BOS id each evaluation window begins with: the tokenizer's convention when ``bos`` is
    None, else forced on (the tokenizer's ``bos_token_id``; OptionError when it has none) or off."""
    if bos is None:
        return token_conventions(tokenizer).bos_id
    if not bos:
        return None
    bos_id = _int_or_none(getattr(tokenizer, "bos_token_id", None))
    if bos_id is None:
        raise OptionError(f"--bos: {where} has no BOS token",
                          hint="leave --bos out (or pass --no-bos) for this model")
    return bos_id


def _encode(tokenizer, special: bool) -> list[int]:
    return list(tokenizer(PROBE, add_special_tokens=special, return_attention_mask=False,
                          verbose=False)["input_ids"])


def _int_or_none(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def bos_note(provenance: dict) -> str:
    """What the calibration provenance says of BOS, for one-line summaries ("" without one)."""
    bos = provenance.get("bos_token_id")
    return "" if bos is None else f", each sample begins with BOS (id {bos})"

"""Tied input embedding and output head: whether a plan keeps them sharing one tensor.

Many small models store one [vocab, hidden] matrix for both the input embedding and the output
head (``tie_word_embeddings``).  When a plan quantizes either of them, :func:`decide_tying`
records what the run does with the pair (a :class:`TieRecord` in the plan, ``tying`` in its
JSON):

* **shared** — both are quantized with one and the same scheme by ``rtn`` (no activation
  statistics, no input activations): one quantized tensor, stored once under the embedding's
  name; the head uses it at load time (mpq.loader);
* **untied** — anything else (different schemes, one side kept in float, an algorithm that
  needs activation statistics, a rotation that must rewrite the two sides differently): the
  head gets a copy of its own (mpq.models.layout.untie_head), at the byte cost the coverage
  account (mpq.models.coverage) and ``--dry-run`` sizes report.

A plan that quantizes neither side records nothing: the pair stays tied, as it always was.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

SHARED_ALGORITHMS = ("rtn",)  # the same weight always gives the same codes, whichever user


@dataclass(frozen=True)
class TieRecord:
    """The tied pair's fate under a plan (module docstring)."""

    embedding: str
    head: str
    shared: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TieRecord":
        return cls(embedding=str(data["embedding"]), head=str(data["head"]),
                   shared=bool(data["shared"]), reason=str(data["reason"]))


def decide_tying(embedding: str, head: str, embedding_scheme, head_scheme, *,
                 rotated: bool = False) -> TieRecord | None:
    """What happens to the tied pair ``embedding`` / ``head`` (module names) given the schemes
    the plan gives them (None: kept in float); None when neither side is quantized."""
    if embedding_scheme is None and head_scheme is None:
        return None
    if embedding_scheme is None or head_scheme is None:
        quantized = embedding if embedding_scheme is not None else head
        return TieRecord(embedding, head, shared=False,
                         reason=f"only {quantized} is quantized: the other side keeps a float "
                                "copy of its own")
    if rotated:
        reason = "the rotation rewrites the embedding and the head differently"
    elif head_scheme.algorithm not in SHARED_ALGORITHMS:
        reason = (f"the head's algorithm {head_scheme.algorithm} solves its codes from its "
                  "inputs, unlike the embedding's")
    elif embedding_scheme != head_scheme:
        reason = "the embedding and the head have different schemes"
    elif embedding_scheme.input_activations is not None:
        reason = "the head quantizes its input activations"
    else:
        return TieRecord(embedding, head, shared=True,
                         reason="one scheme for both: one quantized tensor, stored once")
    return TieRecord(embedding, head, shared=False, reason=reason)

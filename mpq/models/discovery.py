"""Where mpq's knowledge of one model's architecture comes from, part by part.

Each part the pipelines use comes from the model's family record (mpq.models.families), from
generic discovery (a model type without a record: the blocks are the largest ModuleList of
identical blocks, mpq.models.layout; the KV-cache attention is a module with k_proj/v_proj and a
cache argument, mpq.models.attention), or is unavailable, with the reason (the record's, or the
missing record).  ``mpq plan`` prints the report; ``mpq quantize`` warns when a model runs on
generic discovery, so nothing is quantized on a guess in silence.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mpq.config.plan import Plan
from mpq.errors import ModelError
from mpq.models.attention import attention_modules
from mpq.models.families import family_of
from mpq.models.layout import ModelLayout, blocks_of

RECORD, DISCOVERED, UNAVAILABLE = "record", "discovered", "unavailable"
NO_RECORD = "no family record for this model type"


@dataclass(frozen=True)
class Part:
    """One part: its name, where it comes from (RECORD, DISCOVERED or UNAVAILABLE) and what it
    is (or why it is unavailable)."""

    name: str
    source: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"part": self.name, "source": self.source, "detail": self.detail}


@dataclass(frozen=True)
class ArchitectureReport:
    """The parts of one model (see the module docstring); ``family`` None: no record."""

    model_type: str | None
    family: str | None
    parts: tuple[Part, ...]

    def discovered(self) -> list[Part]:
        return [part for part in self.parts if part.source == DISCOVERED]

    def headline(self) -> str:
        if self.family is not None:
            return f"architecture: model type '{self.model_type}', family record '{self.family}'"
        found = ", ".join(f"{p.name} ({p.detail})" for p in self.discovered()) or "nothing"
        return (f"architecture: model type '{self.model_type}' has no family record; generic "
                f"discovery found {found}")

    def lines(self) -> list[str]:
        """The headline and one line per part."""
        return [self.headline()] + [f"  {p.name}: {p.source}: {p.detail}" for p in self.parts]

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "family": self.family,
                "parts": [part.to_dict() for part in self.parts]}


def architecture_report(model: nn.Module, layout: ModelLayout,
                        plan: Plan | None = None) -> ArchitectureReport:
    """The report for ``model`` (weights may be on meta).  With ``plan``, the scale-group part
    also names the quantized linears of the first block that no scale group reaches."""
    from mpq.transforms.scale_fold import scale_groups

    family = family_of(model)
    model_type = getattr(model.config, "model_type", None)
    block = blocks_of(model, layout)[0]
    source = RECORD if family is not None else DISCOVERED
    how = "" if family is not None else ", the largest list of identical blocks"
    parts = [Part("blocks", source, f"{layout.blocks_path} ({layout.num_blocks}{how})")]

    attention = attention_modules(model, block)
    if attention:
        parts.append(Part("KV-cache attention", source, ", ".join(n for n, _ in attention)))
    else:
        why = family.why_not("attention") if family is not None else (
            "no module with k_proj, v_proj and a KV-cache argument")
        parts.append(Part("KV-cache attention", UNAVAILABLE, why))

    if family is None:
        parts.append(Part("scale groups", UNAVAILABLE, NO_RECORD))
    elif not family.scale_groups:
        parts.append(Part("scale groups", UNAVAILABLE, family.why_not("scale_groups")))
    else:
        try:
            groups = scale_groups(model, block)
        except ModelError as exc:
            groups, detail = [], exc.message
        else:
            detail = "; ".join(str(g) for g in groups) or "none holds for this config"
        reached = {path for group in groups for path in group.linears}
        prefix = f"{layout.blocks_path}.0."
        alone = [layer.name[len(prefix):] for layer in (plan.quantized() if plan else [])
                 if layer.name.startswith(prefix) and layer.name[len(prefix):] not in reached]
        if alone:
            detail += f" (inputs not scaled: {', '.join(alone)})"
        parts.append(Part("scale groups", RECORD if groups else UNAVAILABLE, detail))

    if family is not None and family.rotation is not None:
        readers = ", ".join(norm for norm, _ in family.rotation.readers)
        parts.append(Part("rotation", RECORD, f"QuaRot: norms {readers} fused, residual "
                                              f"writers {', '.join(family.rotation.writers)}, "
                                              f"online R4 at {family.mlp_down}"))
    else:
        why = family.why_not("rotation") if family is not None else NO_RECORD
        parts.append(Part("rotation", UNAVAILABLE, why))

    if family is not None and family.fused:
        parts.append(Part("fused groups", RECORD,
                          "; ".join(" + ".join(group) for group in family.fused)))
    elif family is not None:
        parts.append(Part("fused groups", RECORD, "none: no separate linears that serving "
                                                  "engines run as one GEMM"))
    else:
        parts.append(Part("fused groups", UNAVAILABLE, NO_RECORD))
    return ArchitectureReport(model_type=model_type, family=family.name if family else None,
                              parts=tuple(parts))

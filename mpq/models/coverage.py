"""The parameter account: where every weight byte of a model goes under a plan.

Contract: :func:`account` walks a model (parameters may be on the meta device: no weight is read)
and puts every parameter tensor in exactly one entry, each tensor once even when tied:

* ``quantized`` — the weight of a layer the plan quantizes (the input embedding too, when a
  rule targets it);
* or kept in the source dtype, with a category and the reason:
  ``embedding`` (kept by policy unless a rule targets it) and ``norm`` (kept by policy), ``bias`` (travels with its quantized layer),
  ``head`` (the protected output head), ``router`` (a mixture-of-experts gate, kept by policy for
  routing stability), ``moe-experts`` (fused 3-D expert tensors in a layout mpq cannot plan),
  ``no-rule`` (a Linear no rule matched), ``skipped`` (a rule keeps it) and ``other`` (any other
  module: the reason names its class).

An entry's bytes are numel × the tensor's dtype size (the dtype the run loads the model in).  The
entries sum to :attr:`CoverageAccount.total_bytes`: the model's parameter bytes, a tied tensor
counted once — unless the plan quantizes one of its users and the plan's tie record
(mpq.config.tying) says the pair is untied: then each user has a copy of its own and is counted
(quantized or kept), the extra copy's reason saying so; its bytes are
:attr:`CoverageAccount.untie_bytes` (``untied_bytes`` in the summary, with the tie record).  A
pair that stays tied under one shared scheme is one quantized entry with the head in ``tied``.

:meth:`CoverageAccount.check` is the ``--max-unquantized`` / ``--strict`` gate: a RecipeError
when more than a given share of the bytes would stay unquantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mpq.config.plan import LayerPlan, Plan
from mpq.errors import RecipeError
from mpq.models.layout import LINEAR_CLASSES

QUANTIZED = "quantized"
# the kept categories, and the reason each one prints (where the reason is not per tensor)
POLICY_REASONS = {
    "embedding": "kept by policy: embeddings are table lookups, not matrix products",
    "norm": "kept by policy: normalization weights are small and precision-sensitive",
    "bias": "travels with its quantized layer, in the source dtype",
    "router": "kept by policy: the mixture-of-experts router stays precise for stable routing",
    "moe-experts": "fused 3-D expert tensors in a layout mpq cannot quantize (see "
                   "mpq.models.experts)",
}
STRICT_DEFAULT = 0.5  # --strict alone: refuse when more than half of the weight bytes stay float


@dataclass(frozen=True)
class TensorEntry:
    """One parameter tensor: its name (the first, when tied), shape, bytes, category, reason,
    the plan layer it belongs to (if any) and its other names when tied."""

    name: str
    shape: tuple[int, ...]
    bytes: int
    category: str
    reason: str
    layer: str | None = None
    tied: tuple[str, ...] = ()

    @property
    def kept(self) -> bool:
        return self.category != QUANTIZED

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "bytes": self.bytes,
               "category": self.category, "reason": self.reason}
        if self.tied:
            out["tied"] = list(self.tied)
        return out


@dataclass(frozen=True)
class KeptGroup:
    """Kept tensors of one category and reason: how many, their bytes and share, and their
    names with block indices replaced by ``*`` (so 64 experts' tensors make one pattern)."""

    category: str
    reason: str
    tensors: int
    bytes: int
    share: float
    patterns: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"category": self.category, "reason": self.reason, "tensors": self.tensors,
                "bytes": self.bytes, "share": self.share, "patterns": list(self.patterns)}


@dataclass(frozen=True)
class CoverageAccount:
    """Every parameter tensor of a model under a plan (see the module docstring)."""

    entries: tuple[TensorEntry, ...]
    tying: dict[str, Any] | None = None  # the plan's tie record (mpq.config.tying), if any
    untie_bytes: int = 0  # bytes the untied copy adds (in the load dtype, before quantizing)

    @property
    def total_bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries)

    @property
    def unquantized_bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries if entry.kept)

    @property
    def unquantized_share(self) -> float:
        total = self.total_bytes
        return self.unquantized_bytes / total if total else 0.0

    def kept(self) -> list[TensorEntry]:
        return [entry for entry in self.entries if entry.kept]

    def groups(self) -> list[KeptGroup]:
        """Kept tensors grouped by (category, reason), largest first."""
        grouped: dict[tuple[str, str], list[TensorEntry]] = {}
        for entry in self.kept():
            grouped.setdefault((entry.category, entry.reason), []).append(entry)
        total = self.total_bytes or 1
        out = []
        for (category, reason), entries in grouped.items():
            size = sum(entry.bytes for entry in entries)
            patterns = tuple(dict.fromkeys(name_pattern(entry.name) for entry in entries))
            out.append(KeptGroup(category, reason, len(entries), size, size / total, patterns))
        return sorted(out, key=lambda group: -group.bytes)

    def share_line(self) -> str:
        """``unquantized: X% of the weight bytes``."""
        return f"unquantized: {percent(self.unquantized_share)} of the weight bytes"

    def groups_line(self) -> str:
        """The kept categories and their shares, largest first: ``embedding 15.3%, ...``."""
        return ", ".join(f"{group.category} {percent(group.share)}" for group in self.groups())

    def summary(self) -> dict[str, Any]:
        """The shares and the kept groups (what ``mpq quantize`` reports)."""
        out = {"total_bytes": self.total_bytes, "unquantized_bytes": self.unquantized_bytes,
               "unquantized_share": self.unquantized_share,
               "kept": [group.to_dict() for group in self.groups()]}
        if self.tying is not None:
            out["tying"] = {**self.tying, "untied_bytes": self.untie_bytes}
        return out

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus every kept tensor (what ``mpq plan --json`` shows)."""
        return {**self.summary(), "kept_tensors": [entry.to_dict() for entry in self.kept()]}

    def check(self, max_share: float | None, option: str = "--max-unquantized") -> None:
        """RecipeError when more than ``max_share`` (0..1) of the bytes stay unquantized,
        naming the largest kept categories and how to fix it; None: no limit.  ``option``
        names what set the limit, for the message."""
        share = self.unquantized_share
        if max_share is None or share <= max_share:
            return
        groups = self.groups()
        biggest = ", ".join(f"{g.category} {percent(g.share)} ({_patterns(g.patterns)})"
                            for g in groups[:3])
        raise RecipeError(f"{percent(share)} of the weight bytes would stay unquantized, more "
                          f"than the {percent(max_share)} that {option} allows; largest kept: "
                          f"{biggest}", hint=_fix_hint(groups[0]))


def percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def _patterns(patterns: tuple[str, ...], shown: int = 2) -> str:
    more = f", +{len(patterns) - shown} more" if len(patterns) > shown else ""
    return ", ".join(patterns[:shown]) + more


def _fix_hint(group: KeptGroup) -> str:
    larger = "allow a larger share with --max-unquantized SHARE (0 to 1)"
    if group.category == "moe-experts":
        return f"mpq cannot quantize fused expert tensors of this layout: {larger}, or drop the limit"
    layer = group.patterns[0].rsplit(".", 1)[0]  # the module a rule targets
    if group.category == "skipped":
        return f"narrow the {group.reason} that keeps {layer}, or {larger}"
    if group.category in ("no-rule", "head"):
        return f"add a rule that quantizes {layer}, or {larger}"
    return larger


def name_pattern(name: str) -> str:
    """``model.layers.12.mlp.experts.3.w1.weight`` → ``model.layers.*.mlp.experts.*.w1.weight``."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def account(model: nn.Module, plan: Plan) -> CoverageAccount:
    """The account of ``model``'s parameters under ``plan`` (module docstring); reads shapes and
    dtypes only, so a meta skeleton will do."""
    layers = {layer.name: layer for layer in plan.layers}
    modules = dict(model.named_modules())
    embeddings = {id(m) for m in (_input_embeddings(model),) if m is not None}
    shared = plan.tying is not None and plan.tying.shared
    entries: list[TensorEntry] = []
    untie_bytes = 0
    for users in _tensors(model):
        param = users[0][1]
        size = param.numel() * param.element_size()
        shape = tuple(int(d) for d in param.shape)
        decided = [(name, _classify(name, param, modules, layers, embeddings))
                   for name, _ in users]
        quantized = [(name, c) for name, c in decided if c[0] == QUANTIZED]
        if quantized and not shared:  # the run unties the tensor: each user has its own copy
            first = quantized[0][0]
            for name, (category, reason, layer) in [quantized[0]] + [
                    item for item in decided if item[0] != first]:
                if name != first:
                    reason = f"{reason}; untied from {first}: a copy of its own"
                    untie_bytes += size
                entries.append(TensorEntry(name, shape, size, category, reason, layer))
            continue
        name, (category, reason, layer) = (quantized or decided)[0]
        tied = tuple(other for other, _ in decided if other != name)
        entries.append(TensorEntry(name, shape, size, category, reason, layer, tied))
    tying = plan.tying.to_dict() if plan.tying is not None else None
    return CoverageAccount(tuple(entries), tying, untie_bytes)


def _tensors(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """The model's parameters grouped by tensor: the same object, or tied by the model's
    ``all_tied_weights_keys`` (a meta skeleton has separate copies of tied tensors)."""
    groups: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append((name, param))
    group_of = {name: key for key, users in groups.items() for name, _ in users}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target in group_of and source in group_of and group_of[target] != group_of[source]:
            moved = groups.pop(group_of[target])
            groups[group_of[source]].extend(moved)
            group_of.update({name: group_of[source] for name, _ in moved})
    return list(groups.values())


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_input_embeddings", None)
    try:
        return getter() if getter is not None else None
    except NotImplementedError:
        return None


def _classify(name: str, param: nn.Parameter, modules: dict[str, nn.Module],
              layers: dict[str, LayerPlan], embeddings: set[int]
              ) -> tuple[str, str, str | None]:
    """(category, reason, plan layer) of the parameter ``name``."""
    module_name, _, attr = name.rpartition(".")
    module = modules[module_name]
    if name in layers:  # a parameter planned as a layer of its own
        return _layer_category(layers[name], name, bias=False)
    if f"{name}.0" in layers and layers[f"{name}.0"].expert is not None:
        # fused experts: planned per expert, quantized whole or kept whole (plan.resolve)
        return _layer_category(layers[f"{name}.0"], name, bias=False)
    class_name = type(module).__name__
    layer = layers.get(module_name)
    is_router = "router" in class_name.lower() or _is_gate(module_name, modules)
    if layer is not None and is_router and layer.scheme is None and layer.rule is None:
        return "router", POLICY_REASONS["router"], module_name
    if layer is not None and (isinstance(module, LINEAR_CLASSES) or is_router
                              or layer.embedding):
        return _layer_category(layer, module_name, bias=attr != "weight")
    if isinstance(module, nn.Embedding) or id(module) in embeddings:
        return "embedding", POLICY_REASONS["embedding"], None
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in class_name.lower():
        return "norm", POLICY_REASONS["norm"], None
    if is_router:
        return "router", POLICY_REASONS["router"], None
    if param.dim() >= 3 and ("expert" in class_name.lower()
                             or module_name.rsplit(".", 1)[-1] == "experts"):
        return "moe-experts", POLICY_REASONS["moe-experts"], None
    return "other", f"not a Linear layer ({class_name}): mpq does not quantize it", None


def _layer_category(layer: LayerPlan, name: str, *, bias: bool) -> tuple[str, str, str | None]:
    if layer.scheme is not None:
        if bias:
            return "bias", POLICY_REASONS["bias"], name
        return QUANTIZED, layer.reason, name
    if layer.rule is not None:
        return "skipped", layer.reason, name
    if layer.reason.startswith("protected"):
        return "head", f"output head, {layer.reason}", name
    return "no-rule", layer.reason, name


def _is_gate(module_name: str, modules: dict[str, nn.Module]) -> bool:
    """A module named ``gate`` whose parent also holds the experts (an MoE block's router)."""
    parent, _, leaf = module_name.rpartition(".")
    return leaf == "gate" and f"{parent}.experts" in modules

"""Rule resolution: a Recipe + the model's quantizable layers → an explicit per-layer :class:`Plan`.

Matching (first rule wins, per layer): a target is an exact module name, ``re:<regex>`` (Python
``re.match`` semantics against the full module name, as in compressed-tensors; matched with the
regex module under a time limit) or a module class name such as
``Linear`` / ``Conv1D`` (which also matches its subclasses, e.g. Falcon's ``FalconLinear``).
A *protected* layer (the output head, a MoE router) is only matched by a target equal to its
exact name.  The input embedding is protected too, and also matched by the class target
``Embedding`` (``nn.Embedding`` and its subclasses) or its own class name; a ``Linear`` rule or a
broad regex never catches it.  An embedding no rule matches is left out of the plan (it stays
float by policy, as the coverage account says), so plans that do not target it are unchanged.
A rule whose targets match no layer is an error, as is a scheme that cannot represent a
layer's weight shape — unless the rule has a ``fallback:`` (weights overlaid on its own), which
then applies to the layers its weights cannot take (the reason says ``fallback:`` and why).
Nothing here touches weights: layers are described by :class:`LayerInfo`, which the caller
builds from the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import regex

from mpq.errors import ArtifactError, RecipeError, SchemeError, did_you_mean
from mpq.config.experts import ExpertArgs
from mpq.config.kv_cache import KVCacheArgs
from mpq.config.recipe import REGEX_PREFIX, Recipe, Rule
from mpq.config.rotation import QuaRotArgs
from mpq.config.scheme import LayerScheme
from mpq.config.tying import TieRecord, decide_tying

log = logging.getLogger(__name__)
QUAROT_FIELDS = tuple(f.name for f in fields(QuaRotArgs))


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: name, class name, weight shape [out, in], decoder block index."""

    name: str
    class_name: str
    shape: tuple[int, int]
    block: int | None = None
    protected: bool = False  # the output head, a MoE router: only an exact-name target matches
    expert: int | None = None  # a slice of fused MoE experts (mpq.models.experts): its index
    # the module classes it derives from (e.g. Falcon's FalconLinear: Linear); a class target
    # matches any of them, as compressed-tensors' targets do
    bases: tuple[str, ...] = ()
    embedding: bool = False  # the input embedding (a lookup table [vocab, hidden])


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one layer.  ``scheme`` None = kept in the original dtype.

    ``rule`` is the index of the deciding rule (None when none matched).  What the run
    produces for the layer (error figures, a static input scale, ...) is in the run log
    (mpq.config.run_log), not here.
    """

    name: str
    class_name: str
    shape: tuple[int, int]
    block: int | None
    scheme: LayerScheme | None
    rule: int | None
    reason: str
    expert: int | None = None  # expert index of a fused-experts slice (mpq.models.experts)
    embedding: bool = False  # the input embedding: weight [vocab, hidden] treated as [N, K]

    @property
    def weight_key(self) -> str:
        """The state-dict tensor holding this layer's weight: ``<name>.weight``, or for an
        expert slice the fused parameter (``...experts.gate_up_proj``)."""
        return self.name.rpartition(".")[0] if self.expert is not None else f"{self.name}.weight"

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "class_name": self.class_name, "shape": list(self.shape),
               "block": self.block,
               "scheme": self.scheme.to_dict() if self.scheme is not None else None,
               "rule": self.rule, "reason": self.reason}
        if self.expert is not None:
            out["expert"] = self.expert
        if self.embedding:
            out["embedding"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPlan":
        scheme = data["scheme"]
        return cls(name=data["name"], class_name=data["class_name"], shape=tuple(data["shape"]),
                   block=data["block"],
                   scheme=LayerScheme.from_dict(scheme) if scheme is not None else None,
                   rule=data["rule"], reason=data["reason"], expert=data.get("expert"),
                   embedding=bool(data.get("embedding", False)))


@dataclass(frozen=True)
class TransformSpec:
    """One of the recipe's ``transforms:``: its type and options (read-only)."""

    type: str
    options: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "options": dict(self.options)}


class SummaryRow(NamedTuple):
    label: str  # e.g. "rtn int4 sym g64"
    layers: int
    weights: int  # number of weight elements


class PlanSummary(NamedTuple):
    rows: list[SummaryRow]
    kept: int  # layers kept in the original dtype


@dataclass(frozen=True)
class Plan:
    """The explicit per-layer plan that ``mpq plan`` prints and the artifact metadata stores:
    what will happen, decided before any weight is read, and never changed by the run."""

    recipe_name: str
    layers: tuple[LayerPlan, ...]
    precision_policy: Mapping[str, str]
    transforms: tuple[TransformSpec, ...] = ()
    kv_cache: KVCacheArgs | None = None
    rotation: QuaRotArgs | None = None
    experts: ExpertArgs | None = None  # the recipe's experts: section (None: defaults)
    # dtype of the tensors the artifact keeps in float (fp32/bf16/fp16), resolved from the
    # recipe's storage_dtype and the source (mpq.checkpoint.storage); None: as they are (an
    # artifact written before the key, whose plan has none, keeps its stored dtypes).  Recorded
    # only when not fp32, so fp32 artifacts are unchanged.
    storage_dtype: str | None = None
    tying: TieRecord | None = None  # a tied embedding/head pair the plan quantizes (config.tying)
    # the engine the plan was checked for (mpq.checkpoint.serving); None: any
    serving_target: str | None = None

    @property
    def min_expert_tokens(self) -> int:
        """Routed calibration tokens below which an expert slice falls back to RTN."""
        return (self.experts or ExpertArgs()).min_tokens

    def quantized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.scheme is not None]

    def get(self, name: str) -> LayerPlan | None:
        """The plan of layer ``name``, or None when the layer is not in the plan."""
        return next((layer for layer in self.layers if layer.name == name), None)

    def shared_with(self, name: str) -> str | None:
        """The layer whose quantized tensor layer ``name`` uses (the tied head, when it shares
        the embedding's), or None when it has its own."""
        tying = self.tying
        if tying is not None and tying.shared and name == tying.head:
            return tying.embedding
        return None

    def describe_kv_cache(self) -> str | None:
        return self.kv_cache.describe() if self.kv_cache is not None else None

    def summary(self) -> PlanSummary:
        """Quantized layers grouped by scheme label (first-seen order), plus the kept count."""
        rows: dict[str, list[int]] = {}
        for layer in self.quantized():
            label = f"{layer.scheme.algorithm} {layer.scheme.describe()}"
            count = rows.setdefault(label, [0, 0])
            count[0] += 1
            count[1] += layer.shape[0] * layer.shape[1]
        return PlanSummary([SummaryRow(label, n, w) for label, (n, w) in rows.items()],
                           kept=len(self.layers) - len(self.quantized()))

    def to_dict(self) -> dict[str, Any]:
        """The plan alone (before a run); mpq.config.run_log.plan_record adds what a run did."""
        out = {"recipe_name": self.recipe_name, "precision_policy": dict(self.precision_policy),
               "layers": [layer.to_dict() for layer in self.layers]}
        if self.transforms:
            out["transforms"] = [spec.to_dict() for spec in self.transforms]
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache.to_dict()
        if self.rotation is not None:
            out["rotation"] = self.rotation.to_dict()
        if self.experts is not None:
            out["experts"] = self.experts.to_dict()
        if self.storage_dtype not in (None, "fp32"):
            out["storage_dtype"] = self.storage_dtype
        if self.tying is not None:
            out["tying"] = self.tying.to_dict()
        if self.serving_target not in (None, "any"):
            out["serving_target"] = self.serving_target
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict` (extra keys a run log added are ignored); malformed data
        (e.g. from an artifact) → ArtifactError."""
        try:
            rotation = data.get("rotation")
            return cls(recipe_name=data["recipe_name"],
                       layers=tuple(LayerPlan.from_dict(item) for item in data["layers"]),
                       precision_policy=dict(data["precision_policy"]),
                       transforms=tuple(TransformSpec(t["type"], dict(t["options"]))
                                        for t in data.get("transforms", [])),
                       kv_cache=KVCacheArgs(**data["kv_cache"]) if data.get("kv_cache") else None,
                       rotation=QuaRotArgs(**{k: rotation[k] for k in QUAROT_FIELDS if k in rotation})
                       if rotation else None,
                       experts=ExpertArgs(**data["experts"]) if data.get("experts") else None,
                       storage_dtype=_storage_dtype(data.get("storage_dtype")),
                       tying=TieRecord.from_dict(data["tying"]) if data.get("tying") else None,
                       serving_target=data.get("serving_target"))
        except (KeyError, TypeError, ValueError, AttributeError, SchemeError) as exc:
            hint = "the artifact metadata is damaged or was written by another tool"
            raise ArtifactError(f"malformed plan: {type(exc).__name__}: {exc}", hint=hint) from None


def _storage_dtype(value: Any) -> str | None:
    if value is not None and value not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown storage_dtype {value!r}")
    return value


REGEX_SECONDS = 1.0  # per layer name: a pathological pattern fails instead of hanging the run


def _matches(target: str, layer: LayerInfo) -> bool:
    if target == layer.name:
        return True
    if layer.embedding:  # by its class (Embedding, or a subclass's own name), never by accident
        return target == layer.class_name or target in layer.bases
    if layer.protected:
        return False
    if target.startswith(REGEX_PREFIX):
        pattern = target[len(REGEX_PREFIX):]
        try:  # the regex module: re's syntax, with a time limit re does not have
            return regex.match(pattern, layer.name, timeout=REGEX_SECONDS) is not None
        except TimeoutError:
            raise RecipeError(f"target '{target}' takes over {REGEX_SECONDS:g} s to match "
                              f"'{layer.name}' (catastrophic backtracking)",
                              hint="simplify the pattern, e.g. avoid nested repeats like "
                                   "(a+)+ or (.*)*") from None
    # an expert slice is an [out, in] matrix applied like a linear: the class target Linear
    # matches it, as does its experts module's class name; a class target also matches the
    # classes a layer derives from
    return (target == layer.class_name or target in layer.bases
            or (layer.expert is not None and target == "Linear"))


def _rule_matches(rule: Rule, layer: LayerInfo) -> str | None:
    """The first of the rule's targets matching ``layer``, or None."""
    return next((t for t in rule.targets if _matches(t, layer)), None)


def _unfit(rule: Rule, shape: tuple[int, int]) -> str | None:
    """Why the weights of ``rule`` (one with a fallback) cannot take a weight of ``shape``, or
    None when they can (or the rule has no fallback)."""
    if rule.fallback is None:
        return None
    try:
        rule.scheme.weights.check_shape(tuple(shape))
    except SchemeError as exc:
        return exc.message
    return None


def resolve(recipe: Recipe, layers: Sequence[LayerInfo],
            other_modules: Mapping[str, str] | None = None, *,
            tied: tuple[str, str] | None = None) -> Plan:
    """Assign each layer the first rule that matches it.

    ``other_modules`` maps names of modules that cannot be quantized (norms, ...) to their
    class names; it only sharpens the error for a rule that targets one of them.  ``tied``:
    the (input embedding, output head) names when the model ties their weights; the plan then
    records what happens to the pair (mpq.config.tying).
    """
    matched = [0] * len(recipe.rules)  # layers each rule matches, decided or not
    plans: list[LayerPlan] = []
    for layer in layers:
        decided: LayerPlan | None = None
        for rule in recipe.rules:
            target = _rule_matches(rule, layer)
            if target is None:
                continue
            matched[rule.index] += 1
            if decided is None:
                reason = (f"skip by rule {rule.index}" if rule.scheme is None
                          else f"rule {rule.index} ({target})")
                scheme = rule.scheme
                unfit = _unfit(rule, layer.shape)
                if unfit is not None:
                    scheme, reason = rule.fallback, f"{reason} fallback: {unfit}"
                decided = LayerPlan(layer.name, layer.class_name, tuple(layer.shape), layer.block,
                                    scheme, rule.index, reason, layer.expert, layer.embedding)
        if decided is None and layer.embedding:
            continue  # kept by policy, outside the plan (the module docstring)
        if decided is None:
            reason = ("protected (name it exactly to quantize)" if layer.protected
                      else "no rule matched")
            decided = LayerPlan(layer.name, layer.class_name, tuple(layer.shape), layer.block,
                                None, None, reason, layer.expert)
        plans.append(decided)

    for rule in recipe.rules:
        if not matched[rule.index]:
            raise _no_match_error(recipe, rule, layers, other_modules or {})
        if not any(p.rule == rule.index for p in plans):
            log.warning("%s: %s targets %s are shadowed by earlier rules", recipe.source,
                        rule.source, list(rule.targets))

    _check_shapes(recipe, plans)
    _check_whole_experts(recipe, plans)
    transforms = tuple(TransformSpec(name, dict(options)) for name, options in recipe.transforms)
    tying = None
    if tied is not None:
        schemes = {plan.name: plan.scheme for plan in plans}
        tying = decide_tying(*tied, schemes.get(tied[0]), schemes.get(tied[1]),
                             rotated=recipe.rotation is not None)
    return Plan(recipe.name, tuple(plans), recipe.precision_policy.to_dict(), transforms,
                recipe.kv_cache, recipe.rotation, recipe.experts, tying=tying)


def _no_match_error(recipe: Recipe, rule: Rule, layers: Sequence[LayerInfo],
                    other_modules: Mapping[str, str]) -> RecipeError:
    message = f"{recipe.source}: {rule.source} targets {list(rule.targets)} match no layer"
    return RecipeError(message, hint=_no_match_hint(rule, layers, other_modules))


def _no_match_hint(rule: Rule, layers: Sequence[LayerInfo],
                   other_modules: Mapping[str, str]) -> str:
    for name, class_name in other_modules.items():
        other = LayerInfo(name, class_name, (0, 0))
        if _rule_matches(rule, other):
            return (f"'{name}' is a{'n' if class_name[:1] in 'AEIOU' else ''} {class_name}; "
                    f"only Linear/Conv1D layers and the input embedding can be quantized")
    for layer in layers:
        if layer.protected and _rule_matches(rule, LayerInfo(layer.name, layer.class_name,
                                                             layer.shape)):
            if layer.embedding:
                return (f"'{layer.name}' is the input embedding, which only its exact name or "
                        f"the class target Embedding selects")
            return f"'{layer.name}' is protected: target it by its exact name '{layer.name}'"
    choices = _unique([layer.name for layer in layers] + [layer.class_name for layer in layers])
    for target in rule.targets:
        close = did_you_mean(target, choices) if not target.startswith(REGEX_PREFIX) else None
        if close:
            return close
    examples = ", ".join([layer.name for layer in layers if not layer.embedding][:3])
    return f"layer names look like: {examples}" if examples else "the model has no layers"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _check_shapes(recipe: Recipe, plans: Sequence[LayerPlan]) -> None:
    """Every quantized layer's shape must fit its scheme; report the first failure (+ a count)."""
    failures: list[SchemeError] = []
    for plan in plans:
        if plan.scheme is None:
            continue
        try:
            plan.scheme.weights.check_shape(plan.shape, where=f"{plan.name} (rules[{plan.rule}])")
        except SchemeError as exc:
            failures.append(exc)
    if failures:
        first = failures[0]
        more = f" (and {len(failures) - 1} more layers)" if len(failures) > 1 else ""
        raise RecipeError(f"{recipe.source}: {first.message}{more}", hint=first.hint)


def _check_whole_experts(recipe: Recipe, plans: Sequence[LayerPlan]) -> None:
    """The experts of one fused parameter are quantized all or none: the artifact stores the
    parameter either as per-expert quantized slices or whole in float."""
    decided: dict[str, list[LayerPlan]] = {}
    for plan in plans:
        if plan.expert is not None:
            decided.setdefault(plan.weight_key, []).append(plan)
    for fused, slices in decided.items():
        kept = [p for p in slices if p.scheme is None]
        if kept and len(kept) < len(slices):
            quantized = next(p for p in slices if p.scheme is not None)
            raise RecipeError(
                f"{recipe.source}: {fused} would be partly quantized: expert {quantized.expert} "
                f"by rules[{quantized.rule}], expert {kept[0].expert} kept "
                f"({kept[0].reason}); a fused expert parameter is quantized whole or kept whole",
                hint=f"give every expert of {fused} a scheme, or skip them all")

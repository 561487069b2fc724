"""Rule resolution: a Recipe + the model's quantizable layers → an explicit per-layer :class:`Plan`.

Matching (first rule wins, per layer): a target is an exact module name, ``re:<regex>`` (Python
``re.match`` against the full module name, as in compressed-tensors) or a module class name such as
``Linear`` / ``Conv1D``.  A *protected* layer (the output head) is only matched by a target equal to
its exact name.  A rule whose targets match no layer is an error, as is a scheme that cannot
represent a layer's weight shape.  Nothing here touches weights: layers are described by
:class:`LayerInfo`, which the caller builds from the model.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from mpq.errors import ArtifactError, RecipeError, SchemeError, did_you_mean
from mpq.config.recipe import REGEX_PREFIX, Recipe, Rule
from mpq.config.scheme import LayerScheme

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: name, class name, weight shape [out, in], decoder block index."""

    name: str
    class_name: str
    shape: tuple[int, int]
    block: int | None = None
    protected: bool = False  # the output head: only an exact-name target matches it


@dataclass
class LayerPlan:
    """What happens to one layer.  ``scheme`` None = kept in the original dtype.

    ``rule`` is the index of the deciding rule (None when none matched); ``result`` is filled by
    the pipeline (error figures, ...).
    """

    name: str
    class_name: str
    shape: tuple[int, int]
    block: int | None
    scheme: LayerScheme | None
    rule: int | None
    reason: str
    result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "class_name": self.class_name, "shape": list(self.shape),
                "block": self.block,
                "scheme": self.scheme.to_dict() if self.scheme is not None else None,
                "rule": self.rule, "reason": self.reason, "result": dict(self.result)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPlan":
        scheme = data["scheme"]
        return cls(name=data["name"], class_name=data["class_name"], shape=tuple(data["shape"]),
                   block=data["block"],
                   scheme=LayerScheme.from_dict(scheme) if scheme is not None else None,
                   rule=data["rule"], reason=data["reason"], result=dict(data.get("result", {})))


class SummaryRow(NamedTuple):
    label: str  # e.g. "rtn int4 sym g64"
    layers: int
    weights: int  # number of weight elements


class PlanSummary(NamedTuple):
    rows: list[SummaryRow]
    kept: int  # layers kept in the original dtype


def _kv_cache_of(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A stored kv_cache entry, validated (SchemeError when malformed)."""
    if data is None:
        return None
    from mpq.config.kv_cache import KVCacheArgs

    return KVCacheArgs(**data).to_dict()


@dataclass
class Plan:
    """The explicit per-layer plan that ``mpq plan`` prints and the artifact metadata stores."""

    recipe_name: str
    layers: list[LayerPlan]
    precision_policy: dict[str, str]
    # the recipe's transforms in order: {"type", "options", "applied": per-block records}
    transforms: list[dict[str, Any]] = field(default_factory=list)
    # KV-cache quantization (mpq.config.kv_cache.KVCacheArgs as a dict), or None
    kv_cache: dict[str, Any] | None = None
    # QuaRot: the recipe's args; once applied also "rotations" (specs) and "online" hooks
    rotation: dict[str, Any] | None = None

    def quantized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.scheme is not None]

    def get(self, name: str) -> LayerPlan | None:
        """The plan of layer ``name``, or None when the layer is not in the plan."""
        return next((layer for layer in self.layers if layer.name == name), None)

    def describe_transforms(self) -> str | None:
        """One line naming the transforms and their options, or None when there are none."""
        if not self.transforms:
            return None
        parts = []
        for spec in self.transforms:
            options = ", ".join(f"{k}={v}" for k, v in spec["options"].items())
            done = f", {len(spec['applied'])} blocks" if spec.get("applied") else ""
            parts.append(f"{spec['type']}({options}){done}")
        return "transforms: " + "; ".join(parts)

    def describe_rotation(self) -> str | None:
        if self.rotation is None:
            return None
        r = self.rotation
        parts = [f"r1 {r['r1']}"] + [name for name in ("r2", "r4") if r.get(name)]
        text = f"rotation: quarot ({', '.join(parts)}, seed {r['seed']})"
        if r.get("online"):
            text += "; online: " + ", ".join(f"{k} inputs × {v}" for k, v in r["online"].items())
        return text

    def online_rotations(self) -> dict[str, Any]:
        """Module suffix → rotation spec dict of the rotations applied at run time."""
        if not self.rotation:
            return {}
        specs = self.rotation.get("rotations", {})
        return {suffix: specs[name] for suffix, name in self.rotation.get("online", {}).items()}

    def describe_kv_cache(self) -> str | None:
        if self.kv_cache is None:
            return None
        return f"kv cache: {self.kv_cache['format']} static per {self.kv_cache['granularity']}"

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
        out = {"recipe_name": self.recipe_name, "precision_policy": dict(self.precision_policy),
               "layers": [layer.to_dict() for layer in self.layers]}
        if self.transforms:
            out["transforms"] = [dict(t) for t in self.transforms]
        if self.kv_cache is not None:
            out["kv_cache"] = dict(self.kv_cache)
        if self.rotation is not None:
            out["rotation"] = dict(self.rotation)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`; malformed data (e.g. from an artifact) → ArtifactError."""
        try:
            return cls(recipe_name=data["recipe_name"],
                       layers=[LayerPlan.from_dict(item) for item in data["layers"]],
                       precision_policy=dict(data["precision_policy"]),
                       transforms=[dict(t) for t in data.get("transforms", [])],
                       kv_cache=_kv_cache_of(data.get("kv_cache")),
                       rotation=dict(data["rotation"]) if data.get("rotation") else None)
        except (KeyError, TypeError, ValueError, AttributeError, SchemeError) as exc:
            hint = "the artifact metadata is damaged or was written by another tool"
            raise ArtifactError(f"malformed plan: {type(exc).__name__}: {exc}", hint=hint) from None


def _matches(target: str, layer: LayerInfo) -> bool:
    if target == layer.name:
        return True
    if layer.protected:
        return False
    if target.startswith(REGEX_PREFIX):
        return re.match(target[len(REGEX_PREFIX):], layer.name) is not None
    return target == layer.class_name


def _rule_matches(rule: Rule, layer: LayerInfo) -> str | None:
    """The first of the rule's targets matching ``layer``, or None."""
    return next((t for t in rule.targets if _matches(t, layer)), None)


def resolve(recipe: Recipe, layers: Sequence[LayerInfo],
            other_modules: Mapping[str, str] | None = None) -> Plan:
    """Assign each layer the first rule that matches it.

    ``other_modules`` maps names of modules that cannot be quantized (embeddings, norms) to their
    class names; it only sharpens the error for a rule that targets one of them.
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
                decided = LayerPlan(layer.name, layer.class_name, tuple(layer.shape), layer.block,
                                    rule.scheme, rule.index, reason)
        if decided is None:
            reason = ("protected (name it exactly to quantize)" if layer.protected
                      else "no rule matched")
            decided = LayerPlan(layer.name, layer.class_name, tuple(layer.shape), layer.block,
                                None, None, reason)
        plans.append(decided)

    for rule in recipe.rules:
        if not matched[rule.index]:
            raise _no_match_error(recipe, rule, layers, other_modules or {})
        if not any(p.rule == rule.index for p in plans):
            log.warning("%s: %s targets %s are shadowed by earlier rules", recipe.source,
                        rule.source, list(rule.targets))

    _check_shapes(recipe, plans)
    transforms = [{"type": name, "options": dict(options), "applied": []}
                  for name, options in recipe.transforms]
    kv_cache = recipe.kv_cache.to_dict() if recipe.kv_cache is not None else None
    rotation = recipe.rotation.to_dict() if recipe.rotation is not None else None
    return Plan(recipe.name, plans, recipe.precision_policy.to_dict(), transforms, kv_cache,
                rotation)


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
                    f"only Linear/Conv1D layers can be quantized")
    for layer in layers:
        if layer.protected and _rule_matches(rule, LayerInfo(layer.name, layer.class_name,
                                                             layer.shape)):
            return f"'{layer.name}' is protected: target it by its exact name '{layer.name}'"
    choices = _unique([layer.name for layer in layers] + [layer.class_name for layer in layers])
    for target in rule.targets:
        close = did_you_mean(target, choices) if not target.startswith(REGEX_PREFIX) else None
        if close:
            return close
    examples = ", ".join(layer.name for layer in layers[:3])
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

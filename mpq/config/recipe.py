"""Quantization recipes: a strict YAML file (or a built-in preset) → a frozen :class:`Recipe`.

Format, version 1::

    mpq_recipe: 1            # required integer; any other value is refused
    name: my-recipe          # optional (defaults to the file stem / preset name)
    description: free text   # optional
    defaults:                # optional, merged under every rule
      algorithm: rtn         # quantizer name
      weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 128}
      options: {}            # algorithm-specific scalars, passed through
      input_activations: {format: int, bits: 8, dynamic: true, granularity: token}  # or null
    rules:                   # required, non-empty, ordered; the first matching rule wins
      - targets: ["re:.*mlp\\.down_proj"]    # string or list of: exact module name,
        weights: {bits: 8, granularity: channel}  # "re:<regex>" (re.match on the full name)
      - targets: lm_head                     # or a module class name such as Linear / Conv1D
        skip: true           # keep in the original dtype; excludes algorithm/weights/options
      - targets: [Embedding]                 # the input embedding: class Embedding or its name
        weights: {bits: 8, granularity: channel}  # rtn; int per row / group, fp8_e4m3 per row
      - targets: Linear
        weights: {format: q4_k}  # GGUF's K-quants take rows of a multiple of 256 inputs;
        fallback: {format: q5_0}  # optional: weights overlaid on the rule's for the layers
                                 # whose shape the rule's weights cannot take (as llama.cpp)
    transforms:              # optional, applied per decoder block before its layers are quantized
      - {type: smoothquant, alpha: 0.5}
    rotation:                # optional: QuaRot, applied to the whole model before calibration
      {type: quarot, r1: hadamard, r2: true, r4: true, seed: 0}   # r1: hadamard | random
    kv_cache:                # optional: quantize the cached keys (after RoPE) and values
      {format: int8, granularity: group, group_size: 32, dynamic: false}
      # fp8_e4m3: symmetric static scales, granularity tensor (default) | head
      # int8 | int4: asymmetric (scale + zero point), granularity head (default; one range per
      #   kv head) | group (group_size consecutive channels of a head; must divide head_dim);
      #   dynamic: false (default) calibrates the ranges, true takes one per token at run time
      #   (no calibration needed for it); mpq.config.kv_cache
    experts:                 # optional (models with fused MoE experts): an expert routed fewer
      {min_tokens: 32}       # calibration tokens is quantized with rtn (0: only unreached ones)
    storage_dtype: source    # optional: dtype of the tensors the artifact keeps in float
                             # (embeddings, norms, biases, a kept head): source | fp32 | bf16 | fp16
    precision_policy:        # optional; these are the defaults
      norms: fp32            # norms, softmax, residual, rope, activations: fp32|bf16|fp16
      softmax: fp32
      residual: fp32
      rope: fp32
      activations: bf16
      kv_cache: bf16         # fp32|bf16|fp16|fp8_e4m3|fp8_e5m2; a kv_cache section sets it to
                             # its format (a different value here is an error)

``storage_dtype: source`` (the default) stores them in the source checkpoint's dtype: that of
the floating-point tensors in its safetensors files (the dtype holding most of their elements),
which wins over config.json's ``torch_dtype``/``dtype`` (config.json only when the files hold no
floating-point tensor); a bf16 model gives a bf16 artifact whatever ``--dtype`` the run computed
in.  ``fp32``/``bf16``/``fp16`` force that dtype; a value the dtype cannot hold (fp16 beyond
±65504) is refused when the artifact is written (RecipeError), never stored as inf.  The
resolved dtype is recorded in the plan (``storage_dtype``, left out when fp32).  Quantized
scales have their own dtype, ``weights: {scale_dtype: fp16}`` (int; see
:class:`mpq.numerics.args.WeightArgs`).

Weights of a rule = WeightArgs defaults, overlaid key-wise by ``defaults.weights``, then by the
rule's ``weights``.  A level that sets ``format`` but not ``bits`` gets the format's bits
(fp8_*, mxfp8 → 8; nf4, mxfp4, nvfp4 → 4); nf4, mxfp4, mxfp8 and nvfp4 imply granularity group
with their fixed group_size (64, 32, 32, 16), fp8 implies per-channel instead of group (see
:func:`mpq.config.schema.overlay_weights`; ``granularity: block`` gives fp8_e4m3 128×128 tiles).  group_size is dropped unless
the granularity is ``group``.  Options (scalar values) merge key-wise the same way.  Unknown keys,
duplicate keys, wrong types, bad regexes and invalid schemes raise
:class:`~mpq.errors.RecipeError` naming ``<file>: <yaml path>`` (``<file>:<line>:<col>`` for YAML
syntax errors).  Algorithm names are only checked when ``known_algorithms`` is given (the caller
passes the quantizer registry).

The output head and the input embedding are *protected* (mpq.config.plan): the head is matched
only by its exact name, the input embedding only by its exact name (``model.embed_tokens``) or the
class target ``Embedding`` (``nn.Embedding`` and subclasses, or the subclass's own name), never
by ``Linear`` or a regex.  The embedding's table [vocab, hidden] is quantized as a weight
[N=vocab, K=hidden]: ``granularity: channel`` is one scale per vocabulary row, ``group`` groups
along the hidden size; int (any bits, sym/asym) per channel or group, fp8_e4m3 per channel and
the GGUF grids (blocks along each row), algorithm ``rtn`` only
(mpq.engine.spec.check_embedding_schemes refuses the rest with the rule's path).  A tied
embedding/head pair given one rtn scheme stays one stored tensor; otherwise it is untied
(mpq.config.tying).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Collection

from mpq.errors import RecipeError, SchemeError, did_you_mean
from mpq.config.schema import (YamlPath, check_keys, expect, finish_weights, load_yaml,
                               overlay_activations, overlay_weights, parse_activation_overlay,
                               parse_experts, parse_kv_cache, parse_options, parse_rotation, parse_transforms,
                               parse_weight_overlay)
from mpq.config.experts import ExpertArgs
from mpq.config.kv_cache import INT_FORMATS, KVCacheArgs
from mpq.config.rotation import QuaRotArgs
from mpq.numerics.args import ActivationArgs, WeightArgs
from mpq.config.scheme import LayerScheme

RECIPE_VERSION = 1
REGEX_PREFIX = "re:"
FLOAT_DTYPES = ("fp32", "bf16", "fp16")
STORAGE_DTYPES = ("source",) + FLOAT_DTYPES
KV_CACHE_DTYPES = FLOAT_DTYPES + ("fp8_e4m3", "fp8_e5m2")
KV_INT_DTYPES = tuple(INT_FORMATS)  # only with a kv_cache section that has this format
_TOP_KEYS = ("mpq_recipe", "name", "description", "defaults", "rules", "transforms",
             "kv_cache", "rotation", "precision_policy", "experts", "storage_dtype")
_DEFAULT_KEYS = ("algorithm", "weights", "options", "input_activations")
_RULE_KEYS = ("targets", "skip", "fallback") + _DEFAULT_KEYS


def precision_problem(part: str, value: Any, kv_int: bool = False) -> SchemeError | None:
    """The error for an invalid dtype of one precision_policy entry, or None when it is valid.
    ``kv_int``: the kv_cache part may also be int8/int4 (set by a kv_cache section)."""
    choices = KV_CACHE_DTYPES if part == "kv_cache" else FLOAT_DTYPES
    if value in choices or (kv_int and part == "kv_cache" and value in KV_INT_DTYPES):
        return None
    close = did_you_mean(value, choices)
    return SchemeError(f"unknown dtype '{value}' for {part}",
                       hint=f"{close + ' ' if close else ''}use one of {', '.join(choices)}")


@dataclass(frozen=True)
class PrecisionPolicy:
    """Dtypes of the parts that stay in floating point (norms, softmax, ... and the KV cache)."""

    norms: str = "fp32"
    softmax: str = "fp32"
    residual: str = "fp32"
    rope: str = "fp32"
    activations: str = "bf16"
    kv_cache: str = "bf16"

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = precision_problem(f.name, getattr(self, f.name), kv_int=True)
            if problem is not None:
                raise problem

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    """One resolved rule: its targets and the scheme it applies (None = skip, keep the dtype);
    ``fallback``: the scheme (the rule's, with its ``fallback:`` weights) for the layers whose
    weight shape the rule's weights cannot take, or None."""

    targets: tuple[str, ...]
    scheme: LayerScheme | None
    index: int
    source: str  # YAML path, e.g. "rules[1]"
    fallback: LayerScheme | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.scheme is None:
            return {"targets": list(self.targets), "skip": True}
        out = {"targets": list(self.targets), **self.scheme.to_dict()}
        if self.fallback is not None:  # every field, so it reads back over any rule weights
            out["fallback"] = asdict(self.fallback.weights)
        return out


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe.  ``source``: a file path or ``preset:NAME``; ``text``: the original YAML."""

    version: int
    name: str
    description: str
    rules: tuple[Rule, ...]
    precision_policy: PrecisionPolicy = field(default_factory=PrecisionPolicy)
    source: str = "<string>"
    text: str = ""
    transforms: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    kv_cache: KVCacheArgs | None = None
    rotation: QuaRotArgs | None = None
    experts: ExpertArgs | None = None
    storage_dtype: str = "source"  # STORAGE_DTYPES

    def to_dict(self) -> dict[str, Any]:
        """Normalized, JSON-able recipe (every rule fully spelt out); parse_recipe reads it back."""
        out = {"mpq_recipe": self.version, "name": self.name, "description": self.description,
               "rules": [rule.to_dict() for rule in self.rules],
               "precision_policy": self.precision_policy.to_dict()}
        if self.transforms:
            out["transforms"] = [{"type": name, **dict(options)}
                                 for name, options in self.transforms]
        if self.kv_cache is not None:
            out["kv_cache"] = self.kv_cache.to_dict()
        if self.rotation is not None:
            out["rotation"] = self.rotation.to_dict()
        if self.experts is not None:
            out["experts"] = self.experts.to_dict()
        if self.storage_dtype != "source":
            out["storage_dtype"] = self.storage_dtype
        return out


def parse_recipe(text: str, source: str,
                 known_algorithms: Collection[str] | None = None) -> Recipe:
    """Parse recipe YAML ``text``; ``source`` (a path or ``preset:NAME``) prefixes every error."""
    root = YamlPath(source)
    data = load_yaml(text, source)
    if not isinstance(data, dict):
        raise root.error("a recipe must be a YAML mapping", hint="start with 'mpq_recipe: 1'")
    if "mpq_recipe" not in data:
        raise root.error("missing required key 'mpq_recipe'", hint="add 'mpq_recipe: 1' at the top")
    version = data["mpq_recipe"]
    if not isinstance(version, int) or isinstance(version, bool) or version != RECIPE_VERSION:
        raise root.key("mpq_recipe").error(f"unsupported recipe version {version!r}",
                                           hint=f"this mpq reads version {RECIPE_VERSION}")
    check_keys(data, _TOP_KEYS, root, required=("rules",))

    default_name = source[len("preset:"):] if source.startswith("preset:") else Path(source).stem
    name = expect(data.get("name", default_name), str, root.key("name"))
    description = expect(data.get("description", ""), str, root.key("description"))

    defaults = data.get("defaults", {})
    expect(defaults, dict, root.key("defaults"), example="{algorithm: rtn, weights: {bits: 4}}")
    check_keys(defaults, _DEFAULT_KEYS, root.key("defaults"))
    base = _parse_level(defaults, root.key("defaults"), known_algorithms)

    at_rules = root.key("rules")
    raw_rules = expect(data["rules"], list, at_rules, example="[{targets: Linear}]")
    if not raw_rules:
        raise at_rules.error("needs at least one rule", hint="e.g. '- targets: [Linear, Conv1D]'")
    rules = tuple(_parse_rule(raw, i, at_rules.index(i), base, known_algorithms)
                  for i, raw in enumerate(raw_rules))

    transforms = parse_transforms(data.get("transforms", []), root.key("transforms"))
    kv_cache = parse_kv_cache(data.get("kv_cache"), root.key("kv_cache"))
    rotation = parse_rotation(data.get("rotation"), root.key("rotation"))
    experts = parse_experts(data.get("experts"), root.key("experts"))
    if rotation is not None and transforms:
        raise root.key("rotation").error(
            "rotation cannot be combined with transforms yet (their scale folds would cross "
            "the online rotation)", hint="remove transforms: or rotation:")
    policy = _parse_policy(data.get("precision_policy", {}), root.key("precision_policy"),
                           kv_cache)
    storage_dtype = expect(data.get("storage_dtype", "source"), str, root.key("storage_dtype"),
                           example="storage_dtype: bf16")
    if storage_dtype not in STORAGE_DTYPES:
        raise root.key("storage_dtype").error(
            f"unknown storage dtype {storage_dtype!r}",
            hint=did_you_mean(storage_dtype, STORAGE_DTYPES)
            or f"use one of {', '.join(STORAGE_DTYPES)}")
    if kv_cache is not None:  # the cache's dtype follows the kv_cache section
        policy = replace(policy, kv_cache=kv_cache.format)
    return Recipe(version=version, name=name, description=description, rules=rules,
                  precision_policy=policy, source=source, text=text, transforms=transforms,
                  kv_cache=kv_cache, rotation=rotation, experts=experts,
                  storage_dtype=storage_dtype)


def _parse_level(raw: dict, at: YamlPath, known: Collection[str] | None) -> dict[str, Any]:
    """The algorithm / weights / options given at one level (defaults or a rule), type-checked."""
    level: dict[str, Any] = {}
    if "algorithm" in raw:
        algorithm = expect(raw["algorithm"], str, at.key("algorithm"), example="rtn")
        if known is not None and algorithm not in known:
            hint = did_you_mean(algorithm, known) or f"known: {', '.join(sorted(known))}"
            raise at.key("algorithm").error(f"unknown algorithm '{algorithm}'", hint=hint)
        level["algorithm"] = algorithm
    if "weights" in raw:
        level["weights"] = parse_weight_overlay(raw["weights"], at.key("weights"))
    if "options" in raw:
        level["options"] = parse_options(raw["options"], at.key("options"))
    if "input_activations" in raw:
        level["input_activations"] = parse_activation_overlay(raw["input_activations"],
                                                              at.key("input_activations"))
    return level


def _parse_rule(raw: Any, index: int, at: YamlPath, base: dict[str, Any],
                known: Collection[str] | None) -> Rule:
    expect(raw, dict, at, example="{targets: Linear}")
    check_keys(raw, _RULE_KEYS, at, required=("targets",))
    targets = _parse_targets(raw["targets"], at.key("targets"))
    source = at.path
    skip = expect(raw.get("skip", False), bool, at.key("skip"), example="skip: true")
    if skip:
        extra = [k for k in _DEFAULT_KEYS + ("fallback",) if k in raw]
        if extra:
            raise at.error(f"skip: true cannot be combined with {', '.join(extra)}",
                           hint=f"remove {', '.join(extra)}, or set skip: false")
        return Rule(targets=targets, scheme=None, index=index, source=source)

    level = _parse_level(raw, at, known)
    merged = overlay_weights(asdict(WeightArgs()), base.get("weights", {}))
    merged = finish_weights(overlay_weights(merged, level.get("weights", {})))
    where = (at.key("weights") if "weights" in level
             else YamlPath(at.source, f"defaults.weights (used by {source})"))
    try:
        weights = WeightArgs(**merged)
    except SchemeError as exc:
        raise where.error(exc.message, hint=exc.hint) from None
    options = {**base.get("options", {}), **level.get("options", {})}
    scheme = LayerScheme(algorithm=level.get("algorithm", base.get("algorithm", "rtn")),
                         weights=weights, options=tuple(sorted(options.items())),
                         input_activations=_activations(base, level, at, source))
    fallback = None
    if "fallback" in raw:
        at_fallback = at.key("fallback")
        overlay = parse_weight_overlay(raw["fallback"], at_fallback)
        try:
            fallback_weights = WeightArgs(**finish_weights(overlay_weights(merged, overlay)))
        except SchemeError as exc:
            raise at_fallback.error(exc.message, hint=exc.hint) from None
        fallback = replace(scheme, weights=fallback_weights)
    return Rule(targets=targets, scheme=scheme, index=index, source=source, fallback=fallback)


def _activations(base: dict[str, Any], level: dict[str, Any], at: YamlPath,
                 source: str) -> ActivationArgs | None:
    """The rule's input activation args: defaults' overlaid by the rule's (null turns them off)."""
    merged = overlay_activations(None, base.get("input_activations"))
    if "input_activations" in level:
        merged = overlay_activations(merged, level["input_activations"])
    if merged is None:
        return None
    where = (at.key("input_activations") if "input_activations" in level
             else YamlPath(at.source, f"defaults.input_activations (used by {source})"))
    try:
        return ActivationArgs(**merged)
    except SchemeError as exc:
        raise where.error(exc.message, hint=exc.hint) from None


def _parse_targets(raw: Any, at: YamlPath) -> tuple[str, ...]:
    example = 'targets: [Linear] or targets: "re:.*mlp\\\\.down_proj"'
    items = [raw] if isinstance(raw, str) else expect(raw, (str, list), at, example=example)
    if not items:
        raise at.error("needs at least one target", hint=example)
    for i, target in enumerate(items):
        where = at.index(i) if isinstance(raw, list) else at
        expect(target, str, where, example=example)
        if not target or target == REGEX_PREFIX:
            raise where.error("empty target", hint=example)
        if target.startswith(REGEX_PREFIX):
            try:
                re.compile(target[len(REGEX_PREFIX):])
            except re.error as exc:
                raise where.error(f"invalid regex in target '{target}': {exc}",
                                  hint="targets use Python re syntax; escape dots as \\.") from None
    return tuple(items)


def _parse_policy(raw: Any, at: YamlPath, kv_cache: KVCacheArgs | None) -> PrecisionPolicy:
    """The precision_policy section; its kv_cache entry, when given beside a kv_cache section,
    must name that section's format (the section sets it otherwise), and int8/int4 need one."""
    expect(raw, dict, at, example="{kv_cache: fp8_e4m3}")
    names = [f.name for f in fields(PrecisionPolicy)]
    check_keys(raw, names, at)
    for key, value in raw.items():
        expect(value, str, at.key(key), example=f"{key}: fp32")
        if key == "kv_cache" and kv_cache is not None and value != kv_cache.format:
            raise at.key(key).error(f"'{value}' disagrees with kv_cache.format "
                                    f"'{kv_cache.format}'",
                                    hint="drop precision_policy.kv_cache (the kv_cache section "
                                         "sets it) or make the two agree")
        if key == "kv_cache" and kv_cache is None and value in KV_INT_DTYPES:
            raise at.key(key).error(f"an {value} KV cache needs the kv_cache section (its "
                                    "scales and zero points)",
                                    hint=f"add kv_cache: {{format: {value}, granularity: head}} "
                                         "and drop this entry")
        problem = precision_problem(key, value, kv_int=kv_cache is not None)
        if problem is not None:
            raise at.key(key).error(problem.message, hint=problem.hint)
    return PrecisionPolicy(**raw)


# --- presets and files ---------------------------------------------------------------------------

def _preset_files() -> dict[str, Any]:
    folder = resources.files("mpq.config").joinpath("presets")
    return {entry.name[:-len(".yaml")]: entry for entry in folder.iterdir()
            if entry.name.endswith(".yaml")}


def list_presets() -> dict[str, str]:
    """Built-in preset names → their descriptions, sorted by name."""
    files = _preset_files()
    return {name: parse_recipe(files[name].read_text(encoding="utf-8"),
                               f"preset:{name}").description
            for name in sorted(files)}


def _looks_like_path(name: str) -> bool:
    """Whether ``-r`` was meant as a file (a folder part or a YAML suffix), not a preset name."""
    name = str(name)
    return os.sep in name or "/" in name or name.lower().endswith((".yaml", ".yml"))


def load_recipe(name_or_path: str, known_algorithms: Collection[str] | None = None) -> Recipe:
    """Load a recipe from an existing file path, else from the built-in preset of that name."""
    if os.path.isfile(name_or_path):
        try:
            text = Path(name_or_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{name_or_path}: cannot read recipe: {exc}",
                              hint="a recipe is a readable UTF-8 YAML file") from None
        return parse_recipe(text, str(name_or_path), known_algorithms)
    presets = _preset_files()
    if name_or_path in presets:
        text = presets[name_or_path].read_text(encoding="utf-8")
        return parse_recipe(text, f"preset:{name_or_path}", known_algorithms)
    close = did_you_mean(name_or_path, presets)
    listing = f"presets: {', '.join(sorted(presets))}"
    if os.path.isdir(name_or_path):
        raise RecipeError(f"recipe '{name_or_path}' is a folder, not a recipe file",
                          hint="pass the recipe's .yaml file, or a preset name")
    if not close and _looks_like_path(name_or_path):
        raise RecipeError(f"recipe file '{name_or_path}' does not exist",
                          hint=f"check the path, or name a built-in preset ({listing})")
    raise RecipeError(f"no recipe file or preset named '{name_or_path}'",
                      hint=f"{close} {listing}" if close else listing)

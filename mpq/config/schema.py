"""Strict YAML helpers for the recipe parser: loading, YAML paths, typed fields, weight merging.

Every error is a :class:`RecipeError` whose message starts with ``<source>: <yaml path>:`` so the
user can find the offending line.  See :mod:`mpq.config.recipe` for the format itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Collection, Mapping

import yaml

from mpq.errors import RecipeError, SchemeError, did_you_mean
from mpq.numerics.args import ActivationArgs, WeightArgs
from mpq.numerics.format import NUMBER_FORMATS

WEIGHT_KEYS = tuple(f.name for f in fields(WeightArgs))
ACTIVATION_KEYS = tuple(f.name for f in fields(ActivationArgs))
_ACTIVATION_TYPES = {"format": str, "bits": int, "dynamic": bool, "granularity": str,
                     "symmetric": bool}
_WEIGHT_TYPES = {"format": str, "bits": int, "symmetric": bool, "granularity": str,
                 "group_size": (int, type(None)), "double_quant": bool, "scale_dtype": str,
                 "full_range": bool}
_WEIGHT_EXAMPLES = {"format": "format: int", "bits": "bits: 4", "symmetric": "symmetric: true",
                    "granularity": "granularity: group", "group_size": "group_size: 128",
                    "double_quant": "double_quant: true", "scale_dtype": "scale_dtype: fp16",
                    "full_range": "full_range: true"}
_SCALARS = (str, int, float, bool, type(None))
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean (true/false)",
               float: "a number", list: "a list", dict: "a mapping", type(None): "null"}


@dataclass(frozen=True)
class YamlPath:
    """Where a value sits in a recipe, e.g. ``rules[2].weights.bitz`` in ``recipe.yaml``."""

    source: str
    path: str = ""

    def key(self, name: Any) -> "YamlPath":
        return YamlPath(self.source, f"{self.path}.{name}" if self.path else str(name))

    def index(self, i: int) -> "YamlPath":
        return YamlPath(self.source, f"{self.path}[{i}]")

    def error(self, message: str, hint: str | None = None) -> RecipeError:
        where = f"{self.source}: {self.path}" if self.path else self.source
        return RecipeError(f"{where}: {message}", hint=hint)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text; syntax errors become RecipeError with ``source:line:column``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise RecipeError(f"{where}: invalid YAML: {problem}",
                          hint="check indentation, colons and quoting on that line") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: invalid YAML: {exc}") from None


def _type_name(expected: type | tuple[type, ...]) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def is_type(value: Any, expected: type | tuple[type, ...]) -> bool:
    """isinstance, except that a boolean is not an integer or a number."""
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def expect(value: Any, expected: type | tuple[type, ...], at: YamlPath,
           example: str | None = None) -> Any:
    """Return ``value`` if it has the expected type, else raise a RecipeError naming the path."""
    if is_type(value, expected):
        return value
    got = f"{type(value).__name__} {value!r}" if value is not None else "null"
    raise at.error(f"expected {_type_name(expected)}, got {got}",
                   hint=f"e.g. {example}" if example else
                   f"write {_type_name(expected)} there (strings in quotes, numbers without)")


def check_keys(mapping: Mapping[Any, Any], allowed: Collection[str], at: YamlPath,
               required: Collection[str] = ()) -> None:
    """Refuse unknown keys (with a did-you-mean) and missing required ones."""
    for key in mapping:
        if key not in allowed:
            hint = did_you_mean(key, allowed) or f"allowed keys: {', '.join(allowed)}"
            raise at.key(key).error("unknown key", hint=hint)
    for key in required:
        if key not in mapping:
            raise at.error(f"missing required key '{key}'")


def parse_options(value: Any, at: YamlPath) -> dict[str, Any]:
    """An algorithm's options: a mapping of string keys to scalars (kept hashable in the scheme)."""
    expect(value, dict, at, example="{damp_percent: 0.01}")
    for key, item in value.items():
        expect(key, str, at.key(key))
        if not is_type(item, _SCALARS):
            raise at.key(key).error(f"expected a scalar (string, number, boolean or null), got "
                                    f"{type(item).__name__}")
    return dict(value)


def parse_weight_overlay(value: Any, at: YamlPath) -> dict[str, Any]:
    """Type-check one ``weights:`` mapping (a partial WeightArgs)."""
    expect(value, dict, at, example="{bits: 4, granularity: group, group_size: 64}")
    check_keys(value, WEIGHT_KEYS, at)
    for key, item in value.items():
        expect(item, _WEIGHT_TYPES[key], at.key(key), example=_WEIGHT_EXAMPLES[key])
    return dict(value)


def overlay_weights(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one ``weights:`` level key-wise over ``base``.

    When the level sets ``format``, fields it leaves out follow the format
    (``NumberFormat.implied_weights``): fp8_* → 8 bits, symmetric, per-channel instead of group;
    nf4, mxfp4, mxfp8, nvfp4 → their bits, symmetric, group of their fixed size (64, 32, 32, 16);
    any format other than nf4 → no double_quant; formats without a scale_dtype (all but int and fp8) → fp32 scales; formats other than int → no full_range.
    Fields the level gives are never changed, so conflicts still raise.
    """
    merged = {**base, **overlay}
    fmt = overlay.get("format")
    implied: dict[str, Any] = {}
    if isinstance(fmt, str) and fmt in NUMBER_FORMATS:
        implied = NUMBER_FORMATS.get(fmt).implied_weights(merged)
    elif fmt is not None:  # unknown: WeightArgs names the formats
        implied["double_quant"] = False
    for key, item in implied.items():
        if key not in overlay:
            merged[key] = item
    return merged


def finish_weights(merged: Mapping[str, Any]) -> dict[str, Any]:
    """Final touch before WeightArgs: group_size only exists for granularity ``group``."""
    out = dict(merged)
    if out.get("granularity") != "group":
        out["group_size"] = None
    return out


def parse_activation_overlay(value: Any, at: YamlPath) -> dict[str, Any] | None:
    """Type-check one ``input_activations:`` mapping (a partial ActivationArgs); null → None
    (no activation quantization at this level)."""
    if value is None:
        return None
    expect(value, dict, at, example="{format: int, bits: 8, dynamic: true, granularity: token}")
    check_keys(value, ACTIVATION_KEYS, at)
    for key, item in value.items():
        expect(item, _ACTIVATION_TYPES[key], at.key(key))
    return dict(value)


def overlay_activations(base: Mapping[str, Any] | None, overlay: Mapping[str, Any] | None
                        ) -> dict[str, Any] | None:
    """Merge one ``input_activations:`` level over ``base`` (None = off).  Fields a level leaves
    out follow what it gives: a format of fixed width (fp8_e4m3) → its bits; dynamic false →
    granularity tensor."""
    if overlay is None:
        return None
    merged = {**(base or asdict(ActivationArgs())), **overlay}
    fmt = overlay.get("format")
    if isinstance(fmt, str) and fmt in NUMBER_FORMATS and "bits" not in overlay:
        number_format = NUMBER_FORMATS.get(fmt)
        if number_format.activations and number_format.bits is not None:
            merged["bits"] = number_format.bits
    if overlay.get("dynamic") is False and "granularity" not in overlay:
        merged["granularity"] = "tensor"
    return merged


def parse_transforms(value: Any, at: YamlPath) -> tuple[tuple[str, tuple], ...]:
    """``transforms:``: a list of mappings ``{type: NAME, option: scalar, ...}`` → a tuple of
    (type, sorted option pairs).  Type names and options are checked by the transform itself."""
    example = "[{type: smoothquant, alpha: 0.5}]"
    expect(value, list, at, example=example)
    out = []
    for i, item in enumerate(value):
        where = at.index(i)
        expect(item, dict, where, example="{type: smoothquant, alpha: 0.5}")
        if "type" not in item:
            raise where.error("missing required key 'type'", hint="e.g. type: smoothquant")
        name = expect(item["type"], str, where.key("type"), example="smoothquant")
        options = parse_options({k: v for k, v in item.items() if k != "type"}, where)
        out.append((name, tuple(sorted(options.items()))))
    return tuple(out)


KV_CACHE_KEYS = ("format", "granularity", "group_size", "dynamic")
_KV_TYPES = {"format": str, "granularity": str, "group_size": int, "dynamic": bool}
_KV_EXAMPLES = {"format": "format: int8", "granularity": "granularity: group",
                "group_size": "group_size: 32", "dynamic": "dynamic: true"}


def parse_kv_cache(value: Any, at: YamlPath):
    """``kv_cache:``: null/absent (off), ``{format: fp8_e4m3, granularity: tensor|head}`` or
    ``{format: int8|int4, granularity: head|group, group_size: N, dynamic: true|false}``
    (mpq.config.kv_cache)."""
    from mpq.config.kv_cache import KVCacheArgs

    if value is None:
        return None
    expect(value, dict, at, example="{format: int8, granularity: head}")
    check_keys(value, KV_CACHE_KEYS, at)
    for key, item in value.items():
        expect(item, _KV_TYPES[key], at.key(key), example=_KV_EXAMPLES[key])
    try:
        return KVCacheArgs(**value)
    except SchemeError as exc:
        raise at.error(exc.message, hint=exc.hint) from None


EXPERTS_KEYS = ("min_tokens",)


def parse_experts(value: Any, at: YamlPath):
    """``experts:``: null/absent (defaults) or ``{min_tokens: N}`` (mpq.config.experts)."""
    from mpq.config.experts import ExpertArgs

    return _parse_section(value, at, EXPERTS_KEYS, ExpertArgs, example="{min_tokens: 32}")


ROTATION_KEYS = ("type", "r1", "r2", "r4", "seed")


def parse_rotation(value: Any, at: YamlPath):
    """``rotation:``: null/absent (off) or ``{type: quarot, r1, r2, r4, seed}``."""
    from mpq.config.rotation import QuaRotArgs

    return _parse_section(value, at, ROTATION_KEYS, QuaRotArgs,
                          example="{type: quarot, r1: hadamard, r2: true, r4: true}")


def _parse_section(value: Any, at: YamlPath, keys: tuple[str, ...], args_class, example: str):
    """A mapping section built as ``args_class(**value)`` (None when absent); its SchemeError
    becomes the recipe error at ``at``."""
    if value is None:
        return None
    expect(value, dict, at, example=example)
    check_keys(value, keys, at)
    try:
        return args_class(**value)
    except SchemeError as exc:
        raise at.error(exc.message, hint=exc.hint) from None

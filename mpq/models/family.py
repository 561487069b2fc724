"""What mpq knows of a model family, as one frozen record, and the registry of those records.

A :class:`Family` covers one or more ``config.model_type`` values whose decoder blocks share a
structure.  Paths are dotted module paths *relative to one decoder block* (``self_attn.q_proj``)
unless a field says otherwise (``blocks``, ``Rotation.final_norm``: relative to the model).
Every part past the block path is optional: a missing part means "not supported for this
family", and the code that needs it raises a ModelError naming what is missing.

The records themselves, and the registry instance holding them, live in
:mod:`mpq.models.families`; this module holds the record types and the registry type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from mpq.errors import did_you_mean
from mpq.registry import RegistryError

NORM_KINDS = ("rmsnorm", "rmsnorm_plus_one", "layernorm")
PREV_KINDS = NORM_KINDS + ("linear",)
# the optional parts a record either has or refuses with a reason (Family.unsupported)
PARTS = ("attention", "scale_groups", "rotation")


@dataclass(frozen=True)
class Requires:
    """A condition on the model's config: ``getattr(config, key, default)`` is one of
    ``values``.  A scale group that holds only for some configs lists these."""

    key: str
    values: tuple[Any, ...]
    default: Any

    def holds(self, config) -> bool:
        return getattr(config, self.key, self.default) in self.values

    def __str__(self) -> str:
        return f"config.{self.key} in {self.values}"


@dataclass(frozen=True)
class ScaleGroup:
    """``prev`` (a block path) produces the input of every path in ``linears``, so a positive
    per-channel scale can move from ``prev``'s output into the linears' weight columns
    (mpq.transforms.scale_fold says how, per ``prev_kind``).  ``requires``: config conditions
    under which that is exact (all must hold)."""

    prev: str
    linears: tuple[str, ...]
    prev_kind: str
    requires: tuple[Requires, ...] = ()

    def __post_init__(self):
        if self.prev_kind not in PREV_KINDS:
            raise ValueError(f"prev_kind {self.prev_kind!r} is not one of {PREV_KINDS}")

    def __str__(self) -> str:
        return f"{self.prev} → {', '.join(self.linears)}"


@dataclass(frozen=True)
class Attention:
    """The attention module of a block (``path``, whose forward takes the KV cache) and its
    projections, as block paths: ``q_proj``/``k_proj``/``v_proj`` as separate linears, or
    ``qkv_proj`` when q, k and v are one fused linear (GPT-2's c_attn, GPT-NeoX's
    query_key_value, Phi-3's qkv_proj), and ``o_proj``.  The KV cache holds the keys (after the
    rotary embedding) and values the attention hands its cache's ``update``."""

    path: str
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    qkv_proj: str | None = None

    def __post_init__(self):
        separate = (self.q_proj, self.k_proj, self.v_proj)
        if self.o_proj is None or (self.qkv_proj is None) == (None in separate) or (
                self.qkv_proj is not None and any(separate)):
            raise ValueError(f"attention {self.path!r}: give o_proj and either q_proj, k_proj "
                             "and v_proj or one fused qkv_proj")
        for proj in self.projections:
            if not proj.startswith(self.path + "."):
                raise ValueError(f"projection {proj!r} is not inside attention {self.path!r}")

    @property
    def fused(self) -> bool:
        return self.qkv_proj is not None

    @property
    def projections(self) -> tuple[str, ...]:
        """Every projection path, inputs first."""
        inputs = (self.qkv_proj,) if self.fused else (self.q_proj, self.k_proj, self.v_proj)
        return (*inputs, self.o_proj)

    @property
    def scores(self) -> tuple[str, ...]:
        """The linears producing queries or keys (their error acts through the scores)."""
        return (self.qkv_proj,) if self.fused else (self.q_proj, self.k_proj)


@dataclass(frozen=True)
class Rotation:
    """What QuaRot needs beyond the attention projections and the MLP down projection: which
    norm feeds which linears (``readers``: the norm's scale is fused into them, and they read
    the rotated residual stream), which linears write the residual stream (``writers``), and
    the final norm before the output head (a model path); with a fused q/k/v attention, its
    projection must hold q, k and v concatenated in that order (R2 rotates v's rows, the last
    ones).  Only RMSNorm-like norms qualify:
    RMSNorm(x·Q) = RMSNorm(x)·Q for orthogonal Q, LayerNorm's mean subtraction is not."""

    readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    final_norm: str


@dataclass(frozen=True)
class Family:
    """Everything mpq's code needs to know of one model family.

    - ``name``: the family's name; ``model_types``: the ``config.model_type`` values it covers.
    - ``blocks``: model path of the decoder block list (a ``ModuleList``).
    - ``norm``: the kind of the block's norms (one of :data:`NORM_KINDS`;
      ``rmsnorm_plus_one`` computes ``norm(x) * (1 + w)``, Gemma's convention).
    - ``mlp_down``: the linear that reads the MLP's intermediate activation (QuaRot's online
      R4 site; the ``mlp_intermediate`` op of range profiling); None if there is none.
    - ``attention``: where the KV cache is (:class:`Attention`); None: KV-cache quantization
      is not supported (e.g. q/k/v stored as one fused linear).
    - ``scale_groups``: SmoothQuant/AWQ fold sites; empty: not supported.
    - ``rotation``: QuaRot support (:class:`Rotation`, needs ``attention`` and ``mlp_down``
      and an RMSNorm-like ``norm``); None: not supported.
    - ``fused``: groups of linears that serving engines (vLLM, TensorRT-LLM) run as one GEMM,
      so they must share one quantization scheme (q/k/v, gate/up).  Recorded for the serving
      pre-flight; no code reads it yet.
    - ``unsupported``: part name (one of :data:`PARTS`) → why the family does not have it,
      phrased to follow "not supported: ".  Every part in :data:`PARTS` is either given or
      refused here with its reason (never both), so each refusal names why.
    """

    name: str
    model_types: tuple[str, ...]
    blocks: str
    norm: str
    mlp_down: str | None = None
    attention: Attention | None = None
    scale_groups: tuple[ScaleGroup, ...] = ()
    rotation: Rotation | None = None
    fused: tuple[tuple[str, ...], ...] = ()
    unsupported: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        reasons = dict(self.unsupported)
        for part in PARTS:
            if bool(getattr(self, part)) and part in reasons:
                raise ValueError(f"family {self.name!r} has {part} and a reason it is "
                                 "unsupported: give one")
            if not getattr(self, part) and part not in reasons:
                raise ValueError(f"family {self.name!r} has no {part} and no reason why: add "
                                 f"('{part}', why) to unsupported")
        unknown = set(reasons) - set(PARTS)
        if unknown or len(reasons) != len(self.unsupported):
            raise ValueError(f"family {self.name!r}: unsupported names {sorted(unknown)} or a "
                             f"part twice; parts are {PARTS}")
        if not self.model_types:
            raise ValueError(f"family {self.name!r} covers no model type")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"family {self.name!r}: norm {self.norm!r} is not one of "
                             f"{NORM_KINDS}")
        for group in self.scale_groups:
            if group.prev_kind not in ("linear", self.norm):
                raise ValueError(f"family {self.name!r}: scale group '{group}' has prev_kind "
                                 f"{group.prev_kind!r}, the family's norms are {self.norm!r}")
        if self.rotation is not None:
            if self.norm == "layernorm" or self.attention is None or self.mlp_down is None:
                raise ValueError(f"family {self.name!r}: rotation needs RMSNorm-like norms, "
                                 "an attention record and mlp_down")

    @property
    def plus_one_norm(self) -> bool:
        return self.norm == "rmsnorm_plus_one"

    def why_not(self, part: str) -> str | None:
        """The reason ``part`` (one of :data:`PARTS`) is not supported; None when it is."""
        return dict(self.unsupported).get(part)


class FamilyRegistry:
    """Families by name and by the model types they cover, in registration order.

    A dict plus a register call, like :class:`mpq.registry.Registry`: a second family of the
    same name, or a model type claimed by two families, raises RegistryError; an unknown
    family name lists the known ones.
    """

    def __init__(self):
        self._by_name: dict[str, Family] = {}
        self._by_type: dict[str, Family] = {}

    def register(self, family: Family) -> Family:
        if family.name in self._by_name:
            raise RegistryError(f"model family '{family.name}' is registered twice")
        for model_type in family.model_types:
            other = self._by_type.get(model_type)
            if other is not None or family.model_types.count(model_type) > 1:
                owner = other.name if other is not None else family.name
                raise RegistryError(f"model type '{model_type}' is claimed by family "
                                    f"'{owner}' and by family '{family.name}'")
        self._by_name[family.name] = family
        self._by_type.update({model_type: family for model_type in family.model_types})
        return family

    def get(self, name: str) -> Family:
        try:
            return self._by_name[name]
        except KeyError:
            hint = (did_you_mean(name, self._by_name)
                    or f"known: {', '.join(sorted(self._by_name))}")
            raise RegistryError(f"unknown model family '{name}'", hint=hint) from None

    def for_model_type(self, model_type: str | None) -> Family | None:
        """The family covering ``model_type``; None for a type no record covers."""
        return self._by_type.get(model_type)

    def model_types(self) -> dict[str, Family]:
        """model_type → family, in registration order."""
        return dict(self._by_type)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Family]:
        return iter(list(self._by_name.values()))

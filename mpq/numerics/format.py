"""The number-format contract and its registry: one object per format owns what differs between
formats, so the rest of mpq asks the object instead of testing the format's name.

A :class:`NumberFormat` (stateless apart from its facts) owns

- its facts: ``bits`` (fixed element width, or None when ``args.bits`` chooses it), ``block`` (a
  group size along K fixed by the format, or None), the ``granularities`` it takes, whether it
  is ``symmetric_only`` and takes ``double_quant``;
- validation and defaults: :meth:`check_weight_args` (what :class:`~mpq.numerics.args.WeightArgs`
  checks for this format once the generic checks passed), :meth:`check_bits` (also for
  activations), :meth:`implied_weights` (what a recipe level that sets ``format:`` implies);
- :meth:`describe` (the short label of plans and ``repr``);
- RTN :meth:`quantize` / :meth:`dequantize` of a whole [N, K] tensor;
- its native encoding: :meth:`encode` / :meth:`decode` between a
  :class:`~mpq.numerics.base.QuantizedWeight` and named tensors with local keys (bit packing is
  :mod:`mpq.numerics.packing`'s), :meth:`native_bytes`, :meth:`ideal_bits`, and
  :meth:`stored_bytes` in any checkpoint format;
- what algorithms ask: ``gptq_columns`` (the :class:`ColumnGrid` class GPTQ quantizes with, None
  when GPTQ cannot run on the format), ``awq_clip`` (whether AWQ may clip its weights);
- ``activations``: whether linear inputs can be fake-quantized on this grid
  (:meth:`activation_half_range`, :meth:`activation_grid`);
- ``compressed_tensors`` / ``gptq_v1``: its records for the other checkpoint formats
  (:mod:`mpq.numerics.mappings`), which the writers read.

``mpq/numerics/__init__.py`` registers the formats in :data:`NUMBER_FORMATS`, in the order in
which messages list them.  Nothing in mpq.numerics imports config/, checkpoint/, quantizers/ or
analysis/.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping, Protocol

import torch

from mpq.errors import SchemeError
from mpq.numerics.mappings import CompressedTensorsMapping, GptqV1Mapping, NotExpressible
from mpq.registry import Registry

# The per-tensor args (mpq.numerics.args.WeightArgs) and the quantized weight
# (mpq.numerics.base.QuantizedWeight): both modules ask this one for the registered formats, so
# annotations here name them through these aliases instead of importing them.
WeightArgsT = Any
QuantizedWeightT = Any

class ClipSearch(Protocol):
    """GPTQ's clipping search as the grids that take it (``clip_search``) see it: the error
    weights of the input columns (diag H) and the int grid's searched parameters.  Positions
    are those the grid's parameters see: processing order for dynamic groups, else columns."""

    def weights(self, lo: int, hi: int) -> torch.Tensor:
        """Error weights (≥ 0) fp32 [hi − lo] of the columns at positions lo:hi."""

    def int_params(self, cols: torch.Tensor, lo: int, hi: int
                   ) -> tuple[torch.Tensor, "torch.Tensor | None"]:
        """Searched int (scale, zero) of ``cols`` [N, hi − lo], the columns at lo:hi."""


class ColumnGrid(Protocol):
    """A grid as GPTQ (mpq.quantizers.gptq_solve) walks it: one column at a time.

    Built as ``cls(args, w0, num_groups, dynamic, clip)`` from the weight ``w0`` [N, K] (dead
    columns zeroed).  With ``dynamic`` the solve calls :meth:`set_group` with a group's current
    (error-updated) columns when it reaches the group's first column; otherwise the constructor
    fixes every parameter from ``w0``.  ``clip`` (a :class:`ClipSearch`, only where
    ``clip_search``) makes the parameters minimise the column-weighted error instead of
    covering the min-max range.  ``codes`` [K, N] holds the codes in processing order;
    :meth:`params` returns scale and zero laid out as :class:`~mpq.numerics.base.QuantizedWeight`
    wants them.
    """

    act_order: ClassVar[bool]  # columns may be processed out of order (a g_idx is stored)
    # act-order with static groups only: every column keeps its place in its group, so the
    # grid's groups stay consecutive columns and no g_idx is stored (the GGUF block types)
    static_act_order: ClassVar[bool]
    clip_search: ClassVar[bool]  # takes a ClipSearch
    codes: torch.Tensor

    @classmethod
    def check(cls, args: "WeightArgsT") -> None:
        """Raise SchemeError for args this grid cannot produce with GPTQ."""

    def set_group(self, g: int, cols: torch.Tensor) -> None: ...

    def column(self, p: int, c: int, g: int, w: torch.Tensor) -> torch.Tensor:
        """Codes of the column processed at position ``p`` (column ``c`` of the weight, group
        row ``g``) from its current weights ``w`` [N]; returns their dequantized values (fp32
        [N])."""

    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class InOrderColumns:
    """Base of the column grids GPTQ walks in column order only, without a clipping search,
    and that accept every args their format accepts (mxint8, fp8; the GGUF types override)."""

    act_order: ClassVar[bool] = False
    static_act_order: ClassVar[bool] = False
    clip_search: ClassVar[bool] = False

    @classmethod
    def check(cls, args: "WeightArgsT") -> None:
        """Nothing to refuse: the format's own checks cover these grids."""


class NumberFormat(ABC):
    """Base of the number formats: facts, the generic checks and byte counts (see the module
    docstring); subclasses give the grid and the native encoding."""

    name: str
    bits: int | None = None
    block: int | None = None
    granularities: tuple[str, ...] = ("group",)
    symmetric_only: bool = True
    double_quant: bool = False
    scale_dtypes: bool = False  # takes WeightArgs.scale_dtype (rounds its scales to fp16/bf16)
    full_range: bool = False  # takes WeightArgs.full_range (signed extreme scales: int)
    awq_clip: bool = False
    # quantize(weight, args, col_weight=...) takes error weights of the input columns and
    # chooses its block parameters for the least weighted error (the GGUF block types; the int
    # grid's search is mpq.quantizers.clip_search)
    weighted_params: bool = False
    holds_zero: bool = True  # 0 is a grid value of every scale (not so with a float block min)
    activations: bool = False
    gptq_columns: type[ColumnGrid] | None = None
    # the format to suggest for rows its fixed block does not divide (a rule's fallback:)
    fallback_format: str | None = None
    compressed_tensors: CompressedTensorsMapping | NotExpressible
    gptq_v1: GptqV1Mapping | NotExpressible

    # --- validation and defaults -----------------------------------------------------------

    def check_bits(self, bits: int, *, activation: bool = False) -> None:
        """Raise SchemeError unless the format has ``bits`` bits (weights or activations)."""
        if self.bits is not None and bits != self.bits:
            raise SchemeError(f"{self.name} has {self.bits} bits, got {bits}",
                              hint=f"set bits: {self.bits}")

    def check_weight_args(self, args: "WeightArgsT") -> None:
        """Raise SchemeError for ``args`` this format cannot take.  WeightArgs has already
        checked the types, the granularity name, group_size and whether it takes 'block'."""
        self.check_bits(args.bits)
        if self.symmetric_only and not args.symmetric:
            raise SchemeError(f"{self.name} is symmetric only", hint="remove symmetric: false")
        if self.block is not None:
            if args.granularity != "group" or args.group_size != self.block:
                raise SchemeError(f"{self.name} uses blocks of {self.block} along the input "
                                  "dimension",
                                  hint=f"set granularity: group, group_size: {self.block}")
        elif args.granularity not in self.granularities:
            allowed = ", ".join(self.granularities[:-1]) + f" or {self.granularities[-1]}"
            raise SchemeError(f"{self.name} supports granularity {allowed}",
                              hint="use granularity: channel")

    def implied_weights(self, merged: Mapping[str, Any]) -> dict[str, Any]:
        """Fields a recipe level that sets ``format: <name>`` implies where it leaves them out
        (``merged``: the level over its base): the fixed bits, symmetric, the fixed block or
        channel instead of a group the format does not take, no double_quant unless taken and
        fp32 scales unless the format takes a scale_dtype, no full_range unless taken."""
        implied: dict[str, Any] = {}
        if self.bits is not None:
            implied["bits"] = self.bits
        if self.symmetric_only:
            implied["symmetric"] = True
        if self.block is not None:
            implied.update(granularity="group", group_size=self.block)
        elif merged.get("granularity") == "group" and "group" not in self.granularities:
            implied["granularity"] = "channel"
        if not self.double_quant:
            implied["double_quant"] = False
        if not self.scale_dtypes:
            implied["scale_dtype"] = "fp32"
        if not self.full_range:
            implied["full_range"] = False
        return implied

    # --- labels ----------------------------------------------------------------------------

    def bits_label(self, bits: int) -> str:
        """The format with its width where that varies, e.g. 'int4'; else its name."""
        return self.name

    def describe(self, args: "WeightArgsT") -> str:
        """Short label, e.g. 'int4 sym g64', 'fp8_e4m3 block128', 'nf4 g64 dq', 'mxfp4'."""
        label = self.bits_label(args.bits) + args.granularity_label()
        return label + (" dq" if args.double_quant else "")

    # --- the grid --------------------------------------------------------------------------

    @abstractmethod
    def quantize(self, weight: torch.Tensor, args: "WeightArgsT") -> "QuantizedWeightT":
        """Round-to-nearest quantization of a whole weight [N, K]."""

    @abstractmethod
    def dequantize(self, qw: "QuantizedWeightT", dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
        """The weight [N, K] that ``qw`` represents, in ``dtype``."""

    def activation_half_range(self, bits: int) -> float:
        """absmax / scale of the activation grid (only where ``activations``)."""
        raise NotImplementedError(f"{self.name} does not quantize activations")

    def activation_grid(self, y: torch.Tensor, bits: int) -> torch.Tensor:
        """fp32 ``y`` (inputs divided by their scale) rounded onto the grid (only where
        ``activations``)."""
        raise NotImplementedError(f"{self.name} does not quantize activations")

    # --- the native encoding and sizes -----------------------------------------------------

    @abstractmethod
    def encode(self, qw: "QuantizedWeightT") -> dict[str, torch.Tensor]:
        """Named tensors (local keys) storing ``qw`` losslessly in mpq's native format."""

    @abstractmethod
    def decode(self, tensors: Mapping[str, torch.Tensor], args: "WeightArgsT",
               shape: tuple[int, int], prefix: str = "") -> "QuantizedWeightT":
        """Inverse of :meth:`encode` for a weight of ``shape`` whose ``args`` already passed
        ``check_shape``; every tensor read is checked (mpq.numerics.stored.take), ArtifactError
        naming ``prefix + key`` otherwise.  Keys the format does not use are ignored."""

    @abstractmethod
    def native_bytes(self, args: "WeightArgsT", shape: tuple[int, int], *,
                     act_order: bool = False) -> int:
        """Bytes :meth:`encode` writes for a weight of ``shape`` (with a g_idx if
        ``act_order``)."""

    @abstractmethod
    def ideal_bits(self, args: "WeightArgsT", shape: tuple[int, int], *,
                   act_order: bool = False) -> float:
        """Bits per weight of an unpadded encoding: codes plus the scales, zeros and g_idx."""

    def mapping(self, container: str) -> CompressedTensorsMapping | GptqV1Mapping \
            | NotExpressible | None:
        """This format's record for checkpoint format ``container`` (None: mpq's own)."""
        return {"compressed-tensors": self.compressed_tensors,
                "gptq": self.gptq_v1}.get(container)

    def stored_bytes(self, args: "WeightArgsT", shape: tuple[int, int], container: str = "mpq",
                     *, dtype_bytes: int = 4, act_order: bool = False,
                     quantized_inputs: bool = False) -> int:
        """Bytes of one layer's stored weight tensors in ``container`` (its scales in
        ``dtype_bytes`` bytes where the container stores them in the model's dtype).  Where the
        container cannot express the format, the native bytes."""
        mapping = self.mapping(container)
        if isinstance(mapping, CompressedTensorsMapping):
            return mapping.layer_bytes(self, args, shape, dtype_bytes=dtype_bytes,
                                       quantized_inputs=quantized_inputs)
        if isinstance(mapping, GptqV1Mapping):
            return mapping.layer_bytes(args, shape)
        return self.native_bytes(args, shape, act_order=act_order)


NUMBER_FORMATS: Registry[NumberFormat] = Registry("number format")


def format_names(where: Callable[[NumberFormat], bool] = lambda f: True) -> list[str]:
    """Registered format names in registration order, those for which ``where`` holds."""
    return [name for name, fmt in NUMBER_FORMATS.in_order() if where(fmt)]

"""Typed, frozen per-tensor quantization args: how one weight or activation tensor is represented.

``WeightArgs`` says how one weight tensor [N=out, K=in] is represented, ``ActivationArgs`` how a
linear's inputs are quantized at inference.  Both validate themselves on construction and raise
:class:`SchemeError`; the recipe parser re-raises with the YAML path.  The generic checks (types,
granularity names, group sizes) are here; what a number format allows is the registered format
object's business (:mod:`mpq.numerics.format`).  Which algorithm produces a weight is the
per-layer scheme's business (mpq.config.scheme).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mpq.errors import SchemeError
from mpq.numerics.format import NUMBER_FORMATS, NumberFormat, format_names

GRANULARITIES = ("tensor", "channel", "group", "block")
SCALE_DTYPES = ("fp32", "fp16", "bf16")  # WeightArgs.scale_dtype
FP8_BLOCK = 128  # granularity "block": 128 output rows × 128 input columns


def number_format(name: Any) -> NumberFormat:
    """The registered format ``name``; SchemeError listing the known ones otherwise."""
    if not isinstance(name, str) or name not in NUMBER_FORMATS:
        raise SchemeError(f"unknown number format '{name}'",
                          hint=f"use one of {', '.join(format_names())}")
    return NUMBER_FORMATS.get(name)


@dataclass(frozen=True)
class WeightArgs:
    """How one weight tensor is quantized.

    - ``format``: a registered number format (``mpq list``; the module of each in
      mpq/numerics/ documents it): ``int`` (2–8 bits), ``fp8_e4m3`` / ``fp8_e5m2`` (8 bits),
      ``nf4`` (4 bits), the OCP MX formats ``mxfp4``, ``mxfp8``, ``nvfp4``, ...  Formats with a
      fixed block (nf4, the MX formats, nvfp4) fix their bits and group size.
    - ``granularity``: ``tensor`` (one scale), ``channel`` (one per output row), ``group``
      (``group_size`` consecutive input columns of a row share a scale) or ``block`` (one scale
      per 128×128 tile; N and K need not be multiples of 128; fp8_e4m3).
    - ``symmetric``: asymmetric (int) adds a per-scale integer zero point.
    - ``double_quant``: nf4 only; the per-block absmax values are themselves quantized to 8 bits.
    - ``scale_dtype``: ``fp32`` (default), ``fp16`` or ``bf16``; formats that take it (``int``,
      ``fp8_e4m3``/``fp8_e5m2``; the microscaled ones fix their own)
      round every scale to this dtype *before* the codes are computed, so the stored scales are
      exactly the ones the algorithm used (fp16 is what GPTQ v1 stores; bf16/fp16 what
      compressed-tensors stores for a bf16/fp16 model).  Left out of :meth:`to_dict` when fp32,
      so plans written before this key read back unchanged.
    - ``full_range``: symmetric ``int`` only: each scale is the group's extreme weight (the one
      of largest magnitude, with its sign) over −2^(b−1), so that weight lands exactly on the
      grid's lone extra level and all 2^b levels are used (llama.cpp's q4_0 convention; scales
      may be negative).  Default false: absmax / (2^(b−1) − ½), compressed-tensors' formula.
      Left out of :meth:`to_dict` when false.
    """

    format: str = "int"
    bits: int = 4
    symmetric: bool = True
    granularity: str = "group"
    group_size: int | None = 128
    double_quant: bool = False
    scale_dtype: str = "fp32"
    full_range: bool = False

    def __post_init__(self) -> None:
        for name in ("bits", "group_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SchemeError(f"{name} must be an integer, got {value!r}",
                                  hint=f"e.g. {name}: {4 if name == 'bits' else 128}")
        fmt = number_format(self.format)
        if self.granularity not in GRANULARITIES:
            raise SchemeError(f"unknown granularity '{self.granularity}'",
                              hint=f"use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise SchemeError(f"group_size must be a positive integer, got {self.group_size!r}",
                                  hint="e.g. 64 or 128; or use granularity 'channel'")
        elif self.group_size is not None:
            raise SchemeError(f"group_size is only used with granularity 'group', not "
                              f"'{self.granularity}'", hint="remove group_size")
        if self.granularity == "block" and "block" not in fmt.granularities:
            takers = " and ".join(format_names(lambda f: "block" in f.granularities))
            raise SchemeError(f"granularity 'block' ({FP8_BLOCK}×{FP8_BLOCK} tiles) is for "
                              f"{takers} only, not {self.format}",
                              hint="use granularity: channel or group")
        fmt.check_weight_args(self)
        if self.double_quant and not fmt.double_quant:
            takers = " and ".join(format_names(lambda f: f.double_quant))
            raise SchemeError(f"double_quant applies to {takers} only", hint="remove double_quant")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"unknown scale_dtype {self.scale_dtype!r}",
                              hint=f"use one of {', '.join(SCALE_DTYPES)}")
        if self.full_range and not fmt.full_range:
            takers = " and ".join(format_names(lambda f: f.full_range))
            raise SchemeError(f"full_range applies to {takers} only, not {self.format}",
                              hint="remove full_range")
        if self.full_range and not self.symmetric:
            raise SchemeError("full_range applies to symmetric scales only (an asymmetric grid "
                              "already uses its whole range)",
                              hint="remove full_range or symmetric: false")
        if self.scale_dtype != "fp32" and not fmt.scale_dtypes:
            takers = " and ".join(format_names(lambda f: f.scale_dtypes))
            raise SchemeError(f"scale_dtype applies to {takers} only ({self.format} stores "
                              "its scales in its own dtype)", hint="remove scale_dtype")

    def check_shape(self, shape: tuple[int, int], where: str = "") -> None:
        """Raise SchemeError when these args cannot represent a weight of ``shape`` [N, K]."""
        where = f"{where}: " if where else ""
        if len(shape) != 2:
            raise SchemeError(f"{where}expected a 2-D weight, got shape {tuple(shape)}")
        k = shape[1]
        if self.granularity == "group" and k % self.group_size:
            message = f"{where}group_size {self.group_size} does not divide the input dimension {k}"
            fmt = NUMBER_FORMATS.get(self.format)
            if fmt.block is not None:
                fallback = (f"give the rule fallback: {{format: {fmt.fallback_format}}}, "
                            if fmt.fallback_format else "")
                raise SchemeError(message, hint=f"{self.format} needs a multiple of "
                                  f"{self.group_size} inputs: {fallback}skip this layer "
                                  "(skip: true) or use another format")
            divisors = [g for g in (32, 64, 128) if k % g == 0]
            raise SchemeError(message, hint=f"use group_size {divisors[-1]}" if divisors
                              else "use granularity: channel")

    def num_groups(self, k: int) -> int:
        """Scale columns along K: K/g (group), ceil(K/128) (block), else 1."""
        if self.granularity == "block":
            return -(-k // FP8_BLOCK)
        return k // self.group_size if self.granularity == "group" else 1

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(rows, columns) of the scales of a weight [N, K]: [1, 1] (tensor), [N, G] (channel,
        group) or [ceil(N/128), ceil(K/128)] (block)."""
        n, k = shape
        if self.granularity == "tensor":
            return 1, 1
        if self.granularity == "block":
            return -(-n // FP8_BLOCK), self.num_groups(k)
        return n, self.num_groups(k)

    def granularity_label(self) -> str:
        """' g64', ' block128', ' channel' or ' tensor'."""
        if self.granularity == "group":
            return f" g{self.group_size}"
        if self.granularity == "block":
            return f" block{FP8_BLOCK}"
        return f" {self.granularity}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, default in (("scale_dtype", "fp32"), ("full_range", False)):
            if out[key] == default:  # the default: absent, as before the key existed
                del out[key]
        return out

    def describe(self) -> str:
        """Short human label, e.g. 'int4 sym g64', 'fp8_e4m3 channel', 'fp8_e4m3 block128',
        'nf4 g64 dq', 'mxfp4', 'nvfp4' (the mx/nv formats' block is part of their name)."""
        return NUMBER_FORMATS.get(self.format).describe(self)


ACT_GRANULARITIES = ("token", "tensor")


@dataclass(frozen=True)
class ActivationArgs:
    """How a linear's input activations are quantized at inference (fake-quantized: quantize,
    then dequantize before the matmul; see :mod:`mpq.numerics.activations`).

    - ``format``: a number format that quantizes activations (``activations`` set):
      ``int`` (2–8 bits, symmetric) or ``fp8_e4m3`` (8 bits).
    - ``dynamic``: scales computed from each input at run time; else one static scale per tensor,
      calibrated (abs-max over the calibration inputs) and stored in the artifact.
    - ``granularity``: ``token`` (one scale per token; dynamic only) or ``tensor``.
    """

    format: str = "int"
    bits: int = 8
    dynamic: bool = True
    granularity: str = "token"
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise SchemeError(f"activation bits must be an integer, got {self.bits!r}")
        fmt = NUMBER_FORMATS.get(self.format) if isinstance(self.format, str) \
            and self.format in NUMBER_FORMATS else None
        if fmt is None or not fmt.activations:
            raise SchemeError(f"unknown activation format '{self.format}'",
                              hint=f"use one of {', '.join(format_names(lambda f: f.activations))}")
        if self.granularity not in ACT_GRANULARITIES:
            raise SchemeError(f"unknown activation granularity '{self.granularity}'",
                              hint=f"use one of {', '.join(ACT_GRANULARITIES)}")
        if not self.symmetric:
            raise SchemeError("asymmetric activation quantization is not supported",
                              hint="remove symmetric: false")
        fmt.check_bits(self.bits, activation=True)
        if not self.dynamic and self.granularity != "tensor":
            raise SchemeError("static activation scales are per tensor",
                              hint="set granularity: tensor, or dynamic: true")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Short label, e.g. 'int8 dynamic token', 'fp8_e4m3 static tensor'."""
        name = NUMBER_FORMATS.get(self.format).bits_label(self.bits)
        return f"{name} {'dynamic' if self.dynamic else 'static'} {self.granularity}"

"""Typed, frozen per-tensor quantization args: how one weight or activation tensor is represented.

``WeightArgs`` says how one weight tensor [N=out, K=in] is represented, ``ActivationArgs`` how a
linear's inputs are quantized at inference.  Both validate themselves on construction and raise
:class:`SchemeError`; the recipe parser re-raises with the YAML path.  Which algorithm produces a
weight is the per-layer scheme's business (mpq.config.scheme).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mpq.errors import SchemeError

NUMBER_FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "nf4", "mxfp4", "mxfp8", "nvfp4")
GRANULARITIES = ("tensor", "channel", "group", "block")
INT_BITS = range(2, 9)
NF4_BLOCK = 64
MX_BLOCK = 32  # mxfp4 / mxfp8: OCP microscaling blocks of 32 input columns
NVFP4_BLOCK = 16
FP8_BLOCK = 128  # granularity "block": 128 output rows × 128 input columns
# formats whose group size is fixed by the format: name -> (bits, group size)
FIXED_BLOCK_FORMATS = {"nf4": (4, NF4_BLOCK), "mxfp4": (4, MX_BLOCK), "mxfp8": (8, MX_BLOCK),
                       "nvfp4": (4, NVFP4_BLOCK)}


@dataclass(frozen=True)
class WeightArgs:
    """How one weight tensor is quantized.

    - ``format``: ``int`` (2–8 bits), ``fp8_e4m3`` / ``fp8_e5m2`` (8 bits), ``nf4`` (4 bits),
      ``mxfp4`` (FP4 E2M1, E8M0 scale per 32 columns), ``mxfp8`` (FP8 E4M3, E8M0 scale per 32),
      ``nvfp4`` (FP4 E2M1, FP8 E4M3 scale per 16 columns plus one fp32 global scale).
      nf4, mxfp4, mxfp8 and nvfp4 fix their bits and group size (see FIXED_BLOCK_FORMATS).
    - ``granularity``: ``tensor`` (one scale), ``channel`` (one per output row), ``group``
      (``group_size`` consecutive input columns of a row share a scale) or ``block`` (fp8_e4m3
      only: one scale per 128×128 tile; N and K need not be multiples of 128).
    - ``symmetric``: int only; asymmetric adds a per-scale integer zero point.
    - ``double_quant``: nf4 only; the per-block absmax values are themselves quantized to 8 bits.
    """

    format: str = "int"
    bits: int = 4
    symmetric: bool = True
    granularity: str = "group"
    group_size: int | None = 128
    double_quant: bool = False

    def __post_init__(self) -> None:
        for name in ("bits", "group_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise SchemeError(f"{name} must be an integer, got {value!r}",
                                  hint=f"e.g. {name}: {4 if name == 'bits' else 128}")
        if self.format not in NUMBER_FORMATS:
            raise SchemeError(f"unknown number format '{self.format}'",
                              hint=f"use one of {', '.join(NUMBER_FORMATS)}")
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
        if self.granularity == "block" and self.format != "fp8_e4m3":
            raise SchemeError(f"granularity 'block' ({FP8_BLOCK}×{FP8_BLOCK} tiles) is for "
                              f"fp8_e4m3 only, not {self.format}",
                              hint="use granularity: channel or group")
        if self.format == "int":
            if self.bits not in INT_BITS:
                raise SchemeError(f"int bits must be 2..8, got {self.bits}",
                                  hint="e.g. bits: 4 or bits: 8; for other widths choose another "
                                       "format (fp8_e4m3, nf4, mxfp4, ...)")
        elif self.format.startswith("fp8"):
            if self.bits != 8:
                raise SchemeError(f"{self.format} has 8 bits, got {self.bits}", hint="set bits: 8")
            if not self.symmetric:
                raise SchemeError(f"{self.format} is symmetric only", hint="remove symmetric: false")
            if self.granularity == "group":
                allowed = "tensor, channel or block" if self.format == "fp8_e4m3" else \
                    "tensor or channel"
                raise SchemeError(f"{self.format} supports granularity {allowed}",
                                  hint="use granularity: channel")
        else:
            self._check_fixed_block()
        if self.double_quant and self.format != "nf4":
            raise SchemeError("double_quant applies to nf4 only", hint="remove double_quant")

    def _check_fixed_block(self) -> None:
        bits, block = FIXED_BLOCK_FORMATS[self.format]
        if self.bits != bits:
            raise SchemeError(f"{self.format} has {bits} bits, got {self.bits}",
                              hint=f"set bits: {bits}")
        if not self.symmetric:
            raise SchemeError(f"{self.format} is symmetric only", hint="remove symmetric: false")
        if self.granularity != "group" or self.group_size != block:
            raise SchemeError(f"{self.format} uses blocks of {block} along the input dimension",
                              hint=f"set granularity: group, group_size: {block}")

    def check_shape(self, shape: tuple[int, int], where: str = "") -> None:
        """Raise SchemeError when these args cannot represent a weight of ``shape`` [N, K]."""
        where = f"{where}: " if where else ""
        if len(shape) != 2:
            raise SchemeError(f"{where}expected a 2-D weight, got shape {tuple(shape)}")
        k = shape[1]
        if self.granularity == "group" and k % self.group_size:
            message = f"{where}group_size {self.group_size} does not divide the input dimension {k}"
            if self.format in FIXED_BLOCK_FORMATS:
                raise SchemeError(message, hint=f"{self.format} needs a multiple of "
                                  f"{self.group_size} inputs: skip this layer (skip: true) or "
                                  "use another format")
            divisors = [g for g in (32, 64, 128) if k % g == 0]
            raise SchemeError(message, hint=f"use group_size {divisors[-1]}" if divisors
                              else "use granularity: channel")

    def num_groups(self, k: int) -> int:
        """Scale columns along K: K/g (group), ceil(K/128) (block), else 1."""
        if self.granularity == "block":
            return -(-k // FP8_BLOCK)
        return k // self.group_size if self.granularity == "group" else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Short human label, e.g. 'int4 sym g64', 'fp8_e4m3 channel', 'fp8_e4m3 block128',
        'nf4 g64 dq', 'mxfp4', 'nvfp4' (the mx/nv formats' block is part of their name)."""
        if self.format in ("mxfp4", "mxfp8", "nvfp4"):
            return self.format
        if self.format == "int":
            label = f"int{self.bits} {'sym' if self.symmetric else 'asym'}"
        else:
            label = self.format
        if self.granularity == "group":
            label += f" g{self.group_size}"
        elif self.granularity == "block":
            label += f" block{FP8_BLOCK}"
        else:
            label += f" {self.granularity}"
        return label + (" dq" if self.double_quant else "")


ACT_FORMATS = ("int", "fp8_e4m3")
ACT_GRANULARITIES = ("token", "tensor")


@dataclass(frozen=True)
class ActivationArgs:
    """How a linear's input activations are quantized at inference (fake-quantized: quantize,
    then dequantize before the matmul; see :mod:`mpq.numerics.activations`).

    - ``format``: ``int`` (2–8 bits, symmetric) or ``fp8_e4m3`` (8 bits).
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
        if self.format not in ACT_FORMATS:
            raise SchemeError(f"unknown activation format '{self.format}'",
                              hint=f"use one of {', '.join(ACT_FORMATS)}")
        if self.granularity not in ACT_GRANULARITIES:
            raise SchemeError(f"unknown activation granularity '{self.granularity}'",
                              hint=f"use one of {', '.join(ACT_GRANULARITIES)}")
        if not self.symmetric:
            raise SchemeError("asymmetric activation quantization is not supported",
                              hint="remove symmetric: false")
        if self.format == "int" and self.bits not in INT_BITS:
            raise SchemeError(f"int activation bits must be 2..8, got {self.bits}")
        if self.format == "fp8_e4m3" and self.bits != 8:
            raise SchemeError(f"fp8_e4m3 has 8 bits, got {self.bits}", hint="set bits: 8")
        if not self.dynamic and self.granularity != "tensor":
            raise SchemeError("static activation scales are per tensor",
                              hint="set granularity: tensor, or dynamic: true")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Short label, e.g. 'int8 dynamic token', 'fp8_e4m3 static tensor'."""
        name = f"int{self.bits}" if self.format == "int" else self.format
        return f"{name} {'dynamic' if self.dynamic else 'static'} {self.granularity}"

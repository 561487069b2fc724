"""How the other checkpoint formats store a number format: records the writers read.

Each :class:`mpq.numerics.format.NumberFormat` carries one record per checkpoint format
(``compressed_tensors``, ``gptq_v1``): either the mapping, or :class:`NotExpressible` with the
reason a writer reports (after ``<layer>: ``) when it refuses a plan (exit 9).  The writers
(mpq.checkpoint.compressed_tensors, mpq.checkpoint.gptq_v1) read these records and never name a
number format; nothing here imports them.  The byte counts are what the writers store, for the
dry-run estimate and mixed precision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from mpq.numerics.packing import packed_width

# mpq.numerics.args.WeightArgs and mpq.numerics.format.NumberFormat build on this module, so
# annotations here name them through these aliases instead of importing them.
WeightArgsT = Any
NumberFormatT = Any


@dataclass(frozen=True)
class NotExpressible:
    """The checkpoint format cannot store this number format, because ``reason``."""

    reason: str


@dataclass(frozen=True)
class CompressedTensorsMapping:
    """How compressed-tensors (0.20) stores one number format.

    - ``type``: QuantizationArgs' ``type``, ``int`` or ``float``.
    - ``layout`` of a layer's tensors: ``int`` (``pack-quantized``: the packed codes, scales in the
      model dtype and ``weight_shape``; with quantized inputs ``int-quantized``: int8 codes),
      ``float`` (``weight`` one byte per code and ``weight_scale`` in the model dtype) or
      ``native`` (mpq's native tensors unchanged, renamed by ``names``).
    - ``format``: the per-layer format compressed-tensors infers for weight-only layers;
      ``format_with_inputs`` the one with quantized input activations (None: not expressible).
    - ``strategy`` / ``scale_dtype``: fixed by the number format (None: the strategy follows
      the granularity and the scales take the model dtype).
    - ``names``: native key → compressed-tensors key (``native`` layout).
    - ``zero_points``: granularities at which asymmetric zero points are stored.
    """

    type: str
    layout: str
    format: str
    format_with_inputs: str | None = None
    strategy: str | None = None
    scale_dtype: str | None = None
    names: tuple[tuple[str, str], ...] = ()
    zero_points: tuple[str, ...] = ()

    def layer_format(self, quantized_inputs: bool) -> str | None:
        """compressed-tensors' per-layer format; None when it cannot have quantized inputs."""
        return self.format_with_inputs if quantized_inputs else self.format

    def layer_bytes(self, fmt: "NumberFormatT", args: "WeightArgsT", shape: tuple[int, int], *,
                    dtype_bytes: int, quantized_inputs: bool) -> int:
        """Bytes of one layer's stored weight tensors (scales in ``dtype_bytes`` bytes each)."""
        if self.layout == "native":
            return fmt.native_bytes(args, shape)
        n, k = shape
        rows, groups = args.scale_shape(shape)
        scales = rows * groups
        if self.layout == "float":
            return n * k + dtype_bytes * scales
        if quantized_inputs:  # int-quantized: int8 codes and zero points, unpacked
            return n * k + dtype_bytes * scales + (0 if args.symmetric else scales)
        zero_words = 0 if args.symmetric else packed_width(rows, args.bits) * groups
        return 4 * n * packed_width(k, args.bits) + dtype_bytes * scales + 4 * zero_words + 16


@dataclass(frozen=True)
class GptqV1Mapping:
    """GPTQ v1 stores this number format: unsigned int codes packed along K, zero points minus
    one packed along N, float16 scales per group and a g_idx (mpq.checkpoint.gptq_v1)."""

    def layer_bytes(self, args: "WeightArgsT", shape: tuple[int, int]) -> int:
        """Bytes of qweight, qzeros, scales and g_idx of one layer."""
        n, k = shape
        bits = args.bits
        g = args.scale_shape(shape)[1] if args.granularity == "group" else 1
        return (4 * packed_width(k, bits) * n + 4 * g * packed_width(n, bits) + 2 * g * n
                + 4 * k)

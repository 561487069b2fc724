"""Number formats as objects (int, fp8, nf4, MX, NVFP4, GGUF block, K-quant and IQ4_NL grids), packing,
activation fake-quantization: pure tensor functions; nothing here walks a model.

Importing this package registers the built-in number formats (:mod:`mpq.numerics.format`), in
the order in which messages list them.  A new format is one module defining its
:class:`~mpq.numerics.format.NumberFormat` object plus one entry here.
"""
from mpq.numerics.format import NUMBER_FORMATS
from mpq.numerics.fp8 import FP8_E4M3, FP8_E5M2
from mpq.numerics.gguf_iq4nl import IQ4_NL
from mpq.numerics.gguf_kquants import GGUF_KQUANTS
from mpq.numerics.gguf_legacy import GGUF_LEGACY
from mpq.numerics.int_grid import INT_GRID
from mpq.numerics.microscaling import MXFP4, MXFP8
from mpq.numerics.mxint8 import MXINT8
from mpq.numerics.nf4 import NF4
from mpq.numerics.nvfp4 import NVFP4

for _format in (INT_GRID, FP8_E4M3, FP8_E5M2, NF4, MXFP4, MXFP8, NVFP4, MXINT8, *GGUF_LEGACY,
                *GGUF_KQUANTS, IQ4_NL):
    NUMBER_FORMATS.register(_format.name)(_format)

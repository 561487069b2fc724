"""Number formats as pure tensor functions (grids, packing, activation fake-quantization).

Nothing here walks a model.  Importing this package registers the built-in number formats.
"""
from mpq.numerics import fp8, int_grid, nf4  # noqa: F401  (registration side effects)
from mpq.numerics import microscaling, nvfp4  # noqa: F401  (mxfp4, mxfp8, nvfp4)

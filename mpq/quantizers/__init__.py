"""Quantizers and number formats; importing this package registers the built-in ones."""
from mpq.quantizers import fp8, int_grid, nf4, rtn  # noqa: F401  (registration side effects)
from mpq.quantizers import microscaling, nvfp4  # noqa: F401  (mxfp4, mxfp8, nvfp4)
from mpq.quantizers import gptq  # noqa: F401  (registers "gptq")

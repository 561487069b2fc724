"""Quantizers and number formats; importing this package registers the built-in ones."""
from mpq.quantizers import fp8, int_grid, nf4, rtn  # noqa: F401  (registration side effects)
from mpq.quantizers import gptq  # noqa: F401  (registers "gptq")

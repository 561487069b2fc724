"""Quantization algorithms; importing this package registers the built-in ones (rtn, gptq)."""
from mpq.quantizers import gptq, rtn  # noqa: F401  (registration side effects)

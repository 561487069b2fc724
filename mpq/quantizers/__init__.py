"""Quantization algorithms; importing this package registers the built-in ones (rtn, gptq,
autoround)."""
from mpq.quantizers import autoround, gptq, rtn  # noqa: F401  (registration side effects)

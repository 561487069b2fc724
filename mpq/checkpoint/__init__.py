"""Checkpoint formats. ``WRITERS`` maps an output format name to its writer."""
from mpq.checkpoint.writers import WRITERS
from mpq.checkpoint import compressed_tensors, gptq_v1, native_writer  # noqa: F401  (registration)

__all__ = ["WRITERS"]

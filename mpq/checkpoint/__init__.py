"""Checkpoint formats. ``WRITERS`` maps an output format name to its writer."""
from mpq.checkpoint.writers import WRITERS
from mpq.checkpoint import (compressed_tensors, gguf_writer, gptq_v1,  # noqa: F401
                            native_writer)  # (registration)

__all__ = ["WRITERS"]

"""Checkpoint formats. ``WRITERS`` maps an output format name to its writer."""
from mpq.formats.native import write_artifact
from mpq.registry import Registry

WRITERS: Registry = Registry("output format")
WRITERS.register("mpq")(write_artifact)

"""Which calibration data a run uses, and how it is cut into samples and batches."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CalibrationOptions:
    """``source``: a text/jsonl/parquet file, a saved dataset folder or ``hf:NAME[:CONFIG]``
    (None: no calibration); ``num_samples`` samples of ``seq_len`` tokens drawn with ``seed``
    (``mode`` concat or document; ``field``/``split`` for structured sources); samples run
    through a block in batches of ``max(1, batch_tokens // seq_len)``."""

    source: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    mode: str = "concat"
    field: str = "text"
    split: str | None = None
    batch_tokens: int = 2048

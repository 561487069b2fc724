"""Stopping a run cleanly: SIGINT/SIGTERM ask the pipeline to stop at the next safe point.

A safe point is the end of a decoder block, once its checkpoint is on disk (mpq.engine.resume); the run
then raises :class:`mpq.errors.Interrupted` (exit 128 + signal number) and a rerun resumes.  A
second SIGINT while waiting interrupts at once (KeyboardInterrupt); the checkpoint files are
written atomically, so the work directory stays consistent either way.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class StopRequest:
    """Set by the signal handlers; polled by the pipeline between blocks."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_number == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.requested else ""


@contextmanager
def stop_at_safe_points() -> Iterator[StopRequest]:
    """Install SIGINT/SIGTERM handlers for the duration (main thread only; elsewhere the
    request never fires and signals keep their default behaviour)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

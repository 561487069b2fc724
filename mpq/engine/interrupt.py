"""Stopping a run cleanly: SIGINT/SIGTERM ask the engine to stop at the next safe point.

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

from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.errors import Interrupted


class StopRequest:
    """Set by the signal handlers; polled by the engine (StopHook) after each block."""

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


class StopHook(RunHook):
    """At the end of each block this run quantized (once it is saved): raise Interrupted when a
    stop was requested of any process (all processes stop together)."""

    def __init__(self, stop: StopRequest, num_blocks: int) -> None:
        self.stop = stop
        self.num_blocks = num_blocks

    def block_end(self, run: RunState, turn: BlockTurn) -> None:
        if turn.restored:
            return
        requested = self.stop.requested
        if run.ranks is not None:
            requested = any(run.ranks.gather(requested))
        if requested and not turn.last:
            raise Interrupted(
                f"stopped by {self.stop.signal_name} after block {turn.index + 1} of "
                f"{self.num_blocks}", signal_number=self.stop.signal_number,
                hint=f"rerun the same command to resume from block {turn.index + 2}")

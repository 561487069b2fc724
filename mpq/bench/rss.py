"""Resident memory of the current process, in MiB (Linux; a fallback elsewhere)."""
from __future__ import annotations

import resource
import sys


def _status_mb(key: str) -> float | None:
    """A ``kB`` line of /proc/self/status in MiB, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def current_mb() -> float | None:
    """VmRSS now, or None off Linux."""
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """The process's peak resident set so far.

    VmHWM (Linux) belongs to this address space, so it starts afresh at exec.  ``ru_maxrss`` does
    not: a child exec'd from a large parent reports at least the parent's size at fork, which
    would give every bench child the peak of the process that launched it.  ``ru_maxrss`` (KiB on
    Linux, bytes on macOS) is the fallback where /proc is missing."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)

"""The bench's peak RSS is the measured process's own, not the peak of the process that started it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mpq.bench import rss

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_child_of_a_large_parent_reports_its_own_peak():
    ballast = bytearray(300 * 1024 * 1024)
    for offset in range(0, len(ballast), 4096):  # touch every page: resident, not just mapped
        ballast[offset] = 1
    assert rss.peak_mb() >= 300
    code = "from mpq.bench import rss; print(rss.peak_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del ballast
    assert float(done.stdout) < 200  # the interpreter alone; ru_maxrss would say >= 300


def test_peak_is_at_least_the_current_resident_set():
    assert rss.peak_mb() >= rss.current_mb() > 0

"""Run each configuration of ``mpq bench`` in its own child process, one after the other, so
that each row's peak RSS is its own and no configuration warms the caches of another."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from mpq.bench.configs import Config, Settings, build_int8
from mpq.errors import MpqError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the mpq package
log = logging.getLogger(__name__)


def child_env(threads: int) -> dict[str, str]:
    """The environment of a child: the same mpq first on the path, ``threads`` OpenMP threads."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": str(PACKAGE_ROOT) + (os.pathsep + path if path else "")}


def measure_in_child(config: Config, settings: Settings, int8_path: str | None = None) -> dict:
    """The row of ``config`` measured by ``python -m mpq.bench.child`` (MpqError, exit code 1,
    with the child's last error line when it fails; its whole stderr is logged at debug
    level)."""
    spec = json.dumps({"config": config.to_dict(), "settings": settings.to_dict(),
                       "int8_path": int8_path})
    done = subprocess.run([sys.executable, "-m", "mpq.bench.child", spec], capture_output=True,
                          text=True, env=child_env(settings.threads), check=False)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        log.debug("child for %s:\n%s", config.name, done.stderr)
        errors = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        raise MpqError(f"measuring '{config.name}' failed (exit {done.returncode}): "
                         f"{errors[-1] if errors else 'no output'}",
                         hint="rerun with -vv for the child's whole output, or leave this row "
                              "out (--baselines)")
    return json.loads(lines[-1])


def run(rows: list[Config], settings: Settings, source: Path | None,
        progress: Callable[[str], None] = lambda message: None) -> list[dict]:
    """Every row measured in its own child process; the int8 baseline artifact (if asked for)
    is written to a temporary folder first and removed at the end."""
    results = []
    with tempfile.TemporaryDirectory(prefix="mpq-bench-") as tmp:
        int8_path = None
        if any(row.kind == "int8" for row in rows):
            progress(f"quantizing {source} to int8 per channel (RTN) for the int8 baseline")
            int8_path = str(build_int8(source, Path(tmp) / "int8"))
        for row in rows:
            progress(f"measuring {row.name}")
            results.append(measure_in_child(row, settings, int8_path))
    return results

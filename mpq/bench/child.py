"""``python -m mpq.bench.child SPEC``: measure one configuration and print its row as one JSON
line on stdout.  SPEC is a JSON object ``{"config": ..., "settings": ..., "int8_path": ...}``
(:mod:`mpq.bench.runner` builds it)."""
from __future__ import annotations

import json
import sys

from mpq.bench.configs import Config, Settings


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    config, settings = Config(**spec["config"]), Settings.from_dict(spec["settings"])
    if config.kind == "gguf":
        from mpq.bench.gguf import measure as measure_gguf

        row = measure_gguf(config, settings)
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from mpq.bench.measure import measure

        row = measure(config, settings, spec.get("int8_path"))
    sys.stdout.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The artifact size of every built-in preset on one model, from ``mpq quantize --dry-run``.

    python benchmarks/preset_sizes.py --model ./SmolLM2-135M [--mpq .venv/bin/mpq]
        [--label after] [--out benchmarks/results/preset_sizes.json]

For each preset of ``mpq list --json`` the dry run's size estimate (``size.file_bytes``: every
tensor and the safetensors header; no weight is read) is printed with the bits per weight over
the whole model (file bits over all parameters, a tied tensor counted once) and the share of
the file that stays float (``dense_bytes``).  ``--mpq`` picks the mpq executable, so the same
script run against an older checkout gives the "before" column; with ``--merge FILE`` the rows of
an earlier run (its ``--label``) are printed beside this one's.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open


def parameter_count(model: Path) -> int:
    """Parameters of the model folder's safetensors files (tied tensors are stored once)."""
    total = 0
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def presets(mpq: str) -> list[str]:
    listing = json.loads(subprocess.run([mpq, "list", "--json"], check=True,
                                        capture_output=True, text=True).stdout)
    return sorted(listing["presets"])


def dry_run(mpq: str, model: Path, preset: str) -> dict:
    run = subprocess.run([mpq, "quantize", str(model), "--recipe", preset, "-o",
                          "/tmp/preset-sizes-unused", "--dry-run", "--json"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else
                f"exit {run.returncode}"}
    return json.loads(run.stdout)["size"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--mpq", default="mpq")
    parser.add_argument("--label", default="after")
    parser.add_argument("--merge", type=Path, help="JSON of an earlier run to print beside")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/preset_sizes.json"))
    args = parser.parse_args()
    params = parameter_count(args.model)
    rows = {}
    for name in presets(args.mpq):
        size = dry_run(args.mpq, args.model, name)
        if "error" in size:
            rows[name] = size
            continue
        rows[name] = {"file_mb": size["file_bytes"] / 1e6,
                      "bits_per_weight": 8 * size["file_bytes"] / params,
                      "float_share": size["dense_bytes"] / size["tensor_bytes"]}
    earlier = json.loads(args.merge.read_text()) if args.merge else None
    head = f"{'preset':24}"
    if earlier:
        head += f"{earlier['label'] + ' MB':>12}{'bits/w':>8}"
    head += f"{args.label + ' MB':>12}{'bits/w':>8}{'float share':>13}"
    print(f"model {args.model} ({params / 1e6:.1f} M parameters)\n{head}")
    for name, row in rows.items():
        line = f"{name:24}"
        if earlier:
            old = earlier["rows"].get(name, {})
            line += (f"{old['file_mb']:12.1f}{old['bits_per_weight']:8.2f}" if "file_mb" in old
                     else f"{'–':>12}{'':8}")
        line += (f"{row['file_mb']:12.1f}{row['bits_per_weight']:8.2f}"
                 f"{row['float_share']:13.1%}" if "file_mb" in row else f"  {row['error']}")
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"label": args.label, "model": str(args.model),
                                    "parameters": params, "rows": rows,
                                    "before": earlier}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

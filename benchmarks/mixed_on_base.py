"""Mixed precision on the base's own algorithm, and with the embedding/head as items, on
SmolLM2-135M: ``mpq quantize --target-bits/--target-size`` against the uniform recipe of the same
budget.

    python benchmarks/mixed_on_base.py --model ./SmolLM2-135M --corpora ../shared/corpora \\
        --work /tmp/mixed [--rows gptq@4.5,gptq@3.5,compact@size,...]

One sensitivity table (``mpq sensitivity -r w4a16-gptq-compact``: the ladder, diagonal-Fisher
proxy on 16 × 512 tokens of enwiki_excerpt.train.txt; the compact base quantizes the tied
embedding/head, so the table has their row too) serves every GPTQ row: ``mpq quantize`` re-costs
it for each base (mpq.analysis.sensitivity_table.SensitivityTable.costed_for).  The tuned rows'
bases rotate (QuaRot), so each is measured under its own base (``-r w4a16-tuned`` /
``-r w3a16-tuned``: the rotated model, w3a16-tuned's full-range scales).  Every artifact is made by
``mpq quantize`` (calibration 128 × 512 tokens of enwiki_excerpt.train.txt, the default) and
scored by ``mpq eval --reference`` on the first 40 × 512-token windows of
enwiki_excerpt.test.txt (ppl, KL to the float model).  Rows:

- ``gptq@4.5`` / ``gptq@3.5``: base w4a16-gptq / w3a16-gptq (GPTQ, fp32 scales) at 4.5 / 3.5
  bits per weight, the uniform presets' own bits (int4 / int3 g64: 4 or 3 + 32/64);
- ``compact@size``: base w4a16-gptq-compact at ``--compact-size`` bytes (default: the uniform
  compact artifact's tensor file, 85.8 MB): the knapsack may move bytes between the int8
  embedding/head and the GPTQ body;
- ``tuned@4.5`` / ``tuned@3.5``: base w4a16-tuned / w3a16-tuned (QuaRot, then GPTQ with error
  feedback and clip search) at their own 4.5 / 3.5 bits per weight;
- ``uniform-w4``, ``uniform-w3``, ``uniform-compact``, ``uniform-tuned-w4``,
  ``uniform-tuned-w3``: the presets as they are.

Prints a table; writes JSON after every row (rows of ``--out`` not run this time are kept).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
from pathlib import Path

TABLE_BASE = "w4a16-gptq-compact"  # the table of the unrotated rows
ROWS = {  # name → (base recipe, target flag and value or None (the uniform preset), table base)
    "gptq@4.5": ("w4a16-gptq", ("--target-bits", "4.5"), TABLE_BASE),
    "gptq@3.5": ("w3a16-gptq", ("--target-bits", "3.5"), TABLE_BASE),
    "compact@size": ("w4a16-gptq-compact", ("--target-size", None), TABLE_BASE),
    "tuned@4.5": ("w4a16-tuned", ("--target-bits", "4.5"), "w4a16-tuned"),
    "tuned@3.5": ("w3a16-tuned", ("--target-bits", "3.5"), "w3a16-tuned"),
    "uniform-w4": ("w4a16-gptq", None, None),
    "uniform-w3": ("w3a16-gptq", None, None),
    "uniform-compact": ("w4a16-gptq-compact", None, None),
    "uniform-tuned-w4": ("w4a16-tuned", None, None),
    "uniform-tuned-w3": ("w3a16-tuned", None, None),
}


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def table_path(work: Path, table_base: str) -> Path:
    """The sensitivity table measured under ``table_base`` (the GPTQ rows' keeps its old name)."""
    return work / ("sensitivity.json" if table_base == TABLE_BASE
                   else f"sensitivity-{table_base}.json")


def previous_result(path: Path) -> dict:
    """``path``'s tables and rows (a file of the older one-table layout is converted), or none."""
    if not path.exists():
        return {"tables": {}, "rows": []}
    data = json.loads(path.read_text())
    tables = data.get("tables") or {}
    if "table" in data:
        old = dict(data["table"])
        tables = {old.pop("base"): old, **tables}
    rows = [{**row, "table_base": row.get("table_base", TABLE_BASE if row["target"] else None)}
            for row in data.get("rows", [])]
    return {"tables": tables, "rows": rows}


def choice_of(artifact: Path) -> dict:
    """The figures of a mixed artifact's choice, read back from its plan (a reused artifact)."""
    from mpq.checkpoint.native import open_artifact
    from mpq.checkpoint.native_codec import ideal_bits

    plan = open_artifact(artifact).plan
    layers = [layer for layer in plan.quantized() if plan.shared_with(layer.name) is None]
    weights = sum(layer.shape[0] * layer.shape[1] for layer in layers)
    bits = sum(ideal_bits(layer.scheme.weights, layer.shape) * layer.shape[0] * layer.shape[1]
               for layer in layers) / weights
    counts: dict[str, int] = {}
    for layer in layers:
        key = layer.scheme.weights.describe()
        counts[key] = counts.get(key, 0) + 1
    embed = plan.get("model.embed_tokens")
    return {"bits_per_weight": bits, "counts": counts,
            "picks": {"model.embed_tokens": embed.scheme.weights.describe()
                      if embed is not None and embed.scheme is not None else "float"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--mpq", default="mpq", help="the mpq command (e.g. 'python -m mpq')")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--compact-size", default="85800000")
    parser.add_argument("--reuse", action="store_true",
                        help="score an artifact already in --work instead of quantizing again")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_on_base.json"))
    args = parser.parse_args()
    mpq = shlex.split(args.mpq)
    names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}")
    train = str(args.corpora / "enwiki_excerpt.train.txt")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = previous_result(args.out)
    for table_base in dict.fromkeys(ROWS[r][2] for r in names if ROWS[r][2] is not None):
        table = table_path(args.work, table_base)
        if table.exists():
            continue
        started = time.perf_counter()
        run([*mpq, "sensitivity", str(args.model), "--calib", train, "-r", table_base,
             "-o", str(table), "--json"])
        result["tables"][table_base] = {"candidates": "ladder", "measure": "fisher",
                                        "samples": "16 x 512",
                                        "seconds": time.perf_counter() - started}
    for name in names:
        base, target, table_base = ROWS[name]
        out = args.work / name
        command = [*mpq, "quantize", str(args.model), "-r", base, "-o", str(out),
                   "--calib", train, "--force", "--json"]
        if target is not None:
            flag, value = target
            command += [flag, value or args.compact_size, "--sensitivity",
                        str(table_path(args.work, table_base))]
        started = time.perf_counter()
        reused = args.reuse and (out / "mpq-manifest.json").exists()
        events = ([] if reused else [json.loads(line) for line in run(command).splitlines()
                                     if line.startswith("{")])
        seconds = None if reused else time.perf_counter() - started
        chosen = next((e for e in events if e.get("event") == "mixed_precision"), None)
        if chosen is None and target is not None:
            chosen = choice_of(out)
        scored = json.loads(run([*mpq, "eval", str(out), "--data",
                                 str(args.corpora / "enwiki_excerpt.test.txt"), "--reference",
                                 str(args.model), "--num-windows", "40", "--dequantize",
                                 "--json"]))
        files = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        row = {"row": name, "base": base, "target": " ".join(t for t in target if t)
               if target else None, "ppl": scored["ppl"], "kl": scored["kl_mean"],
               "ref_ppl": scored["ref_ppl"], "tensor_mb": files / 1e6,
               "bits_per_weight": chosen["bits_per_weight"] if chosen else None,
               "counts": chosen["counts"] if chosen else None,
               "edge_pick": (chosen["picks"].get("model.embed_tokens") if chosen else None),
               "table_base": table_base, "quantize_s": seconds}
        result["rows"] = [r for r in result["rows"] if r["row"] != name] + [row]
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\n{'row':18} {'base':20} {'ppl':>8} {'KL':>7} {'MB':>7} {'bits/w':>7}  embedding")
    for row in result["rows"]:
        bits = f"{row['bits_per_weight']:7.3f}" if row["bits_per_weight"] else f"{'':7}"
        print(f"{row['row']:18} {row['base']:20} {row['ppl']:8.3f} {row['kl']:7.4f} "
              f"{row['tensor_mb']:7.1f} {bits}  {row['edge_pick'] or ''}")


if __name__ == "__main__":
    main()

"""Tuned rounding on SmolLM2-135M: mpq's ``autoround`` (light/default) and ``w{4,3}a16-tuned``
preset against Intel's auto-round package (light/default), same scheme, tokens and evaluation.

    python benchmarks/tuned_vs_autoround.py --model .cache/SmolLM2-135M --corpora ../shared/corpora \\
        [--bits 4] [--rows mpq-autoround-light,auto-round-light,...] [--reuse] \\
        [--num-samples 128] [--num-windows 40] [--iters N] [--tuned-recipe FILE] [--work DIR] \\
        [--out FILE]

Rows (``--rows``, default all that apply to ``--bits``):
- ``fp32``: the float model (reference perplexity).
- ``mpq-autoround-light`` / ``mpq-autoround-default``: the recipe ``algorithm: autoround`` with
  ``options: {effort: light|default}`` on int ``--bits`` symmetric g64 (mpq's efforts: light 30
  iterations at lr 1e-2, one sample a step; default 200 at lr 1/iters, four samples a step; both
  with autoround's default error feedback, the float model's block outputs as targets).
- ``mpq-tuned``: the ``w4a16-tuned`` / ``w3a16-tuned`` preset, or the recipe ``--tuned-recipe``
  (any bits; none is built in for 2 bits).
- ``auto-round-light`` / ``auto-round-default``: the package's recipes, 50 iterations at lr 5e-3
  and 200 at its default lr 1/iters, eight samples a step (its default batch), int ``--bits``
  symmetric g64, float32, run by benchmarks/peers/autoround_peer.py in the package's own venv
  (benchmarks/peers/setup_autoround.sh builds it when missing).
``--iters`` overrides every tuned row's iterations (both tools; for smoke runs only).

Calibration: ``--num-samples`` × 512 tokens of enwiki_excerpt.train.txt drawn by mpq's own builder
(seed 0), the exact ids handed to the package; each mpq run checks that it drew the same tokens.
Evaluation: ``mpq eval OUT --num-windows N`` (first N × 512-token windows of
enwiki_excerpt.test.txt) for every row.  Each quantization runs in its own process (mpq:
benchmarks/mpq_run.py) so wall time and peak RSS (``ru_maxrss``) are the tool's own: ``quant_s`` is
model loaded → quantization done (writing excluded), ``rss_quant`` is the peak when quantization
was done.  Ratios (time, RSS at quantization, ppl) are to the auto-round row of the same effort;
``mpq-tuned`` is compared with ``auto-round-default`` (``auto-round-light`` where the table has no
default row).

Every finished row is written to ``--out`` at once (JSON, and a markdown table beside it), so an
interrupted run keeps its rows; ``--reuse`` keeps the rows of ``--out`` measured with the same
settings instead of rerunning them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEQ_LEN = 512
GROUP_SIZE = 64
# name -> (tool, effort); tool "mpq" (autoround recipe), "preset" (w{bits}a16-tuned), "peer"
ROWS = {
    "fp32": ("float", None),
    "mpq-autoround-light": ("mpq", "light"),
    "mpq-autoround-default": ("mpq", "default"),
    "mpq-tuned": ("preset", None),
    "auto-round-light": ("peer", "light"),
    "auto-round-default": ("peer", "default"),
}
PEER_EFFORTS = {"light": (50, 5e-3), "default": (200, None)}  # iters, lr (None: 1/iters)
PAIRS = {"mpq-autoround-light": ("auto-round-light",),  # row -> the peer rows it compares with
         "mpq-autoround-default": ("auto-round-default",),
         "mpq-tuned": ("auto-round-default", "auto-round-light")}
TUNED_PRESETS = {4: "w4a16-tuned", 3: "w3a16-tuned"}


def select_rows(names: str | None, bits: int, tuned_recipe: bool = False) -> list[str]:
    """The rows to run, in table order: the comma-separated ``names`` (None: all that exist at
    ``bits``; ``mpq-tuned`` exists with a preset for ``bits`` or a ``tuned_recipe``).  Raises
    ValueError for an unknown name or a row that ``bits`` lacks."""
    has_tuned = bits in TUNED_PRESETS or tuned_recipe
    if names is None:
        return [n for n in ROWS if ROWS[n][0] != "preset" or has_tuned]
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise ValueError("--rows names no row")
    for name in wanted:
        if name not in ROWS:
            raise ValueError(f"unknown row '{name}' (rows: {', '.join(ROWS)})")
        if ROWS[name][0] == "preset" and not has_tuned:
            raise ValueError(f"row '{name}': no tuned preset for int{bits} (give "
                             "--tuned-recipe)")
    return [n for n in ROWS if n in wanted]


def recipe_text(bits: int, effort: str, iters: int | None) -> str:
    """mpq recipe: autoround at ``effort`` (``iters`` overriding its iterations) on int ``bits``
    symmetric g64, every Linear/Conv1D (as the tuned presets)."""
    extra = f", iters: {iters}" if iters is not None else ""
    return (f"mpq_recipe: 1\nname: autoround-{effort}-int{bits}-g{GROUP_SIZE}\ndefaults:\n"
            f"  algorithm: autoround\n  options: {{effort: {effort}{extra}}}\nrules:\n"
            f"  - targets: [Linear, Conv1D]\n    weights: {{format: int, bits: {bits}, "
            f"symmetric: true, granularity: group, group_size: {GROUP_SIZE}}}\n")


def peer_settings(effort: str, iters: int | None) -> tuple[int, float | None]:
    """auto-round's (iters, lr) for ``effort``; ``iters`` overrides the iterations (the lr of
    ``default`` then stays the package's 1/iters)."""
    default_iters, lr = PEER_EFFORTS[effort]
    return (default_iters if iters is None else iters), lr


def add_ratios(rows: list[dict]) -> None:
    """Set time/RSS/ppl ratios of each paired row to its auto-round row, where both exist."""
    by_name = {r["row"]: r for r in rows}
    for row in rows:
        peer = next((by_name[n] for n in PAIRS.get(row["row"], ()) if n in by_name), None)
        for key in ("time_ratio", "rss_ratio", "ppl_ratio", "versus"):
            row.pop(key, None)
        if peer is None:
            continue
        row["versus"] = peer["row"]
        row["time_ratio"] = row["quant_s"] / peer["quant_s"]
        row["rss_ratio"] = row["rss_quant_mib"] / peer["rss_quant_mib"]
        row["ppl_ratio"] = row["ppl"] / peer["ppl"]


COLUMNS = [("row", "row", "<23"), ("ppl", "ppl", ">9.3f"), ("quant s", "quant_s", ">9.1f"),
           ("total s", "total_s", ">9.1f"), ("RSS@quant MiB", "rss_quant_mib", ">14.0f"),
           ("RSS MiB", "peak_rss_mib", ">8.0f"), ("vs", "versus", ">20"),
           ("time/ar", "time_ratio", ">8.2f"), ("RSS/ar", "rss_ratio", ">7.2f"),
           ("ppl/ar", "ppl_ratio", ">7.3f")]


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width table (empty cells where a value is missing)."""
    lines = ["".join(format(title, spec.split(".")[0]) for title, _, spec in COLUMNS)]
    for row in rows:
        cells = []
        for _, key, spec in COLUMNS:
            value = row.get(key)
            cells.append(format(value, spec) if value is not None else format("", spec.split(".")[0]))
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def reusable(previous: dict, settings: dict) -> dict[str, dict]:
    """Rows of an earlier output measured with exactly ``settings`` (else none)."""
    if previous.get("settings") != settings:
        return {}
    return {r["row"]: r for r in previous.get("rows", [])}


def write_results(out: Path, settings: dict, rows: list[dict]) -> str:
    """Write ``out`` (JSON) and its markdown twin; return the table."""
    add_ratios(rows)
    table = format_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"# Tuned rounding: mpq vs auto-round on SmolLM2-135M, int{settings['bits']} sym "
        f"g{GROUP_SIZE}\n\nGenerated by `python benchmarks/tuned_vs_autoround.py` (see its "
        f"docstring): {settings['num_samples']} × {SEQ_LEN} calibration tokens, first "
        f"{settings['num_windows']} × {SEQ_LEN} windows of enwiki_excerpt.test.txt"
        + (f", iterations overridden to {settings['iters']}" if settings["iters"] else "")
        + "; `time/ar`, `RSS/ar`, `ppl/ar` are ratios to the auto-round row named in `vs` "
        "(time: model loaded → quantization done; RSS: peak when quantization was done).\n\n"
        f"```\n{table}\n```\n")
    return table


def run_json(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its last stdout line as JSON.  Exits with its stderr's tail on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate(model: Path, test_file: Path, num_windows: int, env: dict) -> float:
    """``mpq eval MODEL --num-windows N`` perplexity (an mpq artifact or a HF folder)."""
    return run_json([sys.executable, "-m", "mpq", "eval", str(model), "--data", str(test_file),
                     "--num-windows", str(num_windows), "--dequantize", "--json"], env)["ppl"]


def peer_python(env: dict) -> str:
    """The package venv's python (built by setup_autoround.sh when missing)."""
    setup = subprocess.run(["bash", str(HERE / "peers" / "setup_autoround.sh")],
                           capture_output=True, text=True, env=env)
    if setup.returncode != 0:
        sys.stderr.write(setup.stderr[-4000:])
        raise SystemExit("could not set up auto-round's venv (see above)")
    return setup.stdout.strip().splitlines()[-1]


def measure(name: str, args, calib_file: Path, calib_ids: Path, calib_sha: str, work: Path,
            env: dict, peer: str | None) -> dict:
    """Quantize (unless fp32) and evaluate one row."""
    tool, effort = ROWS[name]
    test_file = args.corpora / "enwiki_excerpt.test.txt"
    if tool == "float":
        return {"row": name, "ppl": evaluate(args.model, test_file, args.num_windows, env)}
    out = work / name
    if tool == "peer":
        iters, lr = peer_settings(effort, args.iters)
        cmd = [peer, str(HERE / "peers" / "autoround_peer.py"), "--model", str(args.model),
               "--calib-ids", str(calib_ids), "--out", str(out), "--bits", str(args.bits),
               "--group-size", str(GROUP_SIZE), "--iters", str(iters), "--seqlen", str(SEQ_LEN)]
        stats = run_json(cmd + (["--lr", str(lr)] if lr is not None else []), env)
        extra = {"peer_version": stats["auto_round_version"], "iters": iters, "lr": lr,
                 "batch_size": stats["batch_size"], "torch_compile": stats["torch_compile"]}
    else:
        if tool == "preset":
            recipe = args.tuned_recipe or TUNED_PRESETS[args.bits]
        else:
            recipe = work / f"{name}.yaml"
            recipe.write_text(recipe_text(args.bits, effort, args.iters))
        stats = run_json([sys.executable, str(HERE / "mpq_run.py"), str(args.model), str(recipe),
                          str(out), "--calib", str(calib_file), "--num-samples",
                          str(args.num_samples), "--seq-len", str(SEQ_LEN)], env)
        if stats["calib_sha256"] != calib_sha:
            raise SystemExit("mpq drew different calibration tokens than the peer was given")
        stats["quant_s"] = stats["pipeline_s"]
        extra = {"recipe": recipe if isinstance(recipe, str) else recipe.read_text()}
    return {"row": name, "ppl": evaluate(out, test_file, args.num_windows, env),
            "quant_s": stats["quant_s"], "total_s": stats["total_s"],
            "peak_rss_mib": stats["peak_rss_kib"] / 1024,
            "rss_quant_mib": stats["peak_rss_quant_kib"] / 1024, **extra}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/SmolLM2-135M"))
    parser.add_argument("--corpora", type=Path, default=Path("../shared/corpora"))
    parser.add_argument("--bits", type=int, choices=[2, 3, 4], default=4)
    parser.add_argument("--rows", default=None, help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the rows of --out measured with the same settings")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--num-windows", type=int, default=40)
    parser.add_argument("--iters", type=int, default=None,
                        help="override every tuned row's iterations (smoke runs)")
    parser.add_argument("--tuned-recipe", type=Path, default=None,
                        help="recipe file for the mpq-tuned row (default: the bits' preset)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the quantized models (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/tuned_vs_autoround_int"
                             "BITS.json); a .md table is written beside it")
    args = parser.parse_args(argv)
    try:
        args.row_names = select_rows(args.rows, args.bits, args.tuned_recipe is not None)
    except ValueError as err:
        parser.error(str(err))
    for name in ("num_samples", "num_windows", "iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.corpora / "enwiki_excerpt.train.txt").is_file():
        parser.error(f"no enwiki_excerpt.train.txt in --corpora {args.corpora}")
    if args.tuned_recipe is not None and not args.tuned_recipe.is_file():
        parser.error(f"--tuned-recipe {args.tuned_recipe} is not a file")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model} is not a model folder (no config.json)")
    if args.out is None:
        args.out = HERE / "results" / f"tuned_vs_autoround_int{args.bits}.json"
    args.model, args.corpora = args.model.resolve(), args.corpora.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from mpq.calibration import CalibrationOptions, build_calibration_set

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    calib_file = args.corpora / "enwiki_excerpt.train.txt"
    calib = build_calibration_set(CalibrationOptions(source=str(calib_file),
                                                     num_samples=args.num_samples,
                                                     seq_len=SEQ_LEN, seed=0),
                                  AutoTokenizer.from_pretrained(args.model))
    calib_sha = calib.provenance["sha256"]
    settings = {"model": args.model.name, "bits": args.bits, "group_size": GROUP_SIZE,
                "symmetric": True, "num_samples": args.num_samples, "seq_len": SEQ_LEN,
                "num_windows": args.num_windows, "iters": args.iters,
                "calibration_sha256": calib_sha}
    previous = json.loads(args.out.read_text()) if args.reuse and args.out.exists() else {}
    done = reusable(previous, settings)
    if previous and not done:
        print(f"--reuse: {args.out} was measured with other settings; rerunning every row",
              file=sys.stderr)
    work = args.work or Path(tempfile.mkdtemp(prefix="mpq-tuned-vs-ar-"))
    work.mkdir(parents=True, exist_ok=True)
    calib_ids = work / "calib_ids.pt"
    torch.save(torch.cat(calib.samples), calib_ids)
    todo = [n for n in args.row_names if n not in done]
    peer = peer_python(env) if any(ROWS[n][0] == "peer" for n in todo) else None
    rows = dict(done)
    for name in args.row_names:
        if name in done:
            print(f"{name}: reused from {args.out}", file=sys.stderr)
            continue
        print(f"{name}: running", file=sys.stderr, flush=True)
        rows[name] = measure(name, args, calib_file, calib_ids, calib_sha, work, env, peer)
        ordered = [rows[n] for n in ROWS if n in rows]
        write_results(args.out, settings, ordered)
    print(write_results(args.out, settings, [rows[n] for n in ROWS if n in rows]))


if __name__ == "__main__":
    main()

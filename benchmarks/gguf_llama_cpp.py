"""mpq's GGUF files run by llama.cpp: load, generate, and perplexity from llama.cpp's own logits
against ``mpq eval`` on the same windows (issue 22's acceptance: within 0.5%).

    bash benchmarks/peers/setup_llama_cpp.sh              # once: llama-cpp-python in /tmp
    python benchmarks/gguf_llama_cpp.py --model .cache/SmolLM2-135M \\
        --corpora ../shared/corpora --work /tmp/gguf-bench \\
        [--recipes gguf-q4_0-gptq,q4_0-rtn,q8_0-rtn,q4_1-rtn,q5_0-rtn] [--num-samples 128] \\
        [--llama-quantize Q4_0,Q8_0] [--reuse]

For each recipe: ``mpq quantize`` (native format; calibration from enwiki_excerpt.train.txt,
``--num-samples`` × 512 tokens, for the algorithms that need it), ``mpq eval`` of that artifact
on the first 40 × 512-token windows of enwiki_excerpt.test.txt, ``mpq convert --format gguf``,
then llama.cpp (benchmarks/peers/llama_cpp_ppl.py in the setup script's venv) scores the GGUF
on the very token windows ``mpq eval`` used (tokenized here with the model's tokenizer,
mpq.analysis.eval.load_eval_ids; no BOS for SmolLM2) and generates a few tokens.  ``float``
writes the model unquantized (F32 GGUF); ``--llama-quantize`` also quantizes that float GGUF
with llama.cpp's own quantizer (no importance matrix) and scores the result the same way.  With
``--imatrix-tools BIN`` (the folder benchmarks/peers/setup_llama_cpp_tools.sh prints), llama.cpp
also computes its importance matrix from the float GGUF on enwiki_excerpt.train.txt
(``llama-imatrix``, ``--num-samples`` chunks of 512 tokens: the calibration budget mpq gets) and
quantizes each ``--llama-quantize`` type with it (``llama-quantize --imatrix``); those rows are
scored the same way.
Recipes named ``<type>-rtn`` are RTN onto that GGUF grid for every Linear, embedding and head
on q8_0 (as the preset).  Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RTN = """mpq_recipe: 1
defaults: {{algorithm: rtn}}
rules:
  - targets: [Embedding, lm_head]
    weights: {{format: q8_0}}
  - targets: [Linear]
    weights: {{format: {fmt}}}
"""
FLOAT = "mpq_recipe: 1\nrules:\n  - targets: [Linear]\n    skip: true\n"
WINDOWS, WINDOW = 40, 512


def mpq(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mpq", *args], check=True,
                          capture_output=True, text=True).stdout


def recipe_path(name: str, work: Path) -> str:
    if name == "float":
        text = FLOAT
    elif name.endswith("-rtn") and not name.startswith("gguf-"):
        text = RTN.format(fmt=name[:-len("-rtn")])
    else:
        return name  # a preset or a file
    path = work / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def write_windows(model: Path, data: Path, path: Path) -> None:
    from mpq.analysis.eval import load_eval_ids
    from mpq.calibration.conventions import token_conventions
    from mpq.models.source import load_tokenizer

    tokenizer = load_tokenizer(model)
    if token_conventions(tokenizer).bos_id is not None:
        raise SystemExit("this script forms windows without BOS; the model's tokenizer adds one")
    ids = load_eval_ids(data, tokenizer).tolist()
    path.write_text(json.dumps([ids[k * WINDOW:(k + 1) * WINDOW] for k in range(WINDOWS)]))


def imatrix_rows(args, windows: Path, llama_python: str) -> list[dict]:
    """llama.cpp's own quantizer with its importance matrix (module docstring), one row per
    ``--llama-quantize`` type; needs the float GGUF of this --work (the ``float`` recipe)."""
    float_gguf = args.work / "float-gguf" / "model.gguf"
    if not float_gguf.is_file():
        raise SystemExit(f"--imatrix-tools needs {float_gguf}: run the recipe 'float' first")
    imatrix = args.work / "imatrix.gguf"
    subprocess.run([str(args.imatrix_tools / "llama-imatrix"), "-m", str(float_gguf), "-f",
                    str(args.corpora / "enwiki_excerpt.train.txt"), "-o", str(imatrix),
                    "--chunks", args.num_samples, "-c", str(WINDOW), "--no-ppl", "-t", "2"],
                   check=True, capture_output=True, text=True)
    rows = []
    for kind in [k for k in args.llama_quantize.split(",") if k]:
        out = args.work / f"llama-{kind}-imatrix.gguf"
        subprocess.run([str(args.imatrix_tools / "llama-quantize"), "--imatrix", str(imatrix),
                        str(float_gguf), str(out), kind, "2"], check=True, capture_output=True,
                       text=True)
        scored = json.loads(subprocess.run(
            [llama_python, str(Path(__file__).parent / "peers" / "llama_cpp_ppl.py"),
             "--windows", str(windows), "--gguf", str(out)], check=True, capture_output=True,
            text=True).stdout.strip().splitlines()[-1])
        row = {"recipe": f"llama.cpp quantizer {kind} (imatrix, {args.num_samples} x {WINDOW})",
               "gguf_mb": out.stat().st_size / 1e6, "mpq_eval_ppl": None,
               "llama_cpp_ppl": scored["ppl"], "rel_diff": None,
               "generated": scored["generated"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--recipes", default="float,gguf-q4_0-gptq,q4_0-rtn,q8_0-rtn,q4_1-rtn")
    parser.add_argument("--num-samples", default="128")
    parser.add_argument("--llama-quantize", default="Q4_0")
    parser.add_argument("--reuse", action="store_true",
                        help="keep native artifacts already in --work instead of re-quantizing")
    parser.add_argument("--llama-python", default=None,
                        help="python of the llama-cpp-python venv (default: run the setup script)")
    parser.add_argument("--imatrix-tools", type=Path, default=None,
                        help="folder of llama-imatrix/llama-quantize (setup_llama_cpp_tools.sh): "
                             "also llama.cpp's quantizer with its importance matrix")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_llama_cpp.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    test = args.corpora / "enwiki_excerpt.test.txt"
    windows = args.work / "windows.json"
    write_windows(args.model, test, windows)
    llama_python = args.llama_python or subprocess.run(
        ["bash", str(Path(__file__).parent / "peers" / "setup_llama_cpp.sh")], check=True,
        capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = []
    for name in [r for r in args.recipes.split(",") if r]:
        native, out = args.work / f"{name}-native", args.work / f"{name}-gguf"
        started = time.perf_counter()
        if args.reuse and (native / "config.json").is_file():
            seconds = None
        else:
            mpq("quantize", str(args.model), "--recipe", recipe_path(name, args.work), "-o",
                str(native), "--calib", str(args.corpora / "enwiki_excerpt.train.txt"),
                "--num-samples", args.num_samples, "--force")
            seconds = time.perf_counter() - started
        scored = json.loads(mpq("eval", str(native), "--data", str(test), "--num-windows",
                                str(WINDOWS), "--window", str(WINDOW), "--json")
                            .strip().splitlines()[-1])
        mpq("convert", str(native), "-o", str(out), "--format", "gguf", "--force")
        quantize = []
        if name == "float":
            quantize = [f"{out / 'model.gguf'}:{kind}:{args.work / f'llama-{kind}.gguf'}"
                        for kind in args.llama_quantize.split(",") if kind]
        lines = subprocess.run(
            [llama_python, str(Path(__file__).parent / "peers" / "llama_cpp_ppl.py"),
             "--windows", str(windows), "--gguf", str(out / "model.gguf"),
             *[a for spec in quantize for a in ("--quantize", spec)]],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()
        results = [json.loads(line) for line in lines]
        ours = results[0]
        row = {"recipe": name, "gguf_mb": (out / "model.gguf").stat().st_size / 1e6,
               "mpq_eval_ppl": scored["ppl"], "llama_cpp_ppl": ours["ppl"],
               "rel_diff": ours["ppl"] / scored["ppl"] - 1, "generated": ours["generated"],
               "quantize_s": seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
        for extra in results[1:]:
            kind = Path(extra["gguf"]).stem
            row = {"recipe": f"llama.cpp quantizer {kind} (no imatrix)",
                   "gguf_mb": Path(extra["gguf"]).stat().st_size / 1e6, "mpq_eval_ppl": None,
                   "llama_cpp_ppl": extra["ppl"], "rel_diff": None,
                   "generated": extra["generated"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.imatrix_tools is not None:
        rows += imatrix_rows(args, windows, llama_python)
    print(f"\n{'GGUF':36} {'MB':>7} {'mpq eval':>9} {'llama.cpp':>9} {'diff':>8}")
    for row in rows:
        mpq_ppl = f"{row['mpq_eval_ppl']:9.3f}" if row["mpq_eval_ppl"] else f"{'-':>9}"
        diff = f"{100 * row['rel_diff']:+7.3f}%" if row["rel_diff"] is not None else f"{'-':>8}"
        print(f"{row['recipe']:36} {row['gguf_mb']:7.1f} {mpq_ppl} {row['llama_cpp_ppl']:9.3f} "
              f"{diff}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"windows": f"first {WINDOWS} x {WINDOW} tokens of {test.name}",
                                    "num_samples": int(args.num_samples), "rows": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()

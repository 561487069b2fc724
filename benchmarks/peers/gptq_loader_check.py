"""Does an independent GPTQ v1 loader read mpq's GPTQ checkpoints the way mpq means them?

The foreign loader is transformers' ``AutoModelForCausalLM.from_pretrained`` on the GPTQ folder,
which goes through optimum and GPTQModel's CPU kernels. It runs in its own venv (GPTQModel pins
torch>=2.14.1 and other packages mpq's venv does not have):

    bash benchmarks/peers/setup_gptq_loader.sh      # once: builds .cache/gptq-loader-venv
                                                    # (GPTQ_VENV=... to put it elsewhere)

Run with mpq's venv, from the repository root:

    python benchmarks/peers/gptq_loader_check.py NATIVE GPTQ [NATIVE GPTQ ...]
    python benchmarks/peers/gptq_loader_check.py --tiny     # tiny llama, w4a16 and w4a16-asym

NATIVE is an mpq artifact (``mpq quantize``), GPTQ its ``mpq convert --format gptq`` output.
``--tiny`` builds both pairs in a temporary folder from tests/tiny_models.py. ``--python`` names
the loader venv's python (default: the last stdout line of setup_gptq_loader.sh).

- Reference: ``mpq.load(NATIVE, dequantize=True)`` in the artifact's dtype, logits of fixed
  random token ids (``--batch`` × ``--seq``, ``--seed``), as float32.
- Foreign side: this same file, started with ``--peer`` by the loader venv's python (it never
  imports mpq), loads GPTQ with ``GPTQConfig(backend=...)`` for each of ``--backends`` (``auto``:
  GPTQModel picks; ``torch``: its plain TorchLinear) and ``--dtypes``, and returns its logits.
- Table and JSON (``--out``, default benchmarks/results/gptq_loader_check.json): loader versions,
  the GPTQModel kernel classes that replaced the Linears (and how many, against the number of
  ``qweight`` tensors in the checkpoint), max |Δlogits|, top-1 agreement, and the perplexity of
  the ids under both models (next-token, so "ppl-style" agreement).
- Expected gap: GPTQ v1 stores scales in float16 (``mpq.gptq_scale_rounding`` in the header is
  the largest relative change), and a float16/bfloat16 run also rounds the activations; the
  reference keeps float32 scales, so a few 1e-3 on logits of magnitude ~1 is agreement.
- Known GPTQModel 7.7.0 limit: its ``torch_fused`` CPU kernel replaces the zero points by 8
  (``transform_cpu`` zeroes them), so it is right for symmetric checkpoints only; it is not in
  the default backends. ``GPTQModel.load`` itself (not via transformers) refuses a sym=false
  v1 checkpoint unless its metadata names GPTQModel >= 0.9.0 as the quantizer, and needs a
  tokenizer in the folder; the transformers path has neither restriction.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gptq_loader_check.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------ foreign side (loader venv)

def peer(gptq: str, ids_path: str, out_path: str, backend: str, dtype: str) -> None:
    """Load GPTQ with transformers + optimum + GPTQModel; save logits and what was loaded."""
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((Path(gptq) / "config.json").read_text())["quantization_config"]["bits"]
    model = AutoModelForCausalLM.from_pretrained(
        gptq, device_map="cpu", dtype=DTYPES[dtype],
        quantization_config=GPTQConfig(bits=bits, backend=backend))
    kernels: dict[str, int] = {}
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel."):
            kernels[type(module).__name__] = kernels.get(type(module).__name__, 0) + 1
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_path)).logits.float()
    info = {"loader": "transformers+optimum+gptqmodel",
            "versions": {p: version(p) for p in ("gptqmodel", "optimum", "transformers", "torch")},
            "kernels": kernels, "param_dtype": str(next(model.parameters()).dtype)}
    torch.save({"logits": logits, "info": info}, out_path)


# ------------------------------------------------------------------ mpq side (mpq's venv)

def loader_python(explicit: str | None) -> str:
    if explicit:
        return explicit
    run = subprocess.run(["bash", str(HERE / "setup_gptq_loader.sh")], check=True,
                         stdout=subprocess.PIPE, text=True)
    return run.stdout.strip().splitlines()[-1]


def build_tiny(root: Path) -> list[tuple[Path, Path]]:
    """Tiny llama (tests/tiny_models.py) as w4a16 and w4a16-asym, native and GPTQ."""
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import save_tiny_model

    save_tiny_model("llama", root / "src")
    cli = [sys.executable, "-c", "from mpq.cli.main import main; main()"]
    pairs = []
    for recipe in ("w4a16", "w4a16-asym"):
        native, gptq = root / f"{recipe}-native", root / f"{recipe}-gptq"
        subprocess.run(cli + ["quantize", str(root / "src"), "-r", recipe, "-o", str(native)],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(cli + ["convert", str(native), "-o", str(gptq), "--format", "gptq"],
                       check=True, stdout=subprocess.DEVNULL)
        pairs.append((native, gptq))
    return pairs


def gptq_facts(gptq: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((gptq / "config.json").read_text())
    qcfg = config["quantization_config"]
    qweights, rounding = 0, None
    for shard in sorted(gptq.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            qweights += sum(k.endswith(".qweight") for k in f.keys())
            r = (f.metadata() or {}).get("mpq.gptq_scale_rounding")
            if r is not None:
                rounding = max(float(r), rounding or 0.0)
    return {"recipe": config.get("mpq", {}).get("recipe"), "bits": qcfg["bits"],
            "group_size": qcfg["group_size"], "sym": qcfg["sym"], "desc_act": qcfg["desc_act"],
            "qweight_tensors": qweights, "scale_rounding": rounding}


def ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            ids[:, 1:].reshape(-1))
    return float(nll.exp())


def check_pair(native: Path, gptq: Path, python: str, backends: list[str], dtypes: list[str],
               batch: int, seq: int, seed: int, work: Path) -> list[dict]:
    import mpq

    model = mpq.load(native, dequantize=True)
    config = model.config
    seq = min(seq, getattr(config, "max_position_embeddings", seq) or seq)
    ids = torch.randint(0, config.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    del model
    ids_path = work / "ids.pt"
    torch.save(ids, ids_path)
    facts = gptq_facts(gptq)
    rows = []
    for backend in backends:
        for dtype in dtypes:
            row = {"native": str(native), "gptq": str(gptq), **facts, "backend": backend,
                   "dtype": dtype, "batch": batch, "seq": seq, "seed": seed,
                   "ppl_mpq": ppl(ref, ids)}
            out = work / f"peer-{backend}-{dtype}.pt"
            run = subprocess.run([python, str(Path(__file__).resolve()), "--peer", str(gptq),
                                  str(ids_path), str(out), backend, dtype],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if run.returncode != 0 or not out.exists():
                lines = [l for l in (run.stderr + run.stdout).splitlines() if l.strip()]
                row["error"] = lines[-1] if lines else f"exit {run.returncode}"
                rows.append(row)
                continue
            got = torch.load(out)
            logits = got["logits"]
            row.update(got["info"])
            row["max_abs_dlogits"] = float((logits - ref).abs().max())
            row["max_abs_logits_mpq"] = float(ref.abs().max())
            row["top1_agreement"] = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
            row["ppl_loader"] = ppl(logits, ids)
            row["kernels_cover_all"] = sum(row["kernels"].values()) == facts["qweight_tensors"]
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("recipe", "sym", "loader", "backend → kernel", "dtype", "max|Δlogits|", "top-1",
            "ppl mpq", "ppl loader")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            cells = (r["recipe"], r["sym"], "transformers+optimum+gptqmodel", r["backend"],
                     r["dtype"], "error: " + r["error"][:80], "", "", "")
        else:
            v = r["versions"]
            loader = (f"transformers {v['transformers']} + optimum {v['optimum']} + "
                      f"gptqmodel {v['gptqmodel']}")
            kernels = ", ".join(f"{k}×{n}" for k, n in r["kernels"].items())
            cells = (r["recipe"], r["sym"], loader, f"{r['backend']} → {kernels}", r["dtype"],
                     f"{r['max_abs_dlogits']:.2e}", f"{r['top1_agreement']:.4f}",
                     f"{r['ppl_mpq']:.4f}", f"{r['ppl_loader']:.4f}")
        lines.append(" | ".join(str(c) for c in cells))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer(*sys.argv[2:7])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", help="NATIVE GPTQ pairs")
    ap.add_argument("--tiny", action="store_true", help="check tiny llama w4a16/w4a16-asym")
    ap.add_argument("--python", help="the loader venv's python (default: setup script)")
    ap.add_argument("--backends", default="auto,torch")
    ap.add_argument("--dtypes", default="float32,float16")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if len(args.paths) % 2 or not (args.paths or args.tiny):
        ap.error("give NATIVE GPTQ pairs and/or --tiny")
    python = loader_python(args.python)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptq-loader-check-") as tmp:
        work = Path(tmp)
        pairs = [(Path(a), Path(b)) for a, b in zip(args.paths[::2], args.paths[1::2])]
        if args.tiny:
            pairs += build_tiny(work / "tiny")
        for i, (native, gptq) in enumerate(pairs):
            (work / str(i)).mkdir()
            rows += check_pair(native, gptq, python, args.backends.split(","),
                               args.dtypes.split(","), args.batch, args.seq, args.seed,
                               work / str(i))
    if args.tiny:
        for r in rows:  # the temporary paths are gone; name what they were
            if "/tiny/" in r["native"]:
                for key in ("native", "gptq"):
                    r[key] = f"tiny llama (tests/tiny_models.py), {r['recipe']}, {key}"
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"check": "gptq_loader_check", "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""KV-cache quantization on SmolLM2-135M at short and long windows: perplexity and the
per-position table, on fp32 weights and on a quantized artifact's weights.

    python benchmarks/kv_cache_ppl.py --model ./SmolLM2-135M --corpora ../shared/corpora \\
        [--artifact out/w4a16-gptq] [--long-window 4096 --long-windows 4]

Each KV scheme is attached to the loaded model (the source folder through mpq's model loader,
the artifact through ``mpq.load``) with the functions ``mpq quantize`` and ``mpq.load`` use
(mpq.quantizers.kv_cache): static schemes are calibrated first on ``--calib-samples`` × 512
tokens of enwiki_excerpt.train.txt (the post-RoPE keys and values of every attention module,
observed with the weights of that row and no KV quantization, as ``mpq quantize`` observes
them), dynamic ones need nothing.  Each row is scored on the first ``--windows`` 512-token
windows of enwiki_excerpt.test.txt and on the first ``--long-windows`` windows of
``--long-window`` tokens, with the per-position buckets of ``mpq eval``.  The delta of a row is
against the same weights without KV quantization.  Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import mpq
from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.config.kv_cache import KVCacheArgs
from mpq.models.attention import attention_modules, tap_kv
from mpq.models.layout import blocks_of, layout_of
from mpq.models.source import load_model, load_tokenizer
from mpq.quantizers.kv_cache import KVObserver, attach_kv_quantization

VARIANTS = {  # row name → KVCacheArgs keywords, or None for no KV quantization
    "none": None,
    "fp8-tensor": dict(format="fp8_e4m3", granularity="tensor"),
    "int8-head": dict(format="int8", granularity="head"),
    "int8-head-dynamic": dict(format="int8", granularity="head", dynamic=True),
    "int4-head": dict(format="int4", granularity="head"),
    "int4-head-dynamic": dict(format="int4", granularity="head", dynamic=True),
    "int4-g32": dict(format="int4", granularity="group", group_size=32),
    "int4-g32-dynamic": dict(format="int4", granularity="group", group_size=32, dynamic=True),
}


def attention_of(model) -> list[torch.nn.Module]:
    blocks = blocks_of(model, layout_of(model))
    return [module for block in blocks for _, module in attention_modules(model, block)]


def attach(model, args: KVCacheArgs, calib: list[torch.Tensor]) -> list:
    """Attach ``args`` to every attention module (calibrating static scales on ``calib``);
    returns the hook handles."""
    modules = attention_of(model)
    if args.dynamic:
        return [attach_kv_quantization(m, args, {}) for m in modules]
    observers = [KVObserver(args) for _ in modules]
    taps = [tap_kv(m, o) for m, o in zip(modules, observers)]
    with torch.inference_mode():
        for ids in calib:
            model(input_ids=ids.unsqueeze(0), use_cache=False)
    for tap in taps:
        tap.remove()
    return [attach_kv_quantization(m, args, o.tensors()) for m, o in zip(modules, observers)]


def score(model, ids, window: int, windows: int) -> dict:
    result = perplexity(model, ids, window=window, num_windows=windows)
    return {"ppl": result.ppl, "windows": result.windows,
            "by_position": [b.to_dict() for b in result.by_position]}


def save(path: Path, settings: dict, rows: list) -> None:
    path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--artifact", type=Path, help="a quantized artifact: its rows too")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--long-window", type=int, default=4096)
    parser.add_argument("--long-windows", type=int, default=4)
    parser.add_argument("--rows", default=",".join(VARIANTS), help="comma-separated row names")
    parser.add_argument("--weights", default="fp32,artifact",
                        help="which weights, in this order: fp32 and/or artifact")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_cache_ppl.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(args.model))
    test_ids = load_eval_ids(args.corpora / "enwiki_excerpt.test.txt", tokenizer)
    train_ids = load_eval_ids(args.corpora / "enwiki_excerpt.train.txt", tokenizer)
    calib = [train_ids[k * 512:(k + 1) * 512] for k in range(args.calib_samples)]
    makers = {"fp32": ("fp32", lambda: load_model(str(args.model), dtype=torch.float32))}
    if args.artifact:
        makers["artifact"] = (args.artifact.name, lambda: mpq.load(args.artifact))
    picked = [w for w in args.weights.split(",") if w]
    if not picked or any(w not in makers for w in picked):
        parser.error(f"--weights: any of {', '.join(makers)} (artifact needs --artifact)")
    weights = [makers[w] for w in picked]
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in VARIANTS]
    if unknown or rows[0] != "none":
        parser.error(f"--rows: start with none, then any of {', '.join(VARIANTS)}")
    results = []
    settings = {"calib_samples": args.calib_samples, "windows": args.windows,
                "long_window": args.long_window, "long_windows": args.long_windows,
                "torch": torch.__version__, "machine": platform.platform(),
                "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for label, make in weights:
        model = make()
        base = {}
        for row in rows:
            spec = VARIANTS[row]
            started = time.perf_counter()
            handles = attach(model, KVCacheArgs(**spec), calib) if spec else []
            short = score(model, test_ids, 512, args.windows)
            long = score(model, test_ids, args.long_window, args.long_windows)
            for handle in handles:
                handle.remove()
            if spec is None:  # the baseline row (listed first)
                base = {"short": short["ppl"], "long": long["ppl"]}
            entry = {"weights": label, "kv": row, "short": short, "long": long,
                     "short_delta": short["ppl"] / base["short"] - 1 if base else None,
                     "long_delta": long["ppl"] / base["long"] - 1 if base else None,
                     "seconds": time.perf_counter() - started}
            results.append(entry)
            save(args.out, settings, results)  # after every row: a long run keeps what it did
            print(json.dumps({k: entry[k] for k in ("weights", "kv", "short_delta",
                                                     "long_delta")}
                             | {"ppl512": short["ppl"], f"ppl{args.long_window}": long["ppl"]}),
                  flush=True)
        del model
    buckets = [f"{b['start']}-{b['end']}" for b in results[0]["long"]["by_position"]]
    head = (f"{'weights':12} {'kv cache':18} {'ppl@512':>9} {'Δ':>7} "
            f"{'ppl@' + str(args.long_window):>9} {'Δ':>7} " + " ".join(f"{b:>10}" for b in buckets))
    print(head)
    for r in results:
        delta = lambda d: f"{d:+7.2%}" if d is not None else f"{'':7}"
        print(f"{r['weights']:12} {r['kv']:18} {r['short']['ppl']:9.3f} {delta(r['short_delta'])} "
              f"{r['long']['ppl']:9.3f} {delta(r['long_delta'])} "
              + " ".join(f"{b['ppl']:10.3f}" for b in r["long"]["by_position"]))


if __name__ == "__main__":
    main()

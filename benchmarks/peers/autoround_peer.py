"""Intel's auto-round package (SignRound) on a HF causal LM, on CPU, on token ids given by mpq.

Runs inside the package's own venv (benchmarks/peers/setup_autoround.sh); never imports mpq.

    python autoround_peer.py --model DIR --calib-ids calib_ids.pt --out OUT_DIR \
        --bits 4 --group-size 64 --iters 200 [--lr 5e-3] [--batch-size 8] [--nsamples 128] \
        [--seqlen 512] [--seed 42] [--asym] [--amp]

- Calibration: the first --nsamples rows of the LongTensor [num_samples, seq_len] in --calib-ids
  (written by the mpq side from its own calibration builder), each cut to --seqlen tokens, are
  handed to ``AutoRound(dataset=...)`` as a list of LongTensors [1, seqlen] in file order: the
  package feeds each one through the model as is (not re-tokenized, not shuffled).  Given tensors,
  the package builds the attention mask itself: ones except tokens equal to the tokenizer's pad
  id (the package needs the tokenizer of a model object; their count is reported as
  pad_tokens_masked, 0 for SmolLM2 on enwiki) and the last position of each row (its guard
  against models that turn an all-ones mask into None); those positions are also left out of its
  block-output loss.
- Algorithm: the package's SignRound with its own defaults except those set here: weights only
  (act_bits 16), int --bits, group --group-size, symmetric unless --asym, --iters iterations per
  block at learning rate --lr (default: the package's, 1/iters), mini-batches of --batch-size
  samples, seed --seed, device cpu (the package's ``SignRoundConfig`` and ``AutoRound``
  arguments).  Its symmetric int grid is "full range": per
  group s = ±absmax / 2^(bits-1), codes in [-2^(bits-1), 2^(bits-1) - 1] (the sign of s puts the
  largest magnitude on the -2^(bits-1) end); scales are stored as float16 (the package's default
  scale_dtype).  Min-max (clipping) tuning is on (its default); lm_head is not quantized (its
  default); torch.compile is left to the package (on Linux it compiles the tuning step from 10
  iterations up; reported as torch_compile).
- Precision: by default the package's automatic mixed precision is off (``amp=False``), so it tunes
  in float32 like mpq and the dequantized weights are exactly code × scale; --amp keeps the
  package's CPU default (the model cast to bfloat16 for tuning, so the saved weights carry a
  bfloat16 rounding of code × scale).
- Output: a plain float32 HF folder (no quantization_config) holding the dequantized weights that
  ``AutoRound.quantize()`` leaves in the model (the package's "fake" quantization), loadable by
  transformers.AutoModelForCausalLM.from_pretrained anywhere; every quantized Linear is checked to
  lie on its grid first.
- Prints one JSON line on stdout (all logs go to stderr): quant_s (model loaded -> quantize()
  returned, save excluded), total_s (whole process), peak_rss_kib (ru_maxrss of this process at
  exit, KiB), peak_rss_quant_kib (the same when quantization was done, before saving), versions
  and settings.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

STARTED = time.perf_counter()
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def calibration_rows(ids_file: str, nsamples: int | None, seqlen: int | None):
    """The first ``nsamples`` rows of the ids file, cut to ``seqlen``: a list of [1, seqlen]."""
    import torch

    ids = torch.load(ids_file)
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
        raise SystemExit(f"{ids_file}: expected a LongTensor [num_samples, seq_len]")
    nsamples = ids.shape[0] if nsamples is None else nsamples
    seqlen = ids.shape[1] if seqlen is None else seqlen
    if not 1 <= nsamples <= ids.shape[0] or not 1 <= seqlen <= ids.shape[1]:
        raise SystemExit(f"{ids_file} holds {tuple(ids.shape)}: cannot take {nsamples} samples "
                         f"of {seqlen} tokens")
    return [row[None, :seqlen].clone() for row in ids[:nsamples]], nsamples, seqlen


def check_on_grid(model, bits: int, sym: bool, tolerance: float) -> tuple[int, float]:
    """Check that every quantized Linear (one with the ``scale`` the package leaves on it) holds
    code × scale (− zero point when asymmetric) with codes in range; (count, max distance)."""
    import torch

    if sym:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    checked, worst = 0, 0.0
    for name, module in model.named_modules():
        scale = getattr(module, "scale", None)
        if not isinstance(module, torch.nn.Linear) or not isinstance(scale, torch.Tensor):
            continue
        w = module.weight.detach().float()
        n = w.shape[0]
        s = scale.detach().float().reshape(n, -1)  # [n, groups]
        codes = w.reshape(n, s.shape[1], -1) / s.unsqueeze(-1)
        zero = getattr(module, "zp", None)
        if not sym and zero is not None:
            zero = zero.detach().float() if isinstance(zero, torch.Tensor) else float(zero)
            codes = codes + (zero.reshape(n, -1, 1) if isinstance(zero, torch.Tensor) else zero)
        off_grid = (codes - codes.round()).abs().max().item()
        if off_grid > tolerance or codes.round().min() < qmin or codes.round().max() > qmax:
            raise SystemExit(f"{name}: weights are not on the int{bits} grid "
                             f"(max distance {off_grid:.2e})")
        worst = max(worst, off_grid)
        checked += 1
    if checked == 0:
        raise SystemExit("no quantized Linear found after AutoRound.quantize()")
    return checked, worst


def save_dense(quantized, model_dir: str, out: Path) -> None:
    """Write a plain fp32 HF folder with the quantized model's (dequantized) weights.

    A fresh copy of the original model receives the quantized model's parameters (the package
    leaves its scales as plain attributes, and may have cast the model to bfloat16), so the folder
    is an ordinary float32 checkpoint without quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    wanted = fresh.state_dict().keys()
    state = {k: v.float() for k, v in quantized.state_dict().items() if k in wanted}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise SystemExit(f"quantized model lacks {len(missing)} parameters, e.g. {missing[:3]}")
    fresh.load_state_dict(state, strict=True)
    fresh.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(model_dir) / name).exists() and not (out / name).exists():
            shutil.copy(Path(model_dir) / name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder (fp32)")
    parser.add_argument("--calib-ids", required=True, help=".pt LongTensor [num_samples, seq_len]")
    parser.add_argument("--out", required=True, help="folder for the dequantized fp32 model")
    parser.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    parser.add_argument("--group-size", type=int, default=64, help="-1: per output channel")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (default: symmetric)")
    parser.add_argument("--iters", type=int, required=True, help="SignRound iterations per block")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: the package's, 1/iters)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (package: 8)")
    parser.add_argument("--nsamples", type=int, default=None, help="default: all rows of the file")
    parser.add_argument("--seqlen", type=int, default=None, help="default: the file's row length")
    parser.add_argument("--seed", type=int, default=42, help="the package's default seed")
    parser.add_argument("--amp", action="store_true",
                        help="the package's CPU default: tune in bfloat16 (default: float32)")
    args = parser.parse_args()
    if args.iters < 1 or args.batch_size < 1 or (args.lr is not None and args.lr <= 0):
        raise SystemExit("--iters must be >= 1, --batch-size >= 1, --lr > 0")
    # The package logs to stdout; keep stdout for the one JSON line by pointing fd 1 (and with it
    # sys.stdout and any library's prints) at stderr and writing the JSON to a saved copy.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import torch
    from auto_round import AutoRound, SignRoundConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows, nsamples, seqlen = calibration_rows(args.calib_ids, args.nsamples, args.seqlen)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id
    pad_tokens = 0 if pad is None else sum(int((row == pad).sum()) for row in rows)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    t0 = time.perf_counter()  # model loaded
    config = SignRoundConfig(iters=args.iters, lr=args.lr, bits=args.bits,
                             group_size=args.group_size, sym=not args.asym)
    autoround = AutoRound(model, tokenizer=tokenizer, alg_configs=config,
                          batch_size=args.batch_size, nsamples=nsamples, seqlen=seqlen,
                          dataset=rows, seed=args.seed, device_map="cpu", amp=args.amp)
    torch_compile = bool(getattr(autoround, "enable_torch_compile", False))
    quantized, _ = autoround.quantize()
    quant_s = time.perf_counter() - t0  # quantization done
    peak_quant = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # float32: code × float16 scale is exact; bfloat16 storage (--amp) rounds it to 8 bits of
    # mantissa, |code| <= 2^(bits-1), so up to 2^(bits-1) × 2^-8 in code units.
    tolerance = 2.0 ** (args.bits - 1) * 2.0 ** -8 * 1.1 if args.amp else 1e-3
    num_quantized, off_grid = check_on_grid(quantized, args.bits, not args.asym, tolerance)
    weight_dtype = str(next(quantized.parameters()).dtype)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dense(quantized, args.model, out)

    print(json.dumps({
        "tool": "auto-round", "auto_round_version": version("auto-round"),
        "transformers_version": version("transformers"), "torch_version": torch.__version__,
        "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
        "iters": args.iters, "lr": args.lr, "batch_size": args.batch_size, "nsamples": nsamples,
        "seqlen": seqlen, "seed": args.seed, "pad_tokens_masked": pad_tokens, "amp": args.amp, "tuned_dtype": weight_dtype,
        "torch_compile": torch_compile,
        "quantized_linears": num_quantized, "max_off_grid": off_grid,
        "threads": torch.get_num_threads(),
        "quant_s": quant_s, "total_s": time.perf_counter() - STARTED,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_rss_quant_kib": peak_quant, "out": str(out.resolve()),
    }), file=json_out, flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""llm-compressor's GPTQ on a HF causal LM, on CPU, with settings matching mpq's GPTQ benchmark.

Runs inside llm-compressor's own venv (benchmarks/peers/setup_llmcompressor.sh); never imports mpq.

    python llmcompressor_gptq.py --model DIR --calib-ids calib_ids.pt --out OUT_DIR \
        --scheme int4-g64 [--damp 0.01] [--block-size 128] [--actorder static] [--observer minmax]

- Calibration: the LongTensor [num_samples, seq_len] in --calib-ids (written by the mpq side from
  its own calibration builder) is fed as is, one sequence per batch, in file order: no tokenizer,
  no shuffling, no truncation, so both tools see identical tokens.
- Recipe: GPTQModifier on every Linear except lm_head; symmetric int weights, group 64 or
  per-channel; dampening_frac=--damp, block_size=--block-size; actorder=--actorder: "none" (plain
  GPTQ column order) or "static" (llm-compressor's default, alias "weight": columns solved by
  descending diag(H), groups fixed in the original column order = mpq's act_order + static_groups);
  pipeline="sequential" (one decoder layer at a time, quantized outputs feed the next layer).
  Note: in llm-compressor (0.14) the scales are fixed up front from the original weights, i.e.
  "static groups"; the reference GPTQ recomputes a group's scale when the solve reaches it.
  --observer picks how: "minmax" (llm-compressor's default for weights, memoryless min-max:
  scale = absmax / ((qmax - qmin) / 2), int4 codes in [-8, 7]) or "mse" (its memoryless MSE
  observer: each range shrunk by the factor, down to 0.8 on a 100-point grid, that minimises the
  unweighted |w - q|^2.4 of the weights; llm-compressor's counterpart of mpq's clip_search) or
  "imatrix_mse" (its importance-weighted MSE observer: the same range search with each input
  column's error weighted by E[x²] of that column over the calibration inputs, llama.cpp's
  importance matrix; it makes the calibration pass collect those statistics).
- Output: a plain fp32 HF folder (no quantization_config) holding the dequantized weights (GPTQ's;
  for rtn, compressed-tensors' fake quantization of the float weights with the observer's scales),
  loadable by transformers.AutoModelForCausalLM.from_pretrained anywhere.
- Prints one JSON line on stdout (all logs go to stderr): quant_s (model loaded -> GPTQ done, save
  excluded), total_s (whole process), peak_rss_kib (ru_maxrss of this process at exit, KiB),
  peak_rss_quant_kib (the same when GPTQ was done, before saving), versions and settings.
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

SCHEMES = {  # name -> (bits, group size; None = per output channel)
    "int4-g64": (4, 64),
    "int4-channel": (4, None),
    "int3-g64": (3, 64),
}


def build_recipe(bits: int, group: int | None, damp: float, block_size: int,
                 actorder: str | None, observer: str, algorithm: str = "gptq"):
    """GPTQModifier (or, for ``algorithm`` rtn, QuantizationModifier: scales from the observer,
    weights rounded to nearest) for symmetric int weights on all Linear layers but lm_head."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=True,
        strategy="group" if group else "channel", group_size=group,
        actorder=actorder if algorithm == "gptq" else None, observer=observer)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    if algorithm == "rtn":
        return QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                        dampening_frac=damp, block_size=block_size, actorder=actorder)


def calibration_loader(ids_file: str):
    """DataLoader of {"input_ids", "attention_mask"} batches [1, seq_len], in file order."""
    import torch
    from torch.utils.data import DataLoader

    ids = torch.load(ids_file)
    if ids.dtype != torch.long or ids.dim() != 2:
        raise SystemExit(f"{ids_file}: expected a LongTensor [num_samples, seq_len], "
                         f"got {ids.dtype} {tuple(ids.shape)}")
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    return DataLoader(rows, batch_size=1, shuffle=False), tuple(ids.shape)


def apply_weight_quantization(model) -> None:
    """Write each quantized Linear's fake-quantized weight into it (compressed-tensors'
    ``fake_quantize`` with its scales): QuantizationModifier (rtn) leaves the float weights in
    place and quantizes them in the forward only, so the dense copy needs this; GPTQ's weights
    already are on the grid, where it changes nothing."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        scale = getattr(module, "weight_scale", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scale is None:
            continue
        with torch.no_grad():
            module.weight.copy_(fake_quantize(module.weight, scale,
                                              getattr(module, "weight_zero_point", None),
                                              scheme.weights))


def check_on_grid(model, bits: int) -> int:
    """Assert every quantized Linear's weight is (code − zero) × scale with codes in range
    (zero: its weight_zero_point when asymmetric); return the count."""
    import torch

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    checked = 0
    for name, module in model.named_modules():
        scale = getattr(module, "weight_scale", None)
        if not isinstance(module, torch.nn.Linear) or scale is None:
            continue
        zero = getattr(module, "weight_zero_point", None)
        w = module.weight.detach().float()
        n, k = w.shape
        s = scale.detach().float()  # [n, 1] per-channel or [n, k // group]
        codes = w.reshape(n, s.shape[1], -1) / s.unsqueeze(-1)
        if zero is not None:
            codes = codes + zero.detach().float().unsqueeze(-1)
        off_grid = (codes - codes.round()).abs().max().item()
        if off_grid > 1e-3 or codes.round().min() < qmin or codes.round().max() > qmax:
            raise SystemExit(f"{name}: weights are not on the int{bits} grid "
                             f"(max distance {off_grid:.2e})")
        checked += 1
    return checked


def save_dense(quantized, model_dir: str, out: Path) -> None:
    """Write a plain fp32 HF folder with the quantized model's (dequantized) weights.

    The quantized model carries compressed-tensors parameters (weight_scale, ...) and a wrapped
    save_pretrained; a fresh copy of the original model receiving only its regular parameters
    saves as an ordinary checkpoint without quantization_config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    wanted = fresh.state_dict().keys()
    state = {k: v for k, v in quantized.state_dict().items() if k in wanted}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise SystemExit(f"quantized model lacks {len(missing)} parameters, e.g. {missing[:3]}")
    fresh.load_state_dict(state, strict=True)
    fresh.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):
        if (Path(model_dir) / name).exists() and not (out / name).exists():
            shutil.copy(Path(model_dir) / name, out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder (fp32)")
    parser.add_argument("--calib-ids", required=True, help=".pt LongTensor [num_samples, seq_len]")
    parser.add_argument("--out", required=True, help="folder for the dequantized fp32 model")
    parser.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    parser.add_argument("--damp", type=float, default=0.01, help="dampening fraction of mean diag H")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--actorder", choices=["none", "static"], default="static",
                        help="column order of the solve (default: llm-compressor's own, static)")
    parser.add_argument("--observer", choices=["minmax", "mse", "imatrix_mse"], default="minmax",
                        help="how weight scales are chosen (default: llm-compressor's own, minmax)")
    parser.add_argument("--algorithm", choices=["gptq", "rtn"], default="gptq",
                        help="rtn: llm-compressor's QuantizationModifier (no GPTQ solve)")
    args = parser.parse_args()
    actorder = None if args.actorder == "none" else args.actorder
    bits, group = SCHEMES[args.scheme]
    # llm-compressor logs to stdout; keep stdout for the one JSON line by pointing fd 1 (and with
    # it sys.stdout and any library's prints) at stderr and writing the JSON to a saved copy.
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    t0 = time.perf_counter()  # model loaded
    loader, calib_shape = calibration_loader(args.calib_ids)
    quantized = oneshot(model=model, dataset=loader, recipe=build_recipe(bits, group, args.damp,
                                                                       args.block_size, actorder,
                                                                       args.observer,
                                                                       args.algorithm),
                        pipeline="sequential", num_calibration_samples=calib_shape[0],
                        max_seq_length=calib_shape[1], shuffle_calibration_samples=False)
    quant_s = time.perf_counter() - t0  # GPTQ done
    peak_quant = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if args.algorithm == "rtn":
        apply_weight_quantization(quantized)
    num_quantized = check_on_grid(quantized, bits)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dense(quantized, args.model, out)

    print(json.dumps({
        "tool": "llmcompressor", "llmcompressor_version": version("llmcompressor"),
        "compressed_tensors_version": version("compressed-tensors"),
        "transformers_version": version("transformers"), "torch_version": torch.__version__,
        "scheme": args.scheme, "bits": bits, "group_size": group, "symmetric": True,
        "damp": args.damp, "block_size": args.block_size, "actorder": actorder,
        "observer": args.observer, "algorithm": args.algorithm,
        "pipeline": "sequential", "calib_shape": list(calib_shape),
        "quantized_linears": num_quantized, "threads": torch.get_num_threads(),
        "quant_s": quant_s, "total_s": time.perf_counter() - STARTED,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_rss_quant_kib": peak_quant, "out": str(out.resolve()),
    }), file=json_out, flush=True)


if __name__ == "__main__":
    sys.exit(main())

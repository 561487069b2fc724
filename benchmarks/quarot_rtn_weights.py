"""Why QuaRot makes RTN int4 *weights* worse on SmolLM2-135M: which layers, and on which tokens.

    python benchmarks/quarot_rtn_weights.py --model ./SmolLM2-135M --corpora ../shared/corpora

Part 1 (perplexity): RTN int4 symmetric g64 weights on one kind of linear at a time (the rest
fp32, no activation quantization), without and with QuaRot (R1 Hadamard, R2, R4, seed 0), on the
first ``--num-windows`` × 512-token windows of enwiki_excerpt.test.txt.
Part 2 (layer outputs): for v_proj of a few blocks, the relative output error
‖ΔW x‖² / ‖W x‖² of RTN int4 g64 on the norm-fused weight, in the original basis and after a
randomized Hadamard R1, separately for the first token of a 512-token calibration sequence (the
attention sink) and for the other tokens.  Prints both tables; writes JSON and markdown under
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

import mpq
import mpq.quantizers  # noqa: F401  (registers RTN)
from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.models.source import load_model
from mpq.quantize import quantize
from mpq.quantizers.base import QUANTIZERS
from mpq.config.recipe import parse_recipe
from mpq.rotation.hadamard import hadamard_matrix
from mpq.numerics.args import WeightArgs
from mpq.config.scheme import LayerScheme

WEIGHTS = "{format: int, bits: 4, granularity: group, group_size: 64}"
SUBSETS = {"all linears": "re:.*_proj", "q_proj, k_proj": "re:.*(q_proj|k_proj)",
           "v_proj": "re:.*v_proj", "gate_proj, up_proj": "re:.*(gate_proj|up_proj)",
           "o_proj, down_proj": "re:.*(o_proj|down_proj)"}


def recipe(regex: str, rotated: bool):
    text = ("mpq_recipe: 1\nname: quarot-rtn-weights\n"
            + ("rotation: {type: quarot, r1: hadamard, r2: true, r4: true, seed: 0}\n"
               if rotated else "")
            + f"rules:\n  - targets: ['{regex}']\n    weights: {WEIGHTS}\n"
              "  - targets: [Linear]\n    skip: true\n")
    return parse_recipe(text, "quarot-rtn-weights")


def perplexity_rows(model: str, ids, num_windows: int) -> list[dict]:
    rows, work = [], Path(tempfile.mkdtemp(prefix="mpq-quarot-rtn-"))
    try:
        for subset, regex in SUBSETS.items():
            row = {"quantized": subset}
            for rotated in (False, True):
                quantize(model, recipe(regex, rotated), work / "a", force=True)
                row["rotated" if rotated else "plain"] = perplexity(
                    mpq.load(work / "a", dequantize=True), ids, window=512,
                    num_windows=num_windows).ppl
            rows.append(row)
            print(f"{subset}: {row['plain']:.3f} -> {row['rotated']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def output_error_rows(model_dir: str, calib_ids: torch.Tensor, blocks: list[int]) -> list[dict]:
    model = load_model(model_dir)
    hidden = model.config.hidden_size
    inputs = {}
    for index in blocks:
        norm = model.model.layers[index].input_layernorm

        def grab(module, args, index=index):
            x = args[0][0].float()
            rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            inputs[index] = x * rms

        norm.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(calib_ids)
    scheme = LayerScheme(weights=WeightArgs(format="int", bits=4, granularity="group",
                                            group_size=64))
    rtn = QUANTIZERS.get("rtn")
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (hidden,), generator=generator).float() * 2 - 1
    rotation = torch.diag(signs) @ hadamard_matrix(hidden).float() / hidden ** 0.5
    rows = []
    with torch.no_grad():
        for index, x in inputs.items():
            block = model.model.layers[index]
            weight = block.self_attn.v_proj.weight.float() * block.input_layernorm.weight.float()
            row = {"block": index, "x0_absmax_over_rms": float(x[0].abs().max())}
            for name, (w, xs) in {"plain": (weight, x),
                                  "rotated": (weight @ rotation, x @ rotation)}.items():
                error = rtn.quantize(w, scheme, {}).dequantize(torch.float32) - w
                num, den = (error @ xs.T).pow(2).sum(0), (w @ xs.T).pow(2).sum(0)
                row[f"token0_{name}"] = float(num[0] / den[0])
                row[f"others_{name}"] = float(num[1:].sum() / den[1:].sum())
                row[f"weight_{name}"] = float(error.pow(2).sum() / w.pow(2).sum())
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M")
    parser.add_argument("--corpora", default="../shared/corpora")
    parser.add_argument("--num-windows", type=int, default=4)
    parser.add_argument("--blocks", type=int, nargs="*", default=[1, 5, 10, 20, 28])
    parser.add_argument("--out", default="benchmarks/results/quarot_rtn_weights.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = load_eval_ids(Path(args.corpora) / "enwiki_excerpt.test.txt", tokenizer)
    base = perplexity(load_model(args.model), ids, window=512, num_windows=args.num_windows).ppl
    ppl_rows = perplexity_rows(args.model, ids, args.num_windows)
    text = (Path(args.corpora) / "enwiki_excerpt.train.txt").read_text(encoding="utf-8")[:20000]
    calib_ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
    error_rows = output_error_rows(args.model, calib_ids, args.blocks)
    lines = [f"fp32: {base:.3f} (first {args.num_windows} x 512 windows)",
             f"{'RTN int4 g64 on':<22}{'no rotation':>13}{'QuaRot':>9}"]
    lines += [f"{r['quantized']:<22}{r['plain']:>13.3f}{r['rotated']:>9.3f}" for r in ppl_rows]
    lines += ["", "v_proj relative output error (RTN int4 g64, norm-fused), plain -> R1-rotated",
              f"{'block':>5}{'token 0':>22}{'other tokens':>22}{'weight':>22}{'|x0|max/rms':>13}"]
    for r in error_rows:
        lines.append(f"{r['block']:>5}"
                     + "".join(f"{r[k + '_plain']:>11.4f}{r[k + '_rotated']:>11.4f}"
                               for k in ("token0", "others", "weight"))
                     + f"{r['x0_absmax_over_rms']:>13.1f}")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fp32_ppl": base, "num_windows": args.num_windows,
                               "weights": WEIGHTS, "perplexity": ppl_rows,
                               "v_proj_output_error": error_rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# QuaRot and RTN int4 weights on SmolLM2-135M\n\nGenerated by "
        "`python benchmarks/quarot_rtn_weights.py` (see its docstring).\n\n```\n"
        + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main()

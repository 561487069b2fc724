"""llm-compressor's AWQ on a HF causal LM, on CPU, with settings matching mpq's AWQ benchmark.

Runs inside llm-compressor's own venv (benchmarks/peers/setup_llmcompressor.sh); never imports mpq.

    python llmcompressor_awq.py --model DIR --calib-ids calib_ids.pt --out OUT_DIR \
        [--bits 4] [--group-size 64] [--n-grid 20]

- Calibration: as llmcompressor_gptq.py (the exact token ids mpq drew, one sequence per batch).
- Recipe: AWQModifier (its default mappings for the architecture, duo_scaling=True,
  n_grid=--n-grid) followed by QuantizationModifier with asymmetric int weights, group
  --group-size, on every Linear except lm_head (its min-max observer); pipeline="sequential".
  llm-compressor (0.14) has no AWQ weight-clipping search, so none runs here.
- CPU workaround: llm-compressor 0.14's AWQ pins its cached activations (``pin_memory``) before
  each grid search, which raises "Cannot access accelerator device" on a machine without one.
  Pinning only speeds up host-to-GPU copies, so without CUDA it is turned into a no-op here.
- Output and the JSON line on stdout: as llmcompressor_gptq.py.  llm-compressor's
  QuantizationModifier leaves the float weights in place (it quantizes them on the fly in
  forward, and when it compresses a checkpoint); here each is replaced by compressed-tensors'
  own ``fake_quantize`` of it with the module's scale and zero point before the check and save.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

from llmcompressor_gptq import calibration_loader, check_on_grid, save_dense  # noqa: E402

STARTED = time.perf_counter()


def build_recipe(bits: int, group: int, n_grid: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                               group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return [AWQModifier(duo_scaling=True, n_grid=n_grid),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]


def fake_quantize_weights(model) -> None:
    """Replace each quantized Linear's weight by its quantize-dequantize (what inference uses)."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            module.weight.copy_(fake_quantize(module.weight, module.weight_scale,
                                              getattr(module, "weight_zero_point", None),
                                              scheme.weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder (fp32)")
    parser.add_argument("--calib-ids", required=True, help=".pt LongTensor [num_samples, seq_len]")
    parser.add_argument("--out", required=True, help="folder for the dequantized fp32 model")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--n-grid", type=int, default=20)
    args = parser.parse_args()
    sys.stdout.flush()  # keep stdout for the JSON line (see llmcompressor_gptq.py)
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import torch
    from llmcompressor import oneshot
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():  # see the docstring's CPU workaround
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    t0 = time.perf_counter()
    loader, calib_shape = calibration_loader(args.calib_ids)
    quantized = oneshot(model=model, dataset=loader,
                        recipe=build_recipe(args.bits, args.group_size, args.n_grid),
                        pipeline="sequential", num_calibration_samples=calib_shape[0],
                        max_seq_length=calib_shape[1], shuffle_calibration_samples=False)
    quant_s = time.perf_counter() - t0
    peak_quant = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fake_quantize_weights(quantized)
    num_quantized = check_on_grid(quantized, args.bits)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_dense(quantized, args.model, out)
    print(json.dumps({
        "tool": "llmcompressor", "method": "awq", "llmcompressor_version": version("llmcompressor"),
        "compressed_tensors_version": version("compressed-tensors"),
        "transformers_version": version("transformers"), "torch_version": torch.__version__,
        "bits": args.bits, "group_size": args.group_size, "symmetric": False,
        "n_grid": args.n_grid, "duo_scaling": True, "pipeline": "sequential",
        "calib_shape": list(calib_shape), "quantized_linears": num_quantized,
        "threads": torch.get_num_threads(), "quant_s": quant_s,
        "total_s": time.perf_counter() - STARTED,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_rss_quant_kib": peak_quant, "out": str(out.resolve()),
    }), file=json_out, flush=True)


if __name__ == "__main__":
    main()

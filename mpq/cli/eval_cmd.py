"""``mpq eval MODEL --data FILE [--reference REF]``: perplexity, KL, by position, CI gates."""
from __future__ import annotations

import math
from contextlib import nullcontext

import click

from mpq.cli.calibration_view import short_calibration_warning
from mpq.cli.console import emit_json, stderr_console, stdout_console
from mpq.cli.options import json_option
from mpq.errors import EvalGateError, ModelError, OptionError


def parse_ppl_delta(value: str | None) -> tuple[float, bool] | None:
    """'2%' → (0.02, relative); '1.5' → (1.5, absolute ppl points)."""
    if value is None:
        return None
    text = value.strip()
    relative = text.endswith("%")
    try:
        number = float(text[:-1] if relative else text)
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a number or a percentage (e.g. 1.5 or 2%)",
                                 param_hint="--max-ppl-delta") from None
    if number < 0:
        raise click.BadParameter("must be ≥ 0", param_hint="--max-ppl-delta")
    return (number / 100 if relative else number), relative


def load_for_eval(path: str, dequantize: bool, verify: bool = True):
    """A native mpq artifact through mpq.load, any other folder as a plain transformers model.
    Unless ``verify`` is off, every folder mpq wrote (any format) is first checked against
    what it records about its files (mpq.checkpoint.verify.require_intact)."""
    from mpq.checkpoint.native import is_artifact, written_format
    from mpq.checkpoint.verify import require_intact
    from mpq.loader import load
    from mpq.models.source import check_model_dir, load_model, load_tokenizer

    if is_artifact(path):
        model = load(path, dequantize=dequantize, verify=verify)
    else:
        if verify and written_format(path) is not None:
            require_intact(path)
        model = load_model(check_model_dir(path))
    return model, load_tokenizer(path)


def check_gates(result: dict, ppl_delta, max_kl) -> list[str]:
    """The gates ``result`` fails; a figure that is not finite (NaN, inf) fails its gate."""
    failures = []
    if ppl_delta is not None:
        limit, relative = ppl_delta
        ppl, ref = result["ppl"], result["ref_ppl"]
        if not (math.isfinite(ppl) and math.isfinite(ref)):
            failures.append(f"ppl {ppl} or reference ppl {ref} is not finite")
        else:
            delta = ppl - ref
            allowed = limit * ref if relative else limit
            if delta > allowed:
                failures.append(f"ppl {ppl:.4f} exceeds reference {ref:.4f} by "
                                f"{delta:.4f} > allowed {allowed:.4f}")
    if max_kl is not None:
        kl = result["kl_mean"]
        if not math.isfinite(kl):
            failures.append(f"mean KL {kl} is not finite")
        elif kl > max_kl:
            failures.append(f"mean KL {kl:.5f} > --max-kl {max_kl}")
    return failures


def gate_hint(failures: list[str]) -> str:
    if any("not finite" in failure for failure in failures):
        return ("a NaN or inf figure means the model's outputs are broken: check the artifact "
                "with mpq verify and mpq inspect")
    return "loosen the gate, or quantize with a more precise recipe"


def eval_protocol(window: int, stride: int | None, bos_id: int | None) -> dict:
    """How the windows were made (mpq.analysis.eval): window, stride, BOS."""
    body = window - (bos_id is not None)
    return {"window": window, "stride": body if stride is None else stride,
            "bos": bos_id is not None, "bos_token_id": bos_id}


def describe_protocol(protocol: dict) -> str:
    bos = (f"BOS id {protocol['bos_token_id']} + {protocol['window'] - 1} text tokens"
           if protocol["bos"] else "no BOS")
    numerics = ("; llama.cpp's 8-bit activation rounding"
                if protocol.get("numerics") == "llama.cpp" else "")
    return (f"protocol: window {protocol['window']} ({bos}), stride {protocol['stride']}"
            f"{numerics}")


def vocabulary_size(model) -> int | None:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_same_vocabulary(model, model_path: str, reference, reference_path: str) -> None:
    """ModelError when the two models score different vocabularies (their distributions cannot
    be compared, and the reference may not even embed the evaluated model's token ids)."""
    mine, theirs = vocabulary_size(model), vocabulary_size(reference)
    if mine is not None and theirs is not None and mine != theirs:
        raise ModelError(f"--reference '{reference_path}' has a vocabulary of {theirs} tokens, "
                         f"'{model_path}' one of {mine}: their next-token distributions cannot "
                         "be compared", hint="pass as --reference the float model this one was "
                                             "quantized from, with the same tokenizer")


@click.command("eval")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str), help="Text file to score.")
@click.option("--reference", type=click.Path(path_type=str),
              help="Reference model folder: adds KL divergence and top-1 agreement.")
@click.option("--window", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--num-windows", default=None, type=click.IntRange(min=1),
              help="Score only the first N windows (default: all).")
@click.option("--stride", default=None, type=click.IntRange(min=1),
              help="Sliding-window stride (default: the window's text tokens, "
                   "non-overlapping: the window, or the window - 1 after a BOS).")
@click.option("--bos/--no-bos", "bos", default=None,
              help="Begin each window with the tokenizer's BOS token, or not (default: as the "
                   "model's tokenizer does when it encodes a text).")
@click.option("--max-ppl-delta", default=None,
              help="Gate: fail (exit 10) if ppl exceeds the reference's by more than this "
                   "(absolute, or relative with %, e.g. 2%).")
@click.option("--max-kl", default=None, type=float, help="Gate: fail (exit 10) above this mean KL.")
@click.option("--dequantize", is_flag=True, help="Dequantize all layers up front (faster).")
@click.option("--no-verify", "no_verify", is_flag=True,
              help="Skip checking the artifact's files against their recorded sha256 and "
                   "for unrecorded files (done by default before loading).")
@click.option("--plot", "plot_path", type=click.Path(path_type=str), default=None,
              help="Write a PNG of mean NLL (and KL with --reference) by position in the "
                   "window (needs matplotlib).")
@click.option("--numerics", type=click.Choice(["mpq", "llama.cpp"]), default="mpq",
              show_default=True,
              help="llama.cpp: round every quantized matmul's inputs to 8 bits as llama.cpp does "
                   "for the layer's GGUF type (q8_0 blocks of 32, q8_K blocks of 256), so the "
                   "figures are those llama.cpp gives the artifact's --format gguf file; needs "
                   "an artifact whose quantized layers all have a GGUF type.")
@json_option
def command(model, data, reference, window, num_windows, stride, bos, max_ppl_delta, max_kl,
            dequantize, no_verify, plot_path, numerics, as_json):
    """Perplexity of MODEL (an mpq artifact or a model folder) on DATA.

    Each window begins with the BOS token where MODEL's tokenizer adds one (--bos/--no-bos
    override that); the protocol used (window, stride, BOS) is printed with the figures, and the
    figures by text position in the window (0–512, 512–2k, 2k–4k, 4k–8k, ...).  A warning
    says when MODEL's calibration samples were shorter than the window.
    """
    from mpq.analysis.eval import compare, load_eval_ids, perplexity
    from mpq.analysis.llama_cpp_numerics import llama_cpp_activations
    from mpq.cli.eval_report import plot_positions, position_table
    from mpq.cli.plotting import require_matplotlib
    from mpq.calibration.conventions import eval_bos
    from mpq.models.source import max_positions

    ppl_delta = parse_ppl_delta(max_ppl_delta)
    if (ppl_delta is not None or max_kl is not None) and reference is None:
        raise click.UsageError("--max-ppl-delta and --max-kl need --reference")
    if plot_path is not None:
        require_matplotlib()  # before any model is read
    quantized, tokenizer = load_for_eval(model, dequantize, verify=not no_verify)
    limit = max_positions(quantized)
    if limit is not None and window > limit:
        raise OptionError(f"--window {window} exceeds the model's maximum of {limit} "
                          "positions", hint=f"use --window {limit} or less")
    bos_id = eval_bos(tokenizer, bos, where=f"the tokenizer of '{model}'")
    warnings = [w for w in (short_calibration_warning(model, window),) if w is not None]
    for warning in warnings:  # stderr, --json or not (also in the JSON result)
        stderr_console().print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    rounding = nullcontext() if numerics == "mpq" else llama_cpp_activations(quantized)
    with rounding:  # refuses a model without GGUF types before the data is read
        ids = load_eval_ids(data, tokenizer)
        if reference is None:
            result = perplexity(quantized, ids, window=window, num_windows=num_windows,
                                stride=stride, bos_id=bos_id).to_dict()
        else:
            if stride is not None:
                raise click.UsageError("--stride is not supported together with --reference")
            ref_model, _ = load_for_eval(reference, False)
            check_same_vocabulary(quantized, model, ref_model, reference)
            result = compare(quantized, ref_model, ids, window=window, num_windows=num_windows,
                             bos_id=bos_id).to_dict()
    protocol = {**eval_protocol(window, stride, bos_id), "numerics": numerics}
    result = {"model": model, "data": data, "reference": reference, **result,
              "protocol": protocol}
    failures = check_gates(result, ppl_delta, max_kl) if reference else []
    result["gates_failed"] = failures
    result["warnings"] = warnings
    if plot_path is not None:
        plot_positions(result, plot_path)
    if as_json:
        emit_json(result)
    else:
        console = stdout_console()
        console.print(f"ppl {result['ppl']:.4f}" + (
            f" (reference {result['ref_ppl']:.4f}, Δ {result['ppl'] - result['ref_ppl']:+.4f}); "
            f"mean KL {result['kl_mean']:.5f}; top-1 agreement {result['top1_agreement']:.4f}"
            if reference else ""))
        console.print(position_table(result))
        console.print(describe_protocol(protocol), highlight=False)
        if plot_path is not None:
            console.print(f"wrote {plot_path}")
    if failures:
        raise EvalGateError(f"gate failed: {'; '.join(failures)}", hint=gate_hint(failures))

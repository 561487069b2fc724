"""``mpq drift ARTIFACT --data TRAFFIC``: an artifact's static scales against new traffic."""
from __future__ import annotations

from pathlib import Path

import click

from mpq.cli.console import emit_json, stdout_console
from mpq.cli.options import json_option, sample_options


def no_static_scale_error(path: str, plan):
    from mpq.errors import ArtifactError

    dynamic = sum(1 for layer in plan.quantized() if layer.scheme.input_activations is not None)
    why = (f"its {dynamic} layer(s) with input activation quantization use dynamic scales"
           if dynamic else "it quantizes no input activations")
    kv = plan.kv_cache
    why += ("; its KV cache is quantized with dynamic ranges" if kv is not None
            else "; its KV cache is not quantized")
    return ArtifactError(f"'{path}' has no static scale to check: {why}, so no scale was fixed "
                         "at calibration time that new traffic could outgrow",
                         hint="mpq drift checks artifacts quantized with `input_activations: "
                              "{dynamic: false}` or a calibrated `kv_cache:`; mpq validate "
                              "checks activation ranges of any model")


def reference_model(artifact, source: str | None):
    """(float reference model or None, its path, why KL is not measured)."""
    from mpq.cli.eval_cmd import load_for_eval

    if source is None:
        recorded = (artifact.json_field("source") or {}).get("path")
        if not recorded or not Path(recorded).is_dir():
            return None, recorded, (f"the float source recorded in the artifact ('{recorded}') "
                                    "is not found; pass --source MODEL")
        source = recorded
    model, _ = load_for_eval(source, False)
    return model, source, None


def gate_failures(report, max_clipped) -> list[dict]:
    return [] if max_clipped is None else report.over(max_clipped)


@click.command("drift")
@click.argument("artifact", type=click.Path(path_type=str))
@click.option("--data", required=True,
              help="Traffic to check: .txt, .jsonl, .parquet, a save_to_disk folder, or "
                   "hf:NAME[:CONFIG] (as mpq quantize --calib).")
@sample_options(8, seq_len_help="Tokens of each prompt (prefill).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--decode-tokens", default=16, show_default=True, type=click.IntRange(min=0),
              help="Greedy tokens generated after each prompt with the KV cache (decode "
                   "figures); 0: prefill only.")
@click.option("--source", default=None, type=click.Path(path_type=str),
              help="Float model for KL(float ‖ quantized) (default: the source recorded in the "
                   "artifact, when that folder exists).")
@click.option("--max-clipped", default=None, type=click.FloatRange(min=0), metavar="PCT",
              help="Gate: exit 10 when any static scale clips more than PCT percent of the "
                   "values it sees, in prefill or decode.")
@click.option("--recalibrate", "recalibrate_out", default=None, type=click.Path(path_type=str),
              metavar="OUT", help="Also write a new artifact at OUT whose static scales are "
                                  "recomputed to cover this traffic as well as the original "
                                  "calibration (the pipeline's rule; weights untouched).  The "
                                  "gate still judges ARTIFACT.")
@click.option("--force", is_flag=True, help="With --recalibrate: replace an existing OUT.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(min=1),
              help="Scales shown in the table (--json lists all).")
@json_option
def command(artifact, data, num_samples, seq_len, seed, decode_tokens, source, max_clipped,
            recalibrate_out, force, top, as_json):
    """Run the quantized ARTIFACT on new traffic and report, per static scale (static input
    activation scales, calibrated KV-cache k/v scales), the share of values it clips and the
    FP16 overflows, separately for prefill (the prompt) and decode (tokens generated with the
    KV cache), plus KL(float ‖ quantized) when the float model is at hand.

    Exit codes: 0 ok; 10 a static scale clips more than --max-clipped percent; 7 the artifact
    has no static scale (or is unreadable); 5 bad traffic data; 6 OUT exists (without --force).
    """
    import torch

    from mpq.analysis.drift import measure
    from mpq.analysis.static_scales import planned_static_scales
    from mpq.calibration import CalibrationOptions, build_calibration_set
    from mpq.checkpoint.native import check_output_apart, check_output_free, open_artifact
    from mpq.cli.eval_cmd import check_same_vocabulary
    from mpq.errors import EvalGateError
    from mpq.loader import load
    from mpq.models.source import load_tokenizer

    opened = open_artifact(artifact)
    inputs, kv = planned_static_scales(opened.plan)
    if not inputs and not kv:
        raise no_static_scale_error(artifact, opened.plan)
    if recalibrate_out is not None:  # before any work
        check_output_free(Path(recalibrate_out), force)
        check_output_apart(Path(recalibrate_out), [Path(artifact), Path(data)])
    tokenizer = load_tokenizer(artifact)
    traffic = build_calibration_set(CalibrationOptions(source=data, num_samples=num_samples,
                                                       seq_len=seq_len, seed=seed), tokenizer)
    model = load(artifact, dequantize=True)  # the same outputs as packed layers, faster
    reference, source_path, kl_note = reference_model(opened, source)
    if reference is not None:
        check_same_vocabulary(model, artifact, reference, source_path)
    report = measure(model, traffic.samples, decode_tokens=decode_tokens, reference=reference)
    failures = gate_failures(report, max_clipped)
    result = {"artifact": artifact, "data": data, "traffic": dict(traffic.provenance),
              "decode_tokens": decode_tokens, "source": source_path if reference else None,
              "kl_note": kl_note, "max_clipped_pct": max_clipped, **report.to_dict(),
              "gate_failed": failures, "recalibration": None}
    if recalibrate_out is not None:
        from mpq.analysis.recalibrate import recalibrate

        del model, reference
        samples = [torch.cat([ids.reshape(-1), generated])
                   for ids, generated in zip(traffic.samples, report.continuations)]
        result["recalibration"] = recalibrate(artifact, recalibrate_out, samples,
                                              traffic=dict(traffic.provenance),
                                              decode_tokens=decode_tokens, force=force)
    if as_json:
        emit_json(result)
    else:
        from mpq.cli.drift_view import print_result

        print_result(result, stdout_console(), top)
    if failures:
        worst = max(failures, key=lambda f: f["clipped_pct"])
        raise EvalGateError(f"drift gate failed: {len(failures)} static scale/phase pair(s) clip "
                            f"more than {max_clipped}% of their values; worst {worst['tensor']} "
                            f"({worst['phase']}) {worst['clipped_pct']:.3f}%",
                            hint="recalibrate the static scales on representative traffic "
                                 "(mpq drift --recalibrate OUT), or use dynamic activation "
                                 "scales")

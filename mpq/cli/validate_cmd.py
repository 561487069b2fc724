"""``mpq validate MODEL_OR_ARTIFACT --calib FILE``: activation ranges against a precision policy."""
from __future__ import annotations

import click

from mpq.cli.console import emit_json, stdout_console
from mpq.cli.options import json_option, sample_options

_STYLE = {"ok": "green", "warning": "yellow", "unsafe": "bold red"}


def _num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}"


def print_report(report, console) -> None:
    from rich.table import Table

    console.print(f"{report.model} ({report.source_kind}, checkpoint dtype "
                  f"{report.model_dtype or 'unknown'}); ranges measured in fp32 over "
                  f"{report.calibration.get('num_samples')} × {report.calibration.get('seq_len')} "
                  f"tokens of {report.calibration.get('source')}")
    console.print("policy (" + report.policy_source + "): "
                  + ", ".join(f"{k}={v}" for k, v in report.policy.items()))
    table = Table(title="activation ranges per op kind")
    for column in ("op kind", "ops", "worst op", "absmax", "min nonzero", "FP16 overflow?",
                   "FP16 underflow %", "policy dtype", "verdict"):
        table.add_column(column, justify="right" if column in ("ops", "absmax", "min nonzero",
                                                               "FP16 underflow %") else "left")
    for row in report.kinds():
        overflow = (f"yes ({row['fp16_overflow_ops']} of {row['ops']})" if row["fp16_overflow_ops"]
                    else "no")
        verdict = row["verdict"]
        table.add_row(row["kind"], str(row["ops"]), row["worst_op"], _num(row["absmax"]),
                      _num(row["min_nonzero"]), overflow,
                      f"{100 * row['fp16_underflow_max_fraction']:.2f}",
                      f"{row['part']}={row['dtype']}",
                      f"[{_STYLE[verdict]}]{verdict}[/{_STYLE[verdict]}]")
    console.print(table)
    console.print("FP16 underflow % = the largest share, over the kind's ops, of nonzero values "
                  "below 2^-14 (warning above 1%)")
    offenders = report.offenders()
    if offenders:
        console.print("top offending ops:")
        for op in offenders:
            style = _STYLE[op.verdict]
            console.print(f"  [{style}]{op.verdict:<7}[/{style}] {op.name} ({op.kind}, "
                          f"absmax {op.stats.absmax:.4g}): {'; '.join(op.issues)}")
    for note in report.notes():
        console.print(f"note: {note}")
    style = _STYLE[report.verdict]
    console.print(f"verdict: [{style}]{report.verdict}[/{style}]")


@click.command("validate")
@click.argument("model", type=click.Path(path_type=str))
@click.option("--calib", default=None,
              help="Calibration data to run through the model (required; same sources as "
                   "mpq quantize --calib).")
@sample_options(8)
@click.option("--recipe", default=None,
              help="Check this recipe's precision_policy (default: the artifact's recorded "
                   "policy, or the default policy for a model folder).")
@click.option("--policy", "overrides", multiple=True, metavar="PART=DTYPE",
              help="Override a policy part (norms, softmax, residual, rope, activations, "
                   "kv_cache, or all), e.g. --policy residual=fp16. Repeatable.")
@json_option
def command(model, calib, num_samples, seq_len, recipe, overrides, as_json):
    """Record activation ranges of MODEL (an mpq artifact or a model folder) on calibration
    data and check them against a precision policy: exit 13 when a part's dtype overflows.

    Warnings (exit 0): FP16 would overflow (|x| > 65504) where the policy is wider, or more
    than 1% of an op's nonzero values lie below FP16's smallest normal (2^-14).
    """
    from mpq.analysis.validate import validate

    report = validate(model, calib=calib, num_samples=num_samples, seq_len=seq_len,
                      recipe=recipe, overrides=overrides)
    if as_json:
        emit_json(report.to_dict())
    else:
        print_report(report, stdout_console())
    error = report.error()
    if error is not None:
        raise error

"""``mpq convert SRC -o DST --format X``: rewrite a native artifact in another format."""
from __future__ import annotations

import click

from mpq.cli.console import emit_json, human_bytes, size_line, stderr_console, stdout_console
from mpq.cli.options import json_option, serving_target_option


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Folder to create (written atomically).")
@click.option("--format", "output_format", required=True,
              help="Target format: compressed-tensors, gptq, gguf or mpq (`mpq list` shows them).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--strict", is_flag=True,
              help="Refuse (exit 9) when layers fail the target's runtime pre-flight checks.")
@click.option("--no-verify", "no_verify", is_flag=True,
              help="Skip checking SRC's files against their recorded sha256 and for "
                   "unrecorded files (done by default before reading).")
@serving_target_option
@json_option
def command(src, output, output_format, force, strict, no_verify, serving_target, as_json):
    """Rewrite the native artifact SRC as OUTPUT in another format, without re-quantizing.

    Exits 9 when the target cannot express some layers, or the serving --target (default: the
    one the artifact's plan records) cannot run them (the message names them and why), 7 when
    SRC's files do not match what it recorded (a changed artifact; --no-verify skips the check).
    """
    from mpq.checkpoint.convert import convert

    result = convert(src, output, output_format, force=force, strict=strict,
                     verify=not no_verify, serving_target=serving_target)
    if as_json:
        emit_json({"event": "result", **result.to_dict()})
        return
    for warning in result.warnings:
        stderr_console().print(f"[yellow]warning:[/yellow] {output_format} pre-flight: {warning}")
    stdout_console().print(f"wrote {result.out_dir} ({output_format}): tensors "
                           f"{human_bytes(result.sizes['stored_bytes'])}, "
                           f"{size_line(result.sizes)}")

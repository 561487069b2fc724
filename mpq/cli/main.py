"""The ``mpq`` command: a click group whose commands live in one module each.

Errors: every :class:`MpqError` is printed as one line on stderr and mapped to its exit code
(see ``mpq.errors.EXIT_CODES``); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import logging
import sys

import click

from mpq import __version__
from mpq.errors import MpqError


class MpqGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MpqError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=MpqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpq")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """mpq: post-training quantization for Hugging Face causal LMs.

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 recipe, 4 model, 5 calibration data,
    6 output path, 7 artifact, 8 scheme, 9 output format cannot express
    the plan (or --strict pre-flight failed), 10 eval or drift gate failed, 11 would not fit in memory,
    12 work directory of another run, 13 precision policy unsafe (validate),
    130/143 interrupted by SIGINT/SIGTERM (rerun resumes).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _quiet_transformers(verbose)


def _quiet_transformers(verbose: int) -> None:
    """transformers' own progress bars and notices would interleave with ours on stderr."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if verbose < 2:
        hf_logging.set_verbosity_error()


def _register_commands() -> None:
    from mpq.cli import (convert_cmd, eval_cmd, inspect_cmd, list_cmd, plan_cmd,
                         quantize_cmd, verify_cmd)

    for module in (quantize_cmd, convert_cmd, plan_cmd, inspect_cmd, verify_cmd, eval_cmd,
                   list_cmd):
        cli.add_command(module.command)
    from mpq.cli import validate_cmd

    cli.add_command(validate_cmd.command)
    from mpq.cli import bench_cmd

    cli.add_command(bench_cmd.command)
    from mpq.cli import sensitivity_cmd

    cli.add_command(sensitivity_cmd.command)
    from mpq.cli import drift_cmd

    cli.add_command(drift_cmd.command)


_register_commands()


def main() -> None:
    cli(obj={})

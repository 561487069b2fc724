"""``mpq bench MODEL_OR_ARTIFACT``: decode and prefill speed, time to first token and peak
memory of a model, an mpq artifact or a GGUF file, beside float and int8 baselines."""
from __future__ import annotations

import click

from mpq.cli.console import emit_json, stderr_console, stdout_console
from mpq.cli.options import json_option


@click.command("bench")
@click.argument("target", metavar="MODEL_OR_ARTIFACT", type=click.Path(path_type=str))
@click.option("--baselines", default="fp32,bf16,int8", show_default=True,
              help="Baselines measured beside the target, from its float source: fp32, bf16 "
                   "(transformers) and int8 (int8 per-channel RTN on the int8pack kernel), "
                   "comma-separated, or none.")
@click.option("--source", type=click.Path(path_type=str), default=None,
              help="The float model the baselines come from (default: the artifact's recorded "
                   "source; a model folder is its own source).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto",
              show_default=True,
              help="Compute dtype of an artifact's unquantized tensors (embedding, norms, a "
                   "float head), as mpq.load's dtype: auto = the dtype the artifact records.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="Torch (and llama.cpp) threads of each measurement.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompt length for decode and time to first token.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True,
              help="Greedy tokens generated per decode measurement.")
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Length of the prompt of the prefill measurement.")
@click.option("--batch", "batch", default="1,8", show_default=True,
              help="Decode batch sizes, comma-separated.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Prefill and time to first token: best of this many runs.")
@json_option
def command(target, baselines, source, dtype, threads, prompt_tokens, new_tokens, prefill_tokens,
            batch, repeats, as_json):
    """Measure MODEL_OR_ARTIFACT (a model folder, an mpq artifact run on mpq.load's packed
    kernels, or a .gguf file through llama.cpp's binding) and its baselines, each in its own
    process: decode tokens/s per batch size, prefill tokens/s, time to first token, peak RSS
    and RSS after loading.  --json: one JSON row per model on stdout."""
    from mpq.bench import runner
    from mpq.bench.configs import (Settings, check_lengths, parse_baselines, parse_batches,
                                   plan)
    from mpq.bench.report import describe, markdown_table

    settings = Settings(threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                        prefill_tokens=prefill_tokens, batches=parse_batches(batch),
                        repeats=repeats)
    rows, found = plan(target, parse_baselines(baselines), source, dtype)
    check_lengths(rows, settings)
    console = stderr_console()
    results = runner.run(rows, settings, found, progress=lambda message: console.print(message))
    if as_json:
        for row in results:
            emit_json(row)
        return
    out = stdout_console()
    out.print(markdown_table(results, settings), soft_wrap=True)
    out.print(describe(settings), soft_wrap=True)

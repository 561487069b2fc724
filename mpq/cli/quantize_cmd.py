"""``mpq quantize MODEL --recipe R -o OUT``."""
from __future__ import annotations

from contextlib import nullcontext

import click

from mpq.cli.console import (JsonEvents, ProgressEvents, emit_json, human_bytes, size_line,
                              stdout_console)
from mpq.cli.calibration_view import summary_lines
from mpq.cli.coverage_view import coverage_line, tying_line
from mpq.cli.experts_view import routing_lines, transform_lines
from mpq.cli.options import (dtype_option, json_option, max_unquantized_option, sample_options,
                             serving_target_option, torch_dtype)


@click.command("quantize")
@click.argument("model", type=click.Path(path_type=str))
@click.option("-r", "--recipe", required=True, help="Recipe YAML file or preset name (mpq list).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Artifact folder to create (written atomically).")
@click.option("--calib", help="Calibration data: .txt, .jsonl, .parquet, a save_to_disk folder, "
                              "or hf:NAME[:CONFIG] for datasets.load_dataset.")
@sample_options(128)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--calib-mode", type=click.Choice(["concat", "document"]), default="concat",
              show_default=True, help="Concatenate-and-chunk, or one sample per document.")
@click.option("--calib-field", default="text", show_default=True,
              help="Text field of jsonl/parquet/dataset rows.")
@click.option("--calib-split", default=None, help="Dataset split (default: train).")
@click.option("--calib-batch-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
              help="Calibration samples run through a block together, up to this many tokens "
                   "per batch (memory of one batch's activations vs. speed).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--device", default="cpu", show_default=True,
              help="Where each block is quantized (cpu, cuda, cuda:N); the model stays on CPU.")
@click.option("--offload-activations", is_flag=True,
              help="With --device cuda: keep the calibration activations in host memory and "
                   "move each batch to the GPU only while a block runs on it (less GPU "
                   "memory, more transfers; same bytes). No effect on cpu.")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Inside a block, quantize layers in execution order, each seeing inputs from "
                   "already-quantized predecessors.")
@click.option("--format", "output_format", default="mpq", show_default=True,
              help="Output format: mpq (native), compressed-tensors (vLLM, transformers), "
                   "gptq (GPTQ v1) or gguf (llama.cpp: OUT/model.gguf); `mpq list` shows them. "
                   "Checked before quantizing.")
@click.option("--strict", is_flag=True,
              help="Refuse (exit 9) instead of warning when layers fail the format's runtime "
                   "pre-flight checks (e.g. vLLM's fast int kernels), and (exit 3) when more "
                   "than half of the weight bytes would stay unquantized (unless "
                   "--max-unquantized sets the share).")
@max_unquantized_option
@serving_target_option
@click.option("--resume/--no-resume", default=None,
              help="Each finished block is kept in OUTPUT.mpq-work until the artifact is "
                   "written; a rerun continues from it when its inputs match (the default). "
                   "--resume: fail if there is nothing to resume; --no-resume: discard it and "
                   "start over.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan, the expected artifact size, the estimated peak memory and "
                   "time, without reading weights or writing anything; exit 11 if it would not "
                   "fit in the available memory.")
@click.option("--memory-check/--no-memory-check", default=True, show_default=True,
              help="Refuse (exit 11) before loading the model when the estimated peak memory "
                   "(see --dry-run) exceeds the available memory.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Read each decoder block from the model's files when its turn comes and "
                   "write the artifact from the work directory (memory flat in depth); recipes "
                   "that need the whole model (rotation) load it whole anyway.  Same bytes "
                   "either way.")
@click.option("--target-bits", type=float, default=None,
              help="Automatic mixed precision: choose one --candidates scheme per layer that "
                   "minimises the measured sensitivity within this average bits per weight "
                   "(over the layers RECIPE quantizes); RECIPE decides the other layers.")
@click.option("--target-size", default=None,
              help="Automatic mixed precision within this artifact size (e.g. 70MB, 66MiB).")
@click.option("--candidates", default=None,
              help="Candidates for --target-*: comma-separated presets, recipe files, intB / "
                   "intB-gG shorthands or ladder, as for mpq sensitivity [default: ladder, or "
                   "the table's].")
@click.option("--sensitivity", "sensitivity_path", type=click.Path(path_type=str), default=None,
              help="For --target-*: a table from `mpq sensitivity -o` instead of measuring.")
@click.option("--sensitivity-samples", default=16, show_default=True,
              type=click.IntRange(min=1),
              help="For --target-*: calibration samples (of --seq-len) for the Fisher.")
@click.option("--save-recipe", type=click.Path(path_type=str), default=None,
              help="For --target-*: also write the chosen per-layer recipe (YAML) here.")
@dtype_option
@json_option
def command(model, recipe, output, calib, num_samples, seq_len, seed, calib_mode, calib_field,
            calib_split, calib_batch_tokens, force, device, offload_activations, true_sequential,
            output_format, strict, max_unquantized, serving_target, resume, dry_run,
            memory_check, stream, target_bits, target_size, candidates, sensitivity_path,
            sensitivity_samples, save_recipe, dtype, as_json):
    """Quantize MODEL (a local Hugging Face folder) with RECIPE into OUTPUT."""
    from mpq.calibration import CalibrationOptions
    from mpq.engine.lifecycle import no_events
    from mpq.engine.spec import RunOptions
    from mpq.quantize import quantize

    calibration = CalibrationOptions(source=calib, num_samples=num_samples, seq_len=seq_len,
                                     seed=seed, mode=calib_mode, field=calib_field,
                                     split=calib_split, batch_tokens=calib_batch_tokens)
    options = RunOptions(calibration=calibration, output_format=output_format, device=device,
                         dtype=torch_dtype(dtype), true_sequential=true_sequential,
                         strict=strict, stream=stream, offload_activations=offload_activations,
                         max_unquantized=max_unquantized, serving_target=serving_target)
    if target_bits is not None or target_size is not None:
        from mpq.cli.mixed_view import choose_recipe

        recipe = choose_recipe(model, recipe, calibration, target_bits=target_bits,
                               target_size=target_size, candidates=candidates,
                               sensitivity=sensitivity_path, samples=sensitivity_samples,
                               output_format=output_format, save_recipe=save_recipe,
                               dry_run=dry_run, as_json=as_json, serving=serving_target)
    elif any(v is not None for v in (candidates, sensitivity_path, save_recipe)):
        raise click.UsageError("--candidates, --sensitivity and --save-recipe go with "
                               "--target-bits or --target-size")
    if dry_run:
        from mpq.cli.estimate_view import dry_run as run_dry

        return run_dry(model, recipe, options, output=output, force=force, as_json=as_json)
    from mpq.engine.distributed import process_group

    with process_group() as ranks:  # under torchrun, only rank 0 reports
        reporter = (no_events if ranks is not None and not ranks.writer else
                    JsonEvents() if as_json else ProgressEvents())
        with reporter if isinstance(reporter, ProgressEvents) else nullcontext():
            result = quantize(model, recipe, output, options, force=force,
                              resume={None: "auto", True: "require", False: "fresh"}[resume],
                              check_memory=memory_check, events=reporter)
    if not result.written:  # another process of a torchrun run writes and reports
        return
    if as_json:
        emit_json({"event": "result", **result.to_dict()})
        return
    sizes = result.sizes
    console = stdout_console()
    console.print(f"wrote {result.out_dir} ({result.output_format}) in {result.seconds:.1f} s: "
                  f"{len(result.plan.quantized())} layers quantized, tensors "
                  f"{human_bytes(sizes['stored_bytes'])} (ideal {human_bytes(sizes['ideal_bytes'])})")
    console.print(f"size: {size_line(sizes)}")
    if result.coverage is not None:
        console.print(coverage_line(result.coverage))
    if result.calibration_coverage:
        for line in summary_lines(result.calibration_coverage):
            console.print(line)
    for line in routing_lines(result.plan, result.log) + transform_lines(result.plan):
        console.print(line)  # fused MoE experts: routed tokens, fallbacks, no smoothing
    tying = (result.coverage or {}).get("tying")
    if tying is not None:
        console.print(f"note: {tying_line(tying)}")
    elif result.untied_head:
        console.print("note: the output head was untied from the input embedding to quantize it")

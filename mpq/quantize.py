"""``quantize``: model folder + recipe + calibration → artifact (the library entry point).

The order is fixed so that bad input fails before any heavy work: the output path, then the
whole run spec (mpq.engine.spec.resolve_run: device, recipe, format, model, plan), the memory
estimate of that same spec, the calibration data; then the engine and the writer.
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mpq.analysis.estimate import check_memory_budget
from mpq.calibration import CalibrationSet, build_calibration_set
from mpq.calibration.coverage import expert_routing, take_activation_records, with_run_records
from mpq.checkpoint.native import check_output_apart, check_output_free, output_lock
from mpq.checkpoint.state import state_from_model
from mpq.checkpoint.writers import write_state
from mpq.config.plan import Plan
from mpq.config.run_log import RunLog
from mpq.engine.distributed import init_from_env
from mpq.engine.interrupt import stop_at_safe_points
from mpq.engine.resume import Checkpoint, run_fingerprint, work_dir_for
from mpq.engine.block_transforms import TransformHook
from mpq.engine.interrupt import StopHook
from mpq.engine.float_stream import float_stream_hooks
from mpq.engine.kv_calibration import KVCalibrationHook
from mpq.engine.lifecycle import Events, RunState, no_events
from mpq.engine.resume import ResumeHook
from mpq.engine.runner import run_blocks
from mpq.engine.spec import RunOptions, RunSpec, resolve_run
from mpq.engine.streaming import BlockStreamer, streamed_state
from mpq.errors import ModelError
from mpq.memory import release_free_memory
from mpq.models.discovery import architecture_report
from mpq.models.layout import untie_head
from mpq.models.source import (check_tokenizer, check_unchanged, file_stamps, fingerprint,
                               load_model, load_tokenizer, side_files)
from mpq.rotation.quarot import apply_quarot

@dataclass
class QuantizeResult:
    out_dir: Path
    plan: Plan
    log: RunLog  # what the run produced: per-layer results, transform records, rotations
    sizes: dict
    calibration: dict | None
    seconds: float
    untied_head: bool = False
    output_format: str = "mpq"
    warnings: list[str] = field(default_factory=list)
    written: bool = True  # False on the processes other than rank 0 of a torchrun run
    coverage: dict | None = None  # mpq.models.coverage.CoverageAccount.summary()
    calibration_coverage: dict | None = None  # mpq.calibration.coverage (with --calib)

    def to_dict(self) -> dict:
        coverage = self.coverage or {}
        return {"output": str(self.out_dir), "recipe": self.plan.recipe_name,
                "quantized_layers": len(self.plan.quantized()), "sizes": self.sizes,
                "calibration": self.calibration, "seconds": round(self.seconds, 3),
                "untied_head": self.untied_head, "format": self.output_format,
                "warnings": self.warnings,
                "unquantized_share": coverage.get("unquantized_share"),
                "coverage": self.coverage, "calibration_coverage": self.calibration_coverage}


def open_model(spec: RunSpec) -> tuple[nn.Module, BlockStreamer | None]:
    """The model to quantize: the spec's meta skeleton with its tensors outside the blocks
    loaded and a BlockStreamer for the blocks when the run streams (mpq.engine.streaming);
    else the whole model (mpq.models.source.load_model) and None."""
    if spec.streams:
        streamer = BlockStreamer(spec.source_dir, spec.skeleton, spec.layout, spec.weight_map)
        streamer.load_resident()
        return spec.skeleton, streamer
    return load_model(spec.source_dir, dtype=spec.options.dtype), None


def calibration_set(spec: RunSpec) -> CalibrationSet | None:
    """The tokenized, hashed calibration samples of ``spec`` (None without ``--calib``)."""
    options = spec.calibration
    if options.source is None:
        return None
    calib = build_calibration_set(options, load_tokenizer(spec.source_dir))
    release_free_memory()  # the tokenizer and the text are gone
    return calib


def calibration_coverage(calib: CalibrationSet | None, plan: Plan, log: RunLog) -> dict | None:
    """The calibration coverage report of a run (mpq.calibration.coverage): the samples' own
    figures, the input outlier statistics the run's calibration passes left in ``log`` (taken
    out of it: the plan record does not carry them) and the routed tokens of fused experts.
    None without calibration data."""
    if calib is None or not calib.coverage:
        return None
    activations = take_activation_records(log.layers)
    experts = expert_routing(log.layers, [l.name for l in plan.quantized() if l.expert is not None])
    return with_run_records(calib.coverage, activations, experts)


def quantize(model_path: str | Path, recipe, out_dir: str | Path,
             options: RunOptions = RunOptions(), *, force: bool = False, resume: str = "auto",
             check_memory: bool = True, events: Events = no_events) -> QuantizeResult:
    """Quantize the model folder ``model_path`` with ``recipe`` (a Recipe, preset name or YAML
    path) into the artifact ``out_dir``, run as ``options`` say (mpq.engine.spec.RunOptions:
    calibration, output format, device, dtype, streaming, ...); the output format's pre-flight
    warnings are returned (``options.strict``: refused before quantizing).  The share of the
    weight bytes the plan leaves unquantized goes out as a ``coverage`` event and into the
    result (``options.max_unquantized`` / ``strict``: refused above a limit, before any weight
    is read).

    Each finished block is saved in the work directory ``<out_dir>.mpq-work`` (mpq.engine.resume),
    removed once the artifact is written.  ``resume``: ``auto`` continues a matching work
    directory and refuses a mismatching one (ResumeError), ``require`` also refuses when there
    is none, ``fresh`` discards it.  SIGINT/SIGTERM stop the run after the current block
    (mpq.errors.Interrupted); rerunning resumes it.  ``check_memory``: refuse (ResourceError)
    before loading the model when the estimated peak memory (mpq.analysis.estimate) exceeds
    what is available.  Streamed or not, the artifact's bytes are the same.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    ranks = init_from_env()  # under torchrun: one of several processes (mpq.engine.distributed)
    if ranks is not None and not ranks.writer:
        events = no_events
    check_output_free(out_dir, force)
    spec = resolve_run(model_path, recipe, options)
    events("coverage", **spec.coverage.summary())  # what stays unquantized, and why
    check_output_apart(out_dir, spec.inputs)
    stamps = file_stamps(spec.source_dir)  # before any weight is read
    if spec.device.type == "cuda" and ranks is not None:
        torch.cuda.set_device(spec.device)
    if check_memory:
        check_memory_budget(spec)
    spec.require_calibration()
    if spec.calibration.source is None:  # else calibration loads it
        check_tokenizer(spec.source_dir)
    model, streamer = open_model(spec)
    plan, layout, recipe = spec.plan, spec.layout, spec.recipe
    for warning in spec.warnings:
        events("warning", message=f"{spec.writer.name} pre-flight: {warning}")
    architecture = architecture_report(spec.skeleton, layout, plan)
    if architecture.family is None:  # quantized on generic discovery: say so
        events("warning", message=architecture.headline() + " (mpq plan lists every part)")
    side, outside = side_files(spec.source_dir)
    for name in outside:
        events("warning", message=f"{name} is a link leading outside the model folder: not "
                                  "copied into the artifact")
    calib = calibration_set(spec)
    if calib is not None:
        events("calibration", **calib.provenance)
    provenance = calib.provenance if calib else None
    source = fingerprint(spec.source_dir)
    pipeline_options = {"true_sequential": options.true_sequential,
                        "batch_tokens": options.calibration.batch_tokens}
    # storage_dtype only changes how the artifact is written: a rerun that changes it (e.g.
    # after an fp16 overflow refusal) resumes the finished blocks
    recipe_print = {k: v for k, v in recipe.to_dict().items() if k != "storage_dtype"}
    run_print = run_fingerprint(
        model_sha256=source["sha256"], recipe=recipe_print,
        calibration_sha256=provenance["sha256"] if provenance else None,
        options={**pipeline_options, "dtype": str(model.dtype), "device": spec.device.type})
    with ExitStack() as held:
        if ranks is None or ranks.writer:  # one run at a time writes OUT
            held.enter_context(output_lock(out_dir))
            checkpoint = Checkpoint.open(out_dir, run_print, mode=resume)
        if ranks is not None:  # the others read rank 0's work directory once it is ready
            ranks.barrier()
            if not ranks.writer:
                checkpoint = Checkpoint(work_dir_for(out_dir), run_print)
        log = RunLog.for_plan(plan)
        if recipe.rotation is not None:  # before any statistic is taken
            log.rotation = apply_quarot(model, layout, recipe.rotation)
            release_free_memory()
        head = plan.get(layout.head_name) if layout.head_name else None
        if plan.tying is not None:  # a tied pair the plan quantizes (mpq.config.tying)
            untied = not plan.tying.shared and untie_head(model)
        else:
            untied = head is not None and head.scheme is not None and untie_head(model)
        run = RunState(model=model, layout=layout, plan=plan, log=log, needs=spec.needs,
                       device=spec.device, events=events, ranks=ranks,
                       true_sequential=options.true_sequential,
                       offload_activations=options.offload_activations, keep_dequantized=False,
                       streamed=streamer is not None)
        with stop_at_safe_points() as stop:
            float_before, float_after = float_stream_hooks(run.needs)
            hooks = [StopHook(stop, run.layout.num_blocks), *([streamer] if streamer else []),
                     *float_before, ResumeHook(checkpoint, ranks), TransformHook(),
                     *float_after, KVCalibrationHook()]
            try:
                qweights = run_blocks(run, calib.samples if calib else None,
                                      batch_tokens=options.calibration.batch_tokens, hooks=hooks)
            except ModelError:  # a damaged block of the source: its work directory is of no use
                if streamer is not None and run.writer:
                    checkpoint.remove()
                raise
        try:
            check_unchanged(spec.source_dir, stamps)
        except ModelError:  # its saved blocks may come from either version of the model
            if run.writer:
                checkpoint.remove()
            raise
        calib_coverage = calibration_coverage(calib, plan, log)
        state_args = dict(provenance={
            "recipe": {**recipe.to_dict(), "source": recipe.source, "text": recipe.text},
            "calibration": provenance, "source": source, "pipeline": pipeline_options,
            **({"calibration_coverage": calib_coverage} if calib_coverage else {})},
            files=side)
        result = QuantizeResult(out_dir=out_dir, plan=plan, log=log, sizes={},
                                calibration=provenance, seconds=0.0, untied_head=untied,
                                output_format=spec.writer.name, warnings=list(spec.warnings),
                                coverage=spec.coverage.summary(),
                                calibration_coverage=calib_coverage)
        if ranks is not None and not ranks.writer:  # rank 0 writes the artifact
            result.written = False
        else:
            if streamer is not None:  # the blocks' tensors are read back from the work directory
                state = streamed_state(model, layout, plan, log, checkpoint, qweights, **state_args)
            else:
                state = state_from_model(model, plan, log, qweights, **state_args)
            result.sizes = write_state(state, out_dir, spec.writer, force=force)
            checkpoint.remove()
    result.seconds = time.perf_counter() - started
    return result

"""``quantize``: model folder + recipe + calibration → native artifact (the library entry point).

The order is fixed so that bad input fails before any heavy work: output path, recipe, model
path, plan resolution (shapes checked), calibration data; then the pipeline and the writer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import mpq.quantizers  # noqa: F401  (registers the built-in quantizers and number formats)
from mpq.models.layout import ModelLayout, blocks_of, describe_layers, layout_of
from mpq.calibration import build_calibration_set
from mpq.errors import FormatError, ModelError, RecipeError, SchemeError, did_you_mean
import mpq.checkpoint  # noqa: F401  (registers the writers)
from mpq.checkpoint.native import check_output_free
from mpq.checkpoint.state import state_from_model
from mpq.checkpoint.writers import check_expressible, write_state, writer_for
from mpq.models.attention import attention_modules
from mpq.rotation.quarot import apply_quarot, rotation_specs
from mpq.rotation.quarot import check_supported as check_rotation_supported
from mpq.analysis.estimate import check_memory_budget
from mpq.engine.interrupt import stop_at_safe_points
from mpq.memory import release_free_memory
from mpq.models.source import PASS_THROUGH, check_model_dir, fingerprint, load_model, load_tokenizer
from mpq.engine.runner import (Events, needed_stats, no_events, require_calibration, run_pipeline,
                          untie_head_if_quantized)
from mpq.config.plan import Plan, resolve
from mpq.quantizers.base import QUANTIZERS
from mpq.config.recipe import Recipe, load_recipe
from mpq.engine.distributed import init_from_env, rank_device
from mpq.engine.resume import Checkpoint, run_fingerprint, work_dir_for
from mpq.transforms.scale_fold import scale_groups
from mpq.engine.streaming import BlockStreamer, build_streamed, streamed_state, streaming_blocker
from mpq.transforms.base import TRANSFORMS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    source: str | None = None
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    mode: str = "concat"
    field: str = "text"
    split: str | None = None
    batch_tokens: int = 2048  # samples per forward = max(1, batch_tokens // seq_len)


@dataclass
class QuantizeResult:
    out_dir: Path
    plan: Plan
    sizes: dict
    calibration: dict | None
    seconds: float
    untied_head: bool = False
    output_format: str = "mpq"
    warnings: list[str] = field(default_factory=list)
    written: bool = True  # False on the processes other than rank 0 of a torchrun run

    def to_dict(self) -> dict:
        return {"output": str(self.out_dir), "recipe": self.plan.recipe_name,
                "quantized_layers": len(self.plan.quantized()), "sizes": self.sizes,
                "calibration": self.calibration, "seconds": round(self.seconds, 3),
                "untied_head": self.untied_head, "format": self.output_format,
                "warnings": self.warnings}


def check_device(device: str) -> torch.device:
    """A usable torch device, or ModelError saying what is available."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device '{device}'", hint="use cpu, cuda or cuda:N") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' requested but CUDA is not available here",
                         hint="use --device cpu")
    return parsed


def as_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe, known_algorithms=list(QUANTIZERS))


def plan_model(model: nn.Module, recipe: Recipe) -> tuple[ModelLayout, Plan]:
    """Resolve ``recipe`` against the layers of ``model`` (weights may be on meta)."""
    layout = layout_of(model)
    layers, others = describe_layers(model, layout)
    plan = resolve(recipe, layers, others)
    for layer in plan.quantized():
        try:
            QUANTIZERS.get(layer.scheme.algorithm).check(layer.scheme)
        except SchemeError as exc:
            rule = f"rules[{layer.rule}]" if layer.rule is not None else "recipe"
            raise RecipeError(f"{recipe.source}: {rule} ({layer.name}): {exc.message}",
                              hint=exc.hint) from None
    for index, spec in enumerate(plan.transforms):
        where = f"{recipe.source}: transforms[{index}]"
        if spec["type"] not in TRANSFORMS:
            known = list(TRANSFORMS)
            raise RecipeError(f"{where}: unknown transform '{spec['type']}'",
                              hint=did_you_mean(spec["type"], known) or f"known: {', '.join(known)}")
        try:
            TRANSFORMS.get(spec["type"]).check(spec["options"])
        except SchemeError as exc:
            raise RecipeError(f"{where}: {exc.message}", hint=exc.hint) from None
    if plan.transforms:  # the architecture must be known to the scale folds (ModelError if not)
        scale_groups(model, blocks_of(model, layout)[0])
    if recipe.rotation is not None:
        check_rotation_supported(model)
        try:
            rotation_specs(model, recipe.rotation)
        except SchemeError as exc:
            raise RecipeError(f"{recipe.source}: rotation: {exc.message}", hint=exc.hint) from None
    if plan.kv_cache and not attention_modules(model, blocks_of(model, layout)[0]):
        raise ModelError(f"{recipe.source}: kv_cache: no attention module with k_proj/v_proj "
                         f"and a KV cache argument found in {type(model).__name__}'s blocks",
                         hint="remove kv_cache: this architecture's cache is not supported yet")
    return layout, plan


def preflight(plan: Plan, output_format: str, strict: bool) -> list[str]:
    """Check that ``output_format`` can store ``plan`` (FormatError if not) and return the
    runtime pre-flight warnings; with ``strict``, any warning is a FormatError."""
    writer = writer_for(output_format)
    check_expressible(writer, plan)
    warnings = writer.preflight(plan)
    if warnings and strict:
        shown = "; ".join(warnings[:6]) + (f"; … {len(warnings) - 6} more"
                                           if len(warnings) > 6 else "")
        raise FormatError(f"--strict: {len(warnings)} layer(s) fail the pre-flight checks of "
                          f"format '{output_format}': {shown}",
                          hint="change those layers' schemes, or drop --strict to write anyway")
    return warnings


def open_model(source_dir: Path, recipe: Recipe, *, dtype: str | torch.dtype = "auto",
               stream: bool = True) -> tuple[nn.Module, BlockStreamer | None]:
    """The model to quantize: a meta skeleton with its tensors outside the blocks loaded and a
    BlockStreamer for the blocks, when the run can stream (mpq.engine.streaming.streaming_blocker);
    else the whole model (mpq.models.source.load_model) and None."""
    if stream:
        skeleton, weight_map = build_streamed(source_dir, dtype)
        layout, plan = plan_model(skeleton, recipe)
        why = streaming_blocker(skeleton, weight_map, layout, plan, recipe, needed_stats(plan))
        if why is None:
            streamer = BlockStreamer(source_dir, skeleton, layout, weight_map)
            streamer.load_resident()
            return skeleton, streamer
        log.info("not streaming: %s", why)
        del skeleton
    return load_model(source_dir, dtype=dtype), None


def quantize(model_path: str | Path, recipe: str | Recipe, out_dir: str | Path, *,
             calibration: CalibrationOptions = CalibrationOptions(), force: bool = False,
             dtype: str | torch.dtype = "auto", true_sequential: bool = True,
             device: str = "cpu", output_format: str = "mpq", strict: bool = False,
             resume: str = "auto", check_memory: bool = True, stream: bool = True,
             offload_activations: bool = False, events: Events = no_events) -> QuantizeResult:
    """Quantize the model folder ``model_path`` with ``recipe`` into the artifact ``out_dir``,
    written as ``output_format`` (mpq.checkpoint.WRITERS); its pre-flight warnings are returned
    (``strict``: refused before quantizing).

    Each finished block is saved in the work directory ``<out_dir>.mpq-work`` (mpq.engine.resume),
    removed once the artifact is written.  ``resume``: ``auto`` continues a matching work
    directory and refuses a mismatching one (ResumeError), ``require`` also refuses when there
    is none, ``fresh`` discards it.  SIGINT/SIGTERM stop the run after the current block
    (mpq.errors.Interrupted); rerunning resumes it.  ``check_memory``: refuse (ResourceError)
    before loading the model when the estimated peak memory (mpq.analysis.estimate) exceeds what is
    available.  ``stream``: read each decoder block from the source files when its turn comes
    and write the artifact from the work directory (mpq.engine.streaming; peak memory flat in depth)
    where the recipe allows it, else (``rotation:``, statistics for a layer outside the blocks)
    load the whole model; the artifact's bytes are the same either way.
    ``offload_activations`` (for ``device`` cuda): keep the calibration activations in host
    memory, each batch visiting the device only while a block runs on it (same bytes).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    ranks = init_from_env()  # under torchrun: one of several processes (mpq.engine.distributed)
    if ranks is not None and not ranks.writer:
        events = no_events
    check_output_free(out_dir, force)
    device = check_device(device)
    if ranks is not None and device.type == "cuda":  # one GPU per process (NCCL needs it)
        device = rank_device(device)
        torch.cuda.set_device(device)
    recipe = as_recipe(recipe)
    writer_for(output_format)  # an unknown format fails before the model is read
    source_dir = check_model_dir(model_path)
    if check_memory:
        check_memory_budget(source_dir, recipe, calibration=calibration, device=device,
                            output_format=output_format, true_sequential=true_sequential,
                            dtype=dtype, strict=strict, stream=stream,
                            offload_activations=offload_activations)
    model, streamer = open_model(source_dir, recipe, dtype=dtype, stream=stream)
    layout, plan = plan_model(model, recipe)
    warnings = preflight(plan, output_format, strict)
    require_calibration(plan, calibration.source is not None)
    for warning in warnings:
        events("warning", message=f"{output_format} pre-flight: {warning}")
    calib = None
    if calibration.source is not None:
        calib = build_calibration_set(
            calibration.source, load_tokenizer(source_dir), num_samples=calibration.num_samples,
            seq_len=calibration.seq_len, seed=calibration.seed, mode=calibration.mode,
            field=calibration.field, split=calibration.split)
        release_free_memory()  # the tokenizer and the text are gone
        events("calibration", **calib.provenance)
    provenance = calib.provenance if calib else None
    source = fingerprint(source_dir)
    pipeline_options = {"true_sequential": true_sequential,
                        "batch_tokens": calibration.batch_tokens}
    run_print = run_fingerprint(
        model_sha256=source["sha256"], recipe=recipe.to_dict(),
        calibration_sha256=provenance["sha256"] if provenance else None,
        options={**pipeline_options, "dtype": str(model.dtype), "device": device.type})
    if ranks is None or ranks.writer:
        checkpoint = Checkpoint.open(out_dir, run_print, mode=resume)
    if ranks is not None:  # the others read rank 0's work directory once it is ready
        ranks.barrier()
        if not ranks.writer:
            checkpoint = Checkpoint(work_dir_for(out_dir), run_print)
    if recipe.rotation is not None:  # before any statistic is taken
        plan.rotation = apply_quarot(model, layout, recipe.rotation)
        release_free_memory()
    untied = untie_head_if_quantized(model, layout, plan)
    with stop_at_safe_points() as stop:
        try:
            qweights = run_pipeline(model, layout, plan, calib.samples if calib else None,
                                    true_sequential=true_sequential, device=device,
                                    events=events, batch_tokens=calibration.batch_tokens,
                                    keep_dequantized=False, checkpoint=checkpoint, stop=stop,
                                    streamer=streamer, offload_activations=offload_activations)
        except ModelError:  # a damaged block of the source: its work directory is of no use
            if streamer is not None and (ranks is None or ranks.writer):
                checkpoint.remove()
            raise
    state_args = dict(provenance={
        "recipe": {**recipe.to_dict(), "source": recipe.source, "text": recipe.text},
        "calibration": provenance, "source": source, "pipeline": pipeline_options},
        files={name: source_dir / name for name in PASS_THROUGH
               if (source_dir / name).is_file()})
    if ranks is not None and not ranks.writer:  # rank 0 writes the artifact
        return QuantizeResult(out_dir=out_dir, plan=plan, sizes={}, calibration=provenance,
                              seconds=time.perf_counter() - started, untied_head=untied,
                              output_format=output_format, warnings=warnings, written=False)
    if streamer is not None:  # the blocks' tensors are read back from the work directory
        state = streamed_state(model, layout, plan, checkpoint, qweights, **state_args)
    else:
        state = state_from_model(model, plan, qweights, **state_args)
    sizes = write_state(state, out_dir, output_format, force=force)
    checkpoint.remove()
    return QuantizeResult(out_dir=out_dir, plan=plan, sizes=sizes, calibration=provenance,
                          seconds=time.perf_counter() - started, untied_head=untied,
                          output_format=output_format, warnings=warnings)

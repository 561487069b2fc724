"""The validated run spec: recipe + model + options, resolved once before any weight is read.

:func:`resolve_run` is the one place that checks and resolves a run: the device, the recipe
(strict YAML, known algorithms), the output format, the model folder and its meta skeleton, the
per-layer plan (shapes, each quantizer's and transform's options, rotation and KV-cache support),
what the output format can express and its pre-flight warnings, the statistics each layer needs
and whether the run can stream.  ``mpq quantize`` runs the :class:`RunSpec` it returns, and
``--dry-run`` (mpq.analysis.estimate) models the same spec, so the two cannot disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from mpq.calibration import CalibrationOptions
from mpq.checkpoint.storage import resolve_storage_dtype
from mpq.checkpoint.writers import Writer, preflight, writer_for
from mpq.checkpoint.serving import DEFAULT_TARGET, check_target, serving_target
from mpq.config.plan import Plan, resolve
from mpq.config.recipe import Recipe, load_recipe
from mpq.engine.block_tuning import check_plan as check_tuned_layers
from mpq.engine.distributed import current as current_ranks
from mpq.engine.distributed import check_supported as check_distributed_support
from mpq.engine.distributed import rank_device
from mpq.engine.float_stream import check_paired
from mpq.engine.lifecycle import calibration_pass_needed
from mpq.engine.streaming import build_streamed, streaming_blocker
from mpq.errors import CalibrationError, ModelError, RecipeError, SchemeError, did_you_mean
from mpq.models.attention import attention_modules, kv_geometry
from mpq.models.coverage import STRICT_DEFAULT, CoverageAccount, account
from mpq.models.experts import routers
from mpq.models.families import family_of
from mpq.models.layout import ModelLayout, blocks_of, describe_layers, layout_of, tied_pair
from mpq.models.source import (check_float_source, check_model_dir, max_positions, read_config,
                               side_files)
from mpq.models.stored_tensors import check_stored_tensors
from mpq.numerics.gguf_iq4nl import IQ4_NL
from mpq.numerics.gguf_kquants import GGUF_KQUANTS
from mpq.numerics.gguf_legacy import GGUF_LEGACY
from mpq.quantizers.base import QUANTIZERS, scheme_needs, scheme_wants
from mpq.rotation.quarot import check_supported as check_rotation_supported
from mpq.rotation.quarot import rotation_specs
from mpq.transforms.base import TRANSFORMS
from mpq.transforms.scale_fold import scale_groups


@dataclass(frozen=True)
class RunOptions:
    """How to run, besides the model and the recipe (``mpq quantize``'s options).

    ``stream``: read each decoder block from the source files when its turn comes, where the
    recipe allows it (mpq.engine.streaming); ``offload_activations`` (with ``device`` cuda):
    keep the calibration activations in host memory.  ``max_unquantized``: refuse
    (RecipeError) a plan that leaves more than this share of the weight bytes unquantized
    (mpq.models.coverage); ``strict`` also refuses the output format's pre-flight warnings
    and, without ``max_unquantized``, a share above ``STRICT_DEFAULT``.  ``serving_target``:
    the engine the plan must suit (mpq.checkpoint.serving; None: any), recorded in the plan.
    """

    calibration: CalibrationOptions = CalibrationOptions()
    output_format: str = "mpq"
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype = "auto"
    true_sequential: bool = True
    strict: bool = False
    stream: bool = True
    offload_activations: bool = False
    max_unquantized: float | None = None
    serving_target: str | None = None

    def unquantized_limit(self) -> tuple[float | None, str]:
        """The share of weight bytes allowed to stay unquantized (None: no limit), and the
        option that set it."""
        if self.max_unquantized is not None:
            return self.max_unquantized, f"--max-unquantized {self.max_unquantized:g}"
        return (STRICT_DEFAULT, "--strict") if self.strict else (None, "")


@dataclass(frozen=True)
class RunSpec:
    """A resolved, validated run (see the module docstring).

    ``skeleton`` is the model with meta parameters (buffers real), ``weight_map`` its tensor →
    source file map; ``needs`` maps each layer that needs calibration statistics to their
    names; ``not_streamed`` says why the run loads the whole model (None: it streams);
    ``coverage`` accounts for every parameter tensor: quantized, or kept and why.
    """

    source_dir: Path
    recipe: Recipe
    options: RunOptions
    device: torch.device
    writer: Writer
    skeleton: nn.Module
    weight_map: Mapping[str, Path]
    layout: ModelLayout
    plan: Plan
    needs: Mapping[str, frozenset[str]]
    not_streamed: str | None
    coverage: CoverageAccount
    warnings: tuple[str, ...] = field(default=())

    @property
    def calibration(self) -> CalibrationOptions:
        return self.options.calibration

    @property
    def inputs(self) -> list[Path]:
        """The files and folders the run reads: the model folder, the recipe file (not a
        preset), a local calibration source."""
        source = self.calibration.source
        local = [Path(source)] if source is not None and Path(source).exists() else []
        recipe = Path(self.recipe.source)
        recipe_file = [recipe] if not self.recipe.source.startswith("preset:") and \
            recipe.is_file() else []
        return [self.source_dir, *recipe_file, *local]

    @property
    def streams(self) -> bool:
        return self.not_streamed is None

    @property
    def needs_calibration_pass(self) -> bool:
        """Whether calibration data runs through the model (statistics, transforms, KV)."""
        return calibration_pass_needed(self.plan, self.needs)

    def require_calibration(self) -> None:
        """CalibrationError when the plan needs calibration data and ``--calib`` is missing."""
        if self.calibration.source is not None:
            return
        if self.needs:
            first = next(iter(self.needs))
            raise CalibrationError(f"layer {first} needs calibration statistics "
                                   f"({', '.join(sorted(self.needs[first]))}) but no "
                                   "calibration data was given", hint="pass --calib FILE")
        if self.plan.transforms:
            raise CalibrationError(f"transform '{self.plan.transforms[0].type}' needs "
                                   "calibration data", hint="pass --calib FILE")
        if self.plan.kv_cache and self.plan.kv_cache.calibrated:
            raise CalibrationError("kv_cache quantization needs calibration data for its "
                                   "scales", hint="pass --calib FILE (or use an int8/int4 "
                                   "kv_cache with dynamic: true, which calibrates nothing)")


def check_device(device: str | torch.device) -> torch.device:
    """A usable torch device, or ModelError saying what is available."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device '{device}'", hint="use cpu, cuda or cuda:N") from exc
    if parsed.type not in ("cpu", "cuda"):
        raise ModelError(f"device '{device}' is not supported: mpq runs on cpu or cuda",
                         hint="use --device cpu or --device cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' requested but CUDA is not available here",
                         hint="use --device cpu")
    return parsed


def as_recipe(recipe: str | Recipe) -> Recipe:
    """A Recipe from a preset name or YAML path (algorithms checked against the registry)."""
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe, known_algorithms=list(QUANTIZERS))


def needed_stats(plan: Plan, calibrated: bool = False) -> dict[str, frozenset[str]]:
    """Layer name → the statistics it needs (only layers that need some): its quantizer's, plus
    ``input_absmax`` when its input activations get a static (calibrated) scale; with
    ``calibrated`` (the run has calibration data) also those its quantizer uses when they are
    there (``scheme_wants``; not for an input embedding, which has no input to measure)."""
    needs = {}
    for layer in plan.quantized():
        quantizer = QUANTIZERS.get(layer.scheme.algorithm)
        layer_needs = set(scheme_needs(quantizer, layer.scheme))
        if calibrated and not layer.embedding:
            layer_needs |= scheme_wants(quantizer, layer.scheme)
        acts = layer.scheme.input_activations
        if acts is not None and not acts.dynamic:
            layer_needs.add("input_absmax")
        if layer_needs:
            needs[layer.name] = frozenset(layer_needs)
    return needs


def plan_model(model: nn.Module, recipe: Recipe) -> tuple[ModelLayout, Plan]:
    """Resolve ``recipe`` against the layers of ``model`` (weights may be on meta) and check
    what the plan asks of the algorithms, transforms, rotation and KV cache."""
    layout = layout_of(model)
    layers, others = describe_layers(model, layout)
    plan = resolve(recipe, layers, others, tied=tied_pair(model, layout))
    check_embedding_schemes(plan, recipe)
    for layer in plan.quantized():
        try:
            QUANTIZERS.get(layer.scheme.algorithm).check(layer.scheme)
        except SchemeError as exc:
            rule = f"rules[{layer.rule}]" if layer.rule is not None else "recipe"
            raise RecipeError(f"{recipe.source}: {rule} ({layer.name}): {exc.message}",
                              hint=exc.hint) from None
    try:
        check_paired(plan, needed_stats(plan))
        check_tuned_layers(plan)
    except SchemeError as exc:
        raise RecipeError(f"{recipe.source}: {exc.message}", hint=exc.hint) from None
    check_moe_schemes(model, plan, recipe)
    if recipe.experts is not None and not any(layer.expert is not None for layer in plan.layers):
        raise RecipeError(f"{recipe.source}: experts: {type(model).__name__} has no fused "
                          "mixture-of-experts experts for these settings to apply to",
                          hint="remove the experts: section")
    for index, spec in enumerate(plan.transforms):
        where = f"{recipe.source}: transforms[{index}]"
        if spec.type not in TRANSFORMS:
            known = list(TRANSFORMS)
            raise RecipeError(f"{where}: unknown transform '{spec.type}'",
                              hint=did_you_mean(spec.type, known) or f"known: {', '.join(known)}")
        try:
            TRANSFORMS.get(spec.type).check(spec.options)
        except SchemeError as exc:
            raise RecipeError(f"{where}: {exc.message}", hint=exc.hint) from None
    if plan.transforms:  # the architecture must be known to the scale folds (ModelError if not)
        check_scale_groups(model, layout, plan, recipe)
    if recipe.rotation is not None:
        try:
            check_rotation_supported(model)
        except ModelError as exc:
            if not recipe.source.startswith("preset:"):
                raise
            raise ModelError(f"{recipe.source}: {exc.message}", hint="this preset rotates the "
                             "model; for this family use one without rotation, e.g. "
                             "w4a16-gptq or w3a16-gptq") from None
        try:
            rotation_specs(model, recipe.rotation)
        except SchemeError as exc:
            raise RecipeError(f"{recipe.source}: rotation: {exc.message}", hint=exc.hint) from None
    if plan.kv_cache and not attention_modules(model, blocks_of(model, layout)[0]):
        family = family_of(model)
        why = (f"not supported for family '{family.name}': {family.why_not('attention')}"
               if family is not None else "no attention module with k_proj/v_proj and a KV "
               f"cache argument found in {type(model).__name__}'s blocks")
        raise ModelError(f"{recipe.source}: kv_cache: {why}",
                         hint="remove kv_cache: this architecture's cache is not supported yet")
    if plan.kv_cache:
        try:
            plan.kv_cache.check_head_dim(kv_geometry(model.config)[1])
        except SchemeError as exc:
            raise SchemeError(f"{recipe.source}: kv_cache: {exc.message}", hint=exc.hint) from None
    return layout, plan


def with_storage_dtype(plan: Plan, recipe: Recipe, source_dir: Path,
                       weight_map: Mapping[str, Path]) -> Plan:
    """``plan`` with the recipe's storage_dtype resolved against the source checkpoint
    (mpq.checkpoint.storage: ``source`` → the dtype its safetensors files hold)."""
    return replace(plan, storage_dtype=resolve_storage_dtype(
        recipe.storage_dtype, source_dir, weight_map, read_config(source_dir)))


EMBEDDING_FORMATS = {"int": ("channel", "group"), "fp8_e4m3": ("channel",),
                     **{fmt.name: ("group",)  # GGUF blocks and super-blocks: by row
                        for fmt in (*GGUF_LEGACY, *GGUF_KQUANTS, IQ4_NL)}}


def check_embedding_schemes(plan: Plan, recipe: Recipe) -> None:
    """RecipeError for a scheme a quantized input embedding cannot take: an algorithm that
    needs activation statistics (a lookup table has no input to collect them from), input
    activations, or a number format other than int per row / per group along the hidden size
    and fp8_e4m3 per row (the runtime decodes only the looked-up rows: mpq.runtime.qembedding)."""
    for layer in plan.quantized():
        if not layer.embedding:
            continue
        scheme, where = layer.scheme, f"{recipe.source}: rules[{layer.rule}] ({layer.name})"
        needs = scheme_needs(QUANTIZERS.get(scheme.algorithm), scheme)
        if needs:
            raise RecipeError(f"{where}: algorithm '{scheme.algorithm}' needs activation "
                              f"statistics ({', '.join(sorted(needs))}), which an input "
                              "embedding (a table lookup) does not have",
                              hint="use algorithm: rtn in the rule for the embedding")
        if scheme.input_activations is not None:
            raise RecipeError(f"{where}: an input embedding has no input activations to "
                              "quantize", hint="remove input_activations from that rule")
        args = scheme.weights
        granularities = EMBEDDING_FORMATS.get(args.format, ())
        if args.granularity not in granularities:
            allowed = "; ".join(f"{fmt} per {' or '.join(g)}"
                                for fmt, g in EMBEDDING_FORMATS.items())
            raise RecipeError(f"{where}: {args.format} weights per {args.granularity} are not "
                              f"supported for an input embedding (allowed: {allowed})",
                              hint="e.g. weights: {bits: 8, granularity: channel}")


def check_moe_schemes(model: nn.Module, plan: Plan, recipe: Recipe) -> None:
    """RecipeError for input activation quantization of fused MoE experts or a router: an
    expert's down projection reads an activation inside the experts module, which the loaded
    model cannot quantize (mpq.runtime.qexperts), and a router is loaded dequantized."""
    gates = {name for name, _ in routers(model)}
    for layer in plan.quantized():
        moe = layer.expert is not None or layer.name in gates
        if moe and layer.scheme.input_activations is not None:
            what = "fused MoE experts" if layer.expert is not None else "MoE routers"
            raise RecipeError(f"{recipe.source}: rules[{layer.rule}] ({layer.name}): input "
                              f"activation quantization of {what} is not supported",
                              hint="put a rule for them without input_activations first, e.g. "
                                   "targets: ['re:.*mlp\\.experts\\..*'] with weights only")


def check_scale_groups(model: nn.Module, layout: ModelLayout, plan: Plan,
                       recipe: Recipe) -> None:
    """ModelError unless each transform has an exact scale group to fold in the model's blocks
    (mpq.transforms.scale_fold.scale_groups; the first block stands for all)."""
    groups = scale_groups(model, blocks_of(model, layout)[0])
    family = family_of(model)
    for index, spec in enumerate(plan.transforms):
        select = getattr(TRANSFORMS.get(spec.type), "select_groups", None)  # plugins may lack it
        if select is None or select(groups, spec.options):
            continue
        exact = ", ".join(str(g) for g in groups) or "none that hold for this config"
        why = ("no norm feeds a linear in its blocks, and only linear → linear groups are "
               "exact" if groups else "no scale group of its record holds for this config")
        raise ModelError(f"{recipe.source}: transforms[{index}]: {spec.type} has nothing to fold "
                         f"in model type '{model.config.model_type}' (family '{family.name}'): "
                         f"{why}; exact groups: {exact}",
                         hint="remove the transform, or for smoothquant set pairs: true to "
                              "smooth the linear → linear groups")


def check_sequence_length(model: nn.Module, calibration: CalibrationOptions) -> None:
    """CalibrationError when calibration samples are longer than the model's learned position
    table (mpq.models.source.max_positions)."""
    limit = max_positions(model)
    if calibration.source is not None and limit is not None and calibration.seq_len > limit:
        raise CalibrationError(f"--seq-len {calibration.seq_len} exceeds the model's maximum of "
                               f"{limit} positions", hint=f"use --seq-len {limit} or less")


def checked_for_target(plan: Plan, name: str | None, model_type: str | None) -> Plan:
    """``plan`` recording the serving target ``name`` (mpq.checkpoint.serving), once it is
    checked to suit it (FormatError if not; ``model_type`` names the family whose fused groups
    apply); unchanged for ``any``."""
    target = serving_target(name)
    check_target(target, plan, model_type)
    return plan if target.name == DEFAULT_TARGET else replace(plan, serving_target=target.name)


def resolve_run(model_path: str | Path, recipe: str | Recipe,
                options: RunOptions = RunOptions()) -> RunSpec:
    """Check and resolve a run without reading any weight (see the module docstring).

    Errors come in the order a user fixes them: device, recipe, output format, model folder,
    plan (and the share it leaves unquantized), what the format can express.  A missing ``--calib`` is not raised here (a dry run
    reports it): :meth:`RunSpec.require_calibration` does.
    """
    device = check_device(options.device)
    ranks = current_ranks()
    if ranks is not None and device.type == "cuda":  # one GPU per process (NCCL needs it)
        device = rank_device(device)
    recipe = as_recipe(recipe)
    writer = writer_for(options.output_format)
    source_dir = check_model_dir(model_path)
    check_float_source(source_dir)
    skeleton, weight_map = build_streamed(source_dir, options.dtype)
    check_stored_tensors(source_dir, skeleton, weight_map)
    check_sequence_length(skeleton, options.calibration)
    layout, plan = plan_model(skeleton, recipe)
    plan = with_storage_dtype(plan, recipe, source_dir, weight_map)
    coverage = account(skeleton, plan)
    coverage.check(*options.unquantized_limit())
    if ranks is not None:
        check_distributed_support(plan)
    warnings = preflight(writer, plan, options.strict,
                         source=(read_config(source_dir), side_files(source_dir)[0]))
    plan = checked_for_target(plan, options.serving_target,
                              getattr(skeleton.config, "model_type", None))
    needs = needed_stats(plan, calibrated=options.calibration.source is not None)
    not_streamed = "--no-stream"
    if options.stream:
        not_streamed = streaming_blocker(skeleton, weight_map, layout, plan, recipe, needs)
    return RunSpec(source_dir=source_dir, recipe=recipe, options=options, device=device,
                   writer=writer, skeleton=skeleton, weight_map=weight_map, layout=layout,
                   plan=plan, needs=needs, not_streamed=not_streamed, coverage=coverage,
                   warnings=tuple(warnings))

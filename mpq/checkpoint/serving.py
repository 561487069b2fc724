"""Serving targets: the engine an artifact is made for, and what of a plan that engine loads.

``--target`` on ``mpq quantize`` / ``plan`` / ``convert`` (and on ``--target-bits``'s choice):

- ``any`` (the default): no constraint beyond the output format's own.
- ``transformers``: what transformers loads through compressed-tensors (every scheme that format
  stores; transformers decompresses each layer on its own, so no fused groups).
- ``vllm``: compressed-tensors as vLLM runs it.  Each fused group of the model family (q/k/v,
  gate/up: :attr:`mpq.models.family.Family.fused`, the single record of them) is one GEMM with one
  quantization method, so its members share one scheme (all quantized alike, or all kept);
  int weights only as its int kernels take them (4 or 8 bits, symmetric, per channel or groups of
  32/64/128: FORMATS.md); input-activation quantization only over 8-bit weights (W8A8 int8/fp8);
  nothing outside the decoder blocks (its compressed-tensors method quantizes the blocks'
  linear layers; the embedding and output head run from float weights).  The shape rules of its
  fastest kernels (K % 128, N % 64) stay pre-flight warnings: they are the model's, not the
  recipe's, and slower kernels take such shapes.
- ``llama.cpp``: what the GGUF writer expresses exactly (a GGUF type per tensor; llama.cpp keeps
  q, k and v as separate tensors, so no fused groups).

Every check runs on the plan, before any weight is read; a plan that breaks one is refused with
:class:`~mpq.errors.FormatError` (exit 9) naming the layers and why.  The plan records the target
(``serving_target``), so ``mpq convert`` checks it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable

from mpq.errors import FormatError, OptionError, did_you_mean
from mpq.checkpoint.compressed_tensors import vllm_scheme_reasons
from mpq.config.plan import LayerPlan, Plan
from mpq.models.families import family_of

DEFAULT_TARGET = "any"


def _vllm_layer(layer: LayerPlan) -> list[str]:
    reasons = vllm_scheme_reasons(layer)
    if layer.block is None:
        reasons.append("outside the decoder blocks (vLLM's compressed-tensors method quantizes "
                       "the blocks' linear layers; keep the embedding and head float)")
    acts = layer.scheme.input_activations
    if acts is not None and layer.scheme.weights.bits != 8:
        reasons.append(f"input activations quantized over {layer.scheme.weights.bits}-bit "
                       "weights (vLLM's activation kernels are W8A8)")
    return reasons


@dataclass(frozen=True)
class ServingTarget:
    """One engine: ``format``, the writer whose :meth:`unsupported` applies (None: none);
    ``fused``: fused groups share one scheme; ``layer_reasons``: why the engine does not run a
    quantized layer's scheme (beyond the format); ``ladder_extra``: candidates that the
    default ladder (mpq.analysis.candidates) lacks and the engine runs."""

    name: str
    engine: str
    format: str | None = None
    fused: bool = False
    layer_reasons: Callable[[LayerPlan], list[str]] | None = None
    ladder_extra: tuple[str, ...] = ()  # rungs added to --target-bits' default candidates

    def layer_problems(self, layer: LayerPlan) -> list[str]:
        """Why this target cannot take ``layer`` as planned (empty: it can)."""
        if layer.scheme is None:
            return []
        problems = []
        if self.format is not None:
            from mpq.checkpoint.writers import writer_for

            one = Plan(recipe_name="one layer", layers=(layer,), precision_policy={})
            problems += [p.split(": ", 1)[-1] for p in writer_for(self.format).unsupported(one)]
        if self.layer_reasons is not None:
            problems += self.layer_reasons(layer)
        return problems


TARGETS = {t.name: t for t in (
    ServingTarget("any", "any loader"),
    ServingTarget("transformers", "transformers (compressed-tensors)", "compressed-tensors"),
    # int4 per channel: with the ladder's int6/int5 and g192 gone, the cheap rung that frees
    # bits for int8 and int4 g32 where they matter
    ServingTarget("vllm", "vLLM", "compressed-tensors", fused=True, layer_reasons=_vllm_layer,
                  ladder_extra=("int4",)),
    ServingTarget("llama.cpp", "llama.cpp (GGUF)", "gguf"),
)}


def serving_target(name: str | None) -> ServingTarget:
    """The target named ``name`` (None: ``any``); OptionError for an unknown one."""
    if name is None:
        return TARGETS[DEFAULT_TARGET]
    if name not in TARGETS:
        raise OptionError(f"unknown serving target '{name}'",
                          hint=did_you_mean(name, list(TARGETS))
                          or f"targets: {', '.join(TARGETS)}")
    return TARGETS[name]


def fused_layer_groups(names: Iterable[str], model_type: str | None) -> list[tuple[str, ...]]:
    """The fused groups among layer ``names``: per decoder block, the members of each of the
    family's fused groups that are present (a group of which one member is present is still
    returned, so a member planned alone is caught).  Empty for a family without a record."""
    family = family_of(SimpleNamespace(model_type=model_type))
    if family is None or not family.fused:
        return []
    names = list(names)
    prefix = family.blocks + "."
    groups: dict[tuple[str, int], list[str]] = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        block, _, local = name[len(prefix):].partition(".")
        for index, group in enumerate(family.fused):
            if local in group:
                groups.setdefault((block, index), []).append(name)
    return [tuple(members) for members in groups.values()]


def _scheme_label(layer: LayerPlan) -> str:
    return "kept" if layer.scheme is None else (f"{layer.scheme.algorithm} "
                                                f"{layer.scheme.describe()}")


def target_problems(target: ServingTarget, plan: Plan, model_type: str | None) -> list[str]:
    """Every reason ``plan`` breaks ``target``: layers it cannot run, fused groups split."""
    problems = []
    if target.format is not None:
        from mpq.checkpoint.writers import writer_for

        writer = writer_for(target.format)
        problems += writer.unsupported(plan)
        if plan.rotation is not None and plan.rotation.r4 and not writer.online_rotations:
            problems.append(f"rotation r4 (online, on down_proj inputs): {target.engine} does "
                            "not apply it; use r4: false")
    if target.layer_reasons is not None:
        problems += [f"{layer.name}: {why}" for layer in plan.quantized()
                     for why in target.layer_reasons(layer)]
    if target.fused:
        by_name = {layer.name: layer for layer in plan.layers}
        for group in fused_layer_groups(by_name, model_type):
            schemes = {_scheme_label(by_name[name]) for name in group}
            if len(schemes) > 1:
                problems.append(f"fused group {' + '.join(group)} has {len(schemes)} schemes "
                                f"({'; '.join(sorted(schemes))}); {target.engine} runs it as "
                                "one GEMM with one scheme")
    return problems


def check_target(target: ServingTarget, plan: Plan, model_type: str | None) -> None:
    """FormatError (exit 9) when ``plan`` breaks ``target`` (see :func:`target_problems`)."""
    problems = target_problems(target, plan, model_type)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more"
                                           if len(problems) > 6 else "")
        raise FormatError(f"--target {target.name}: {len(problems)} problem(s): {shown}",
                          hint=f"give those layers a scheme {target.engine} runs (fused groups "
                               "one scheme), or --target any")

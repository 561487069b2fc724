"""The writer contract, the shared folder writer, and the registry of output formats.

A :class:`Writer` turns an :class:`~mpq.checkpoint.state.ArtifactState` into a checkpoint folder
(its ``contents``; a writer of another container, GGUF, writes the folder itself: ``write``).
``unsupported(plan)`` runs before any quantization (``mpq quantize --format X``) and before any
conversion: it lists every layer the format cannot express, with the reason, and writing such a
plan raises :class:`~mpq.errors.FormatError`.  ``preflight(plan)`` lists layers that the format
can store but a fast runtime kernel would not accept (warnings; ``--strict`` refuses).
Every format keeps mpq's metadata (recipe, plan, provenance, packing layout) in the safetensors
header (``mpq.*`` keys, strings) and a top-level ``mpq`` key of config.json naming the format;
every folder ends with the manifest of all its files (mpq.checkpoint.manifest, written by
mpq.checkpoint.native.write_artifact, which every format goes through).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from mpq import __version__
from mpq.errors import FormatError
from mpq.checkpoint.lazy import LazyTensors, specs_of
from mpq.checkpoint.native import FORMAT_VERSION, write_artifact
from mpq.checkpoint.state import ArtifactState
from mpq.checkpoint.sizes import entries_of, size_summary
from mpq.checkpoint.storage import stored_dense
from mpq.checkpoint.model_card import render_model_card
from mpq.numerics.packing import PACKING_LAYOUT
from mpq.config.plan import Plan
from mpq.config.run_log import plan_record
from mpq.registry import Registry


@dataclass
class FolderContents:
    """What a writer produces before the folder is written."""

    tensors: Mapping[str, torch.Tensor]  # a dict, or a LazyTensors (see dense_group)
    config: dict  # full config.json (the writer's quantization_config included)
    code_keys: tuple[str, ...]  # per-layer local keys holding the weight codes (size accounting)
    header: dict[str, str] | None = None  # extra safetensors header strings
    files: dict[str, str] | None = None  # extra text files of the folder, by name


class Writer(Protocol):
    name: str
    online_rotations: bool  # whether its loaders apply the plan's run-time rotations (R4)
    load_hint: str  # how another program loads the folder (model card, messages)

    def unsupported(self, plan: Plan) -> list[str]: ...

    def preflight(self, plan: Plan) -> list[str]: ...

    def contents(self, state: ArtifactState) -> FolderContents: ...


WRITERS: Registry[Writer] = Registry("output format")


def dense_group(state: ArtifactState) -> LazyTensors:
    """A LazyTensors holding ``state.dense`` in the plan's storage dtype
    (mpq.checkpoint.storage.stored_dense: RecipeError on overflow, raised here, before anything
    is written), to which a writer adds its layers' tensors with ``LazyTensors.add`` (one group
    per layer).  For a state held in memory (plain dicts) everything stays resident, as before;
    for a streamed state (mpq.engine.streaming: tensors decoded from the resume work directory
    on access) each group is produced when needed, so the writer holds one shard at a time."""
    storage = state.plan.storage_dtype
    tensors = LazyTensors(resident=not state.streamed)
    if isinstance(state.dense, LazyTensors):
        for name in state.dense:
            if name in state.dense.resident_names():
                tensors.add_tensor(name, stored_dense(name, state.dense[name], storage))
            else:
                tensors.add(lambda name=name: {
                    name: stored_dense(name, state.dense[name], storage)})
    else:
        for name, tensor in state.dense.items():
            tensors.add_tensor(name, stored_dense(name, tensor, storage))
    return tensors


def writer_for(name: str) -> Writer:
    """The registered writer ``name``; FormatError (exit 9) listing the known ones otherwise."""
    if name not in WRITERS:
        from mpq.errors import did_you_mean

        known = sorted(WRITERS)
        raise FormatError(f"unknown output format '{name}'",
                          hint=did_you_mean(name, known) or f"known: {', '.join(known)}")
    return WRITERS.get(name)


def moe_problems(plan: Plan, why: str) -> list[str]:
    """One problem naming the quantized fused-expert slices (mpq.models.experts) and one per
    quantized MoE router, each followed by ``why`` the format cannot store it."""
    from mpq.models.coverage import name_pattern

    problems = []
    experts = [l for l in plan.quantized() if l.expert is not None]
    if experts:
        patterns = ", ".join(dict.fromkeys(name_pattern(l.weight_key) for l in experts))
        problems.append(f"{len(experts)} fused MoE expert slices of {patterns} ({why})")
    for layer in plan.quantized():
        if layer.expert is None and "router" in layer.class_name.lower():
            problems.append(f"{layer.name}: a MoE router ({layer.class_name}, not an nn.Linear: "
                            f"{why})")
    return problems


def check_expressible(writer: Writer, plan: Plan, source: tuple[dict, dict] | None = None
                      ) -> None:
    """Raise FormatError listing the layers ``writer`` cannot store (and, given the model's
    ``source`` (config, side files), what of the model itself it cannot, for writers that say:
    ``source_problems(config, files, plan=)``)."""
    problems = writer.unsupported(plan)
    if plan.rotation is not None and plan.rotation.r4 and not writer.online_rotations:
        problems.append(f"rotation r4 is applied online to down_proj inputs, which format "
                        f"'{writer.name}' cannot express; use r4: false")
    model = []
    if source is not None and hasattr(writer, "source_problems"):
        model = writer.source_problems(*source, plan=plan)
    if problems or model:
        counts = ([f"the model ({len(model)} problem(s))"] if model else []) + (
            [f"{len(problems)} layer(s)"] if problems else [])
        listed = model + problems
        shown = "; ".join(listed[:6]) + (f"; … {len(listed) - 6} more"
                                         if len(listed) > 6 else "")
        raise FormatError(f"format '{writer.name}' cannot express {' and '.join(counts)}: "
                          f"{shown}", hint=("change the recipe for those layers, or write the "
                                            "native format (--format mpq)") if problems else
                          "write the native format (--format mpq)")


def preflight(writer: Writer, plan: Plan, strict: bool,
              source: tuple[dict, dict] | None = None) -> list[str]:
    """Check that ``writer`` can store ``plan`` (FormatError if not) and return its run-time
    pre-flight warnings; with ``strict``, any warning is a FormatError.  ``source``: the
    model's config and side files (name → path), for writers that check them too."""
    check_expressible(writer, plan, source)
    warnings = writer.preflight(plan)
    if source is not None and hasattr(writer, "source_warnings"):
        warnings = warnings + writer.source_warnings(*source)
    if warnings and strict:
        shown = "; ".join(warnings[:6]) + (f"; … {len(warnings) - 6} more"
                                           if len(warnings) > 6 else "")
        raise FormatError(f"--strict: {len(warnings)} layer(s) fail the pre-flight checks of "
                          f"format '{writer.name}': {shown}",
                          hint="change those layers' schemes, or drop --strict to write anyway")
    return warnings


def size_report(plan: Plan, tensors: Mapping[str, torch.Tensor],
                code_keys: tuple[str, ...]) -> dict[str, int]:
    """Stored tensor bytes vs the ideal: b bits per quantized weight + every other stored byte.
    Only sizes are read (a LazyTensors produces nothing)."""
    tensors = specs_of(tensors)
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    ideal = stored
    for layer in plan.quantized():
        for local in code_keys:
            codes = tensors.get(f"{layer.name}.{local}")
            if codes is not None:
                n_out, n_in = layer.shape
                ideal += (n_out * n_in * layer.scheme.weights.bits / 8
                          - codes.numel() * codes.element_size())
    quantized_weights = sum(l.shape[0] * l.shape[1] for l in plan.quantized())
    return {"stored_bytes": stored, "ideal_bytes": int(round(ideal)),
            "quantized_weights": quantized_weights}


def header_metadata(state: ArtifactState, format_name: str, sizes: dict) -> dict[str, str]:
    """mpq's header strings; deterministic (sorted keys, no timestamps)."""
    def dump(value) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    out = {"mpq.format": format_name, "mpq.format_version": FORMAT_VERSION,
           "mpq.tool_version": __version__, "mpq.packing": PACKING_LAYOUT,
           "mpq.plan": dump(plan_record(state.plan, state.log)), "mpq.sizes": dump(sizes)}
    for key in ("recipe", "calibration", "source", "pipeline"):
        out[f"mpq.{key}"] = dump(state.provenance.get(key))
    for key in ("calibration_coverage", "recalibration"):  # optional keys of format 1.x
        if state.provenance.get(key) is not None:  # calibrated / recalibrated artifacts only
            out[f"mpq.{key}"] = dump(state.provenance[key])
    return out


def mpq_config_key(state: ArtifactState, format_name: str) -> dict:
    """config.json's top-level ``mpq`` entry (recognises the folder without opening a shard)."""
    return {"format": format_name, "format_version": FORMAT_VERSION, "tool_version": __version__,
            "recipe": state.plan.recipe_name, "quantized_layers": len(state.plan.quantized()),
            "precision_policy": state.plan.precision_policy}


def write_state(state: ArtifactState, out_dir: str | Path, writer: Writer, *,
                force: bool = False) -> dict[str, int]:
    """Write ``state`` with ``writer`` into ``out_dir`` (atomically); return the size report
    (:func:`size_report`, as the header records it, plus the whole-model figures of
    mpq.checkpoint.sizes.size_summary).
    The caller has checked the plan with :func:`preflight`.  A writer whose output is not a
    safetensors folder (gguf) writes it itself (``write``)."""
    if hasattr(writer, "write"):
        return writer.write(state, out_dir, force=force)
    format_name = writer.name
    contents = writer.contents(state)
    sizes = size_report(state.plan, contents.tensors, contents.code_keys)
    metadata = {**header_metadata(state, format_name, sizes), **(contents.header or {})}
    files = {**state.files, **(contents.files or {})}
    source = state.provenance.get("source") or {}
    files["README.md"] = render_model_card(
        source=source, recipe_name=state.plan.recipe_name, plan=state.plan,
        calibration=state.provenance.get("calibration"), sizes=sizes, format_name=format_name,
        load_hint=writer.load_hint)
    write_artifact(out_dir, contents.tensors, metadata, contents.config, extra_files=files,
                   force=force)
    return {**sizes, **size_summary(state.plan, entries_of(specs_of(contents.tensors)))}

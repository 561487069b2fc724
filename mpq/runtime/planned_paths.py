"""The kernel path each quantized layer of an artifact would take under
``mpq.load(kernels=True)``, read from the plan and the stored act-order indices alone (nothing
is loaded or run): the same :func:`mpq.runtime.kernels.select` the loader asks."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mpq.runtime import kernels

LOOKUP = "lookup"  # the quantized input embedding: a table lookup, no matmul


@dataclass(frozen=True)
class PlannedPath:
    path: str  # int4pack, int8pack, decode or lookup
    reason: str


def _routers(artifact) -> set[str]:
    """Names of MoE routers (they load beside the experts, on the reference decode)."""
    from transformers import AutoConfig

    from mpq.models.experts import routers
    from mpq.models.source import build_skeleton

    if not any(layer.expert is not None for layer in artifact.plan.quantized()):
        return set()
    config = AutoConfig.from_pretrained(artifact.path, local_files_only=True)
    return {name for name, _ in routers(build_skeleton(config))}


def planned_paths(artifact) -> dict[str, PlannedPath]:
    """Quantized layer name → the path mpq.load(kernels=True) gives it, and why, for the opened
    native artifact ``artifact`` (mpq.checkpoint.native.Artifact)."""
    from mpq.checkpoint.native import read_tensors

    g_idx = read_tensors(artifact, select=lambda key: key.endswith(".g_idx"))
    gates = _routers(artifact)
    plan, out = artifact.plan, {}
    for layer in plan.quantized():
        if layer.expert is not None or layer.name in gates:
            out[layer.name] = PlannedPath(kernels.DECODE, "fused MoE experts and their router "
                                                          "decode")
            continue
        if layer.embedding:
            out[layer.name] = PlannedPath(LOOKUP, "input embedding (a table lookup)")
            continue
        shared = plan.shared_with(layer.name)  # a tied head runs on the embedding's table
        source = plan.get(shared or layer.name)
        path, reason = kernels.select(source.scheme.weights, tuple(source.shape),
                                      g_idx.get(f"{source.name}.g_idx"),
                                      None if shared else layer.scheme.input_activations)
        out[layer.name] = PlannedPath(path, reason)
    return out


def path_counts(paths: dict[str, PlannedPath]) -> dict[str, int]:
    """Path → number of layers, most first."""
    return dict(Counter(p.path for p in paths.values()).most_common())


def decode_reasons(paths: dict[str, PlannedPath]) -> dict[str, list[str]]:
    """For the layers on the reference decode path: reason → their names."""
    reasons: dict[str, list[str]] = {}
    for name, planned in paths.items():
        if planned.path == kernels.DECODE:
            reasons.setdefault(planned.reason, []).append(name)
    return reasons

"""The canonical quantized state of a whole model, independent of any file format.

Every writer (mpq.checkpoint.writers) takes an :class:`ArtifactState`; ``mpq quantize`` builds one
from the quantized model (:func:`state_from_model`) and ``mpq convert`` from a native artifact on
disk (:func:`state_from_artifact`), so converting never re-quantizes.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.errors import ArtifactError
from mpq.checkpoint.native import open_artifact, read_tensors
from mpq.checkpoint.native_codec import decode, split_layer_tensors
from mpq.checkpoint.storage import STORAGE_TORCH
from mpq.models.source import PASS_THROUGH
from mpq.config.plan import Plan
from mpq.config.run_log import RunLog
from mpq.numerics.base import QuantizedWeight



@dataclass
class ArtifactState:
    """What a writer needs.

    - ``dense``: every tensor that is not a quantized weight, under its state-dict name (biases
      of quantized layers included; tied tensors once), in the run's dtype; writers store them
      in ``plan.storage_dtype`` (mpq.checkpoint.storage, through writers.dense_group).
    - ``qweights``: the QuantizedWeight of each quantized layer, by module name.
    - ``config``: the Hugging Face config.json contents, without ``quantization_config`` and
      without mpq's own key (each writer adds its own).
    - ``provenance``: JSON-able records written into every format's metadata: ``recipe``,
      ``calibration``, ``source``, ``pipeline``; ``calibration_coverage``
      (mpq.calibration.coverage) only when the run had calibration data; ``recalibration``
      only when ``mpq drift --recalibrate`` rewrote the static scales (mpq.analysis.recalibrate).
    - ``files``: extra files of the folder (tokenizer, model card): name → source path or text.
    - ``log``: what the run produced (mpq.config.run_log): per-layer results, static input
      scales (``log.input_scale(name)``), transform records, applied rotations.
    ``qweights`` and ``dense`` are plain dicts, or (a streamed run, mpq.engine.streaming) mappings
    that read each entry from the resume work directory on access: ``streamed`` is then true
    and writers produce the artifact's tensors one group at a time.
    """

    plan: Plan
    log: RunLog
    qweights: Mapping[str, QuantizedWeight]
    dense: Mapping[str, torch.Tensor]
    config: dict
    provenance: dict[str, Any]
    files: dict[str, Path | str] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return not (isinstance(self.qweights, dict) and isinstance(self.dense, dict))

    def dtype(self) -> torch.dtype:
        """The dtype the artifact stores its float tensors in: the plan's storage dtype, else
        (a plan without one: an older artifact) that of its unquantized tensors."""
        if self.plan.storage_dtype is not None:
            return STORAGE_TORCH[self.plan.storage_dtype]
        return next((t.dtype for t in self.dense.values() if t.is_floating_point()
                     and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)), torch.float32)


def dense_tensors(model: nn.Module, dropped: set[str]) -> dict[str, torch.Tensor]:
    """The model's state dict without the tensors named in ``dropped`` (the quantized layers'
    weights, LayerPlan.weight_key); tied tensors once."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in model.state_dict().items():
        if name in dropped:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().clone()
    return tensors


def weight_keys(plan: Plan, names) -> set[str]:
    """The state-dict tensors that the quantized layers ``names`` replace."""
    return {plan.get(name).weight_key for name in names}


def hf_config(model: nn.Module) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("mpq", None)
    return config


def state_from_model(model: nn.Module, plan: Plan, log: RunLog,
                     qweights: dict[str, QuantizedWeight], *, provenance: dict[str, Any],
                     files: dict[str, Path | str]) -> ArtifactState:
    return ArtifactState(plan=plan, log=log, qweights=qweights, dense=dense_tensors(model, weight_keys(plan, qweights)),
                         config=hf_config(model), provenance=provenance, files=files)


def state_from_artifact(path: str | Path) -> ArtifactState:
    """Read a native artifact back into its canonical state (ArtifactError when damaged)."""
    artifact = open_artifact(path)
    tensors = read_tensors(artifact)
    qweights = {}
    shared = {}  # a tied head → the embedding whose stored tensor it uses
    for layer in artifact.plan.quantized():
        if (source := artifact.plan.shared_with(layer.name)) is not None:
            shared[layer.name] = source
            continue
        local = split_layer_tensors(tensors, layer.name)
        if "bias" in local:  # stays a dense tensor
            tensors[f"{layer.name}.bias"] = local.pop("bias")
        local.pop("input_scale", None)  # also in the plan's results
        try:
            qweights[layer.name] = decode(local, layer.scheme.weights, tuple(layer.shape),
                                          prefix=layer.name + ".")
        except ArtifactError as exc:  # name the artifact too
            raise ArtifactError(f"{artifact.path}: {exc.message}", hint=exc.hint) from None
    for head, source in shared.items():
        if source not in qweights:
            raise ArtifactError(f"{artifact.path}: {head} shares the quantized tensor of "
                                f"{source}, which the plan does not quantize",
                                hint="the artifact metadata is damaged")
        qweights[head] = qweights[source]
    config = dict(artifact.config)
    config.pop("mpq", None)
    config.pop("quantization_config", None)
    provenance = {}
    for key in ("recipe", "calibration", "source", "pipeline", "calibration_coverage",
                "recalibration"):
        try:
            provenance[key] = artifact.json_field(key)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{artifact.path}: metadata field mpq.{key} is damaged ({exc})",
                                hint="re-run mpq quantize") from exc
    files: dict[str, Path | str] = {name: artifact.path / name
                                    for name in (*PASS_THROUGH, "README.md")
                                    if (artifact.path / name).is_file()}
    return ArtifactState(plan=artifact.plan, log=artifact.log, qweights=qweights, dense=tensors, config=config,
                         provenance=provenance, files=files)

"""What goes into a native artifact: its tensors, config, header metadata and size accounting."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mpq import __version__
from mpq.formats.native import FORMAT_NAME, FORMAT_VERSION
from mpq.formats.native_codec import encode
from mpq.packing import PACKING_LAYOUT
from mpq.plan import Plan
from mpq.quantizers.base import QuantizedWeight

CODE_KEYS = ("qweight", "weight")  # local keys that hold codes; everything else is overhead


def artifact_tensors(model: nn.Module, plan: Plan, qweights: dict[str, QuantizedWeight]
                     ) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized weight replaced by its encoded tensors, plus
    ``<layer>.input_scale`` for layers whose input activations have a static scale.

    Tensors that share storage with an earlier one (tied embeddings) are written once.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    dropped = {f"{name}.weight" for name in qweights}
    for name, tensor in model.state_dict().items():
        if name in dropped:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().clone()
    for name, qw in qweights.items():
        for local, tensor in encode(qw).items():
            tensors[f"{name}.{local}"] = tensor
    for layer in plan.quantized():  # static activation scales, fp32 [1]
        if "input_scale" in layer.result:
            tensors[f"{layer.name}.input_scale"] = torch.tensor([layer.result["input_scale"]],
                                                                dtype=torch.float32)
    return tensors


def size_report(plan: Plan, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Stored tensor bytes vs the ideal: b bits per quantized weight + every other stored byte."""
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    ideal = stored
    for layer in plan.quantized():
        for local in CODE_KEYS:
            codes = tensors.get(f"{layer.name}.{local}")
            if codes is not None:
                n_out, n_in = layer.shape
                ideal += n_out * n_in * layer.scheme.weights.bits / 8 - codes.numel() * codes.element_size()
    quantized_weights = sum(l.shape[0] * l.shape[1] for l in plan.quantized())
    return {"stored_bytes": stored, "ideal_bytes": int(round(ideal)),
            "quantized_weights": quantized_weights}


def artifact_config(model: nn.Module, plan: Plan) -> dict:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["mpq"] = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                     "tool_version": __version__, "recipe": plan.recipe_name,
                     "quantized_layers": len(plan.quantized()),
                     "precision_policy": plan.precision_policy}
    return config


def header_metadata(*, recipe: dict, plan: Plan, calibration: dict | None, source: dict,
                    sizes: dict, pipeline: dict) -> dict[str, str]:
    """Strings only (safetensors rule); deterministic (sorted keys, no timestamps)."""
    def dump(value) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))

    return {"mpq.format_version": FORMAT_VERSION, "mpq.tool_version": __version__,
            "mpq.packing": PACKING_LAYOUT, "mpq.recipe": dump(recipe), "mpq.plan": dump(plan.to_dict()),
            "mpq.calibration": dump(calibration), "mpq.source": dump(source),
            "mpq.sizes": dump(sizes), "mpq.pipeline": dump(pipeline)}


def pass_through_files(source_dir: Path, names: tuple[str, ...]) -> dict[str, Path]:
    return {name: source_dir / name for name in names if (source_dir / name).is_file()}

"""What a model folder's weight files hold, against what its config.json's architecture expects.

Read from the safetensors headers only (names, dtypes, shapes; no tensor data).  A source is
refused (ModelError naming the tensors) when a tensor the architecture uses is stored

- with an integer or boolean dtype where the model holds floats (transformers would cast the
  codes to float in silence), or
- with another shape than config.json gives it;

and when the files hold tensors the architecture does not use (another model's weights, or a
config.json edited to fewer layers), except those transformers itself ignores on loading (the
model class's ``_keys_to_ignore_on_load_unexpected`` and the buffers older checkpoints kept).
Tensors missing from the files are refused by mpq.models.source.load_model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

from safetensors import SafetensorError, safe_open
from torch import nn

from mpq.errors import ModelError, corrupt_weights

# Buffers that older checkpoints stored: transformers skips the first two whatever the class
# says; GPT-2 fine-tunes saved by old transformers versions keep the constant attn.masked_bias.
ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$", r"attn\.masked_bias$")


def stored_tensors(path: Path, weight_map: Mapping[str, Path]
                   ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name → (safetensors dtype code such as ``F32`` or ``I8``, shape), for every name of
    ``weight_map``, read from the files' headers."""
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    out = {}
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    sliced = handle.get_slice(name)
                    out[name] = (sliced.get_dtype(), tuple(sliced.get_shape()))
        except (OSError, SafetensorError) as exc:
            raise corrupt_weights(path, exc) from exc
    return out


def is_float_code(code: str) -> bool:
    """Whether a safetensors dtype code is a floating-point one (F16, BF16, F32, F8_E4M3...)."""
    return code.startswith(("F", "BF"))


def check_stored_tensors(path: Path, model: nn.Module, weight_map: Mapping[str, Path]) -> None:
    """ModelError when the files of ``weight_map`` do not fit ``model`` (its weights may be on
    meta): see the module docstring.  Unused tensors are looked for only when the files name
    every parameter as the model does; a checkpoint whose names transformers remaps on loading
    (another prefix, older names) is left to its loading report (load_model)."""
    expected = {name: (tuple(t.shape), t.is_floating_point())
                for name, t in model.state_dict(keep_vars=True).items()}
    stored = stored_tensors(path, weight_map)
    for name, (code, shape) in stored.items():
        if name not in expected:
            continue
        want_shape, want_float = expected[name]
        if want_float and not is_float_code(code):
            raise ModelError(f"{path}: tensor '{name}' is stored as {code}, not as floating "
                             "point numbers", hint="the weights are damaged or quantized in a "
                             "form mpq does not read; quantize the original float model")
        if shape != want_shape:
            raise ModelError(f"{path}: tensor '{name}' has shape {shape}, the config expects "
                             f"{want_shape}", hint="the weights do not match config.json")
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if parameters - tied <= stored.keys():
        refuse_unexpected(path, unexpected_names(model, set(stored) - set(expected)))


def unexpected_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    """``names`` (stored, unknown to ``model``) less those transformers ignores on loading."""
    patterns = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()),
                *ALWAYS_IGNORED]
    ignored = re.compile("|".join(f"({pattern})" for pattern in patterns))
    return sorted(name for name in names if not ignored.search(name))


def refuse_unexpected(path: Path, names: list[str]) -> None:
    """ModelError listing the stored tensors the architecture does not use (none: nothing)."""
    if not names:
        return
    shown = ", ".join(names[:3]) + (f", … {len(names) - 3} more" if len(names) > 3 else "")
    raise ModelError(f"{path}: {len(names)} tensor(s) in the weight files are not part of "
                     f"config.json's architecture: {shown}",
                     hint="the weights and config.json come from different models (or "
                          "config.json was edited, e.g. num_hidden_layers): restore the "
                          "matching pair")

"""Reading a source model from disk: validation, loading and fingerprinting.

Every failure becomes a :class:`ModelError` that names the path and what to do.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from safetensors import SafetensorError, safe_open

from mpq.errors import ModelError, corrupt_weights, first_line

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # refused: loading them would unpickle
# Files of a model folder that are not weights and travel into the artifact unchanged.
PASS_THROUGH = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                "chat_template.jinja", "chat_template.json", "generation_config.json")


def side_files(path: Path) -> tuple[dict[str, Path], list[str]]:
    """The tokenizer and generation files to copy into an artifact (name → file), and the
    names skipped because they are links leading outside the model folder (whatever they point
    at would end up in a published artifact).  A Hugging Face cache snapshot's links into its
    repository's ``blobs/`` are the cache's own layout and are followed."""
    inside = path.resolve()
    blobs = inside.parent.parent / "blobs" if inside.parent.name == "snapshots" else None
    files, skipped = {}, []
    for name in PASS_THROUGH:
        file = path / name
        if not file.is_file():
            continue
        target = file.resolve()
        if target.is_relative_to(inside) or (blobs is not None and target.is_relative_to(blobs)):
            files[name] = file
        else:
            skipped.append(name)
    return files, skipped


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model or artifact folder, or ModelError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: cannot load its tokenizer: {first_line(exc)}",
                         hint="the folder needs tokenizer.json / tokenizer_config.json") from exc
    except Exception as exc:
        # The tokenizers library (Rust) reports a tokenizer.json it cannot parse as a plain
        # Exception; any other exception type is a bug and keeps its traceback.
        if type(exc) is not Exception:
            raise
        raise ModelError(f"{Path(path) / 'tokenizer.json'} is not a valid tokenizer: "
                         f"{first_line(exc)}",
                         hint="restore tokenizer.json from the model's source") from exc


def check_tokenizer(path: str | Path) -> None:
    """ModelError when the folder's tokenizer.json or tokenizer.model (files that travel into
    the artifact) does not load, so a run that needs no tokenizer does not publish a broken one."""
    if any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        load_tokenizer(path)


def check_model_dir(path: str | Path) -> Path:
    """A readable folder with config.json and at least one weight file, else ModelError."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model path '{path}' does not exist",
                         hint="pass a local Hugging Face model folder (config.json + *.safetensors)")
    if not path.is_dir():
        raise ModelError(f"model path '{path}' is not a directory",
                         hint="pass the folder that holds config.json, not a file")
    if not (path / "config.json").is_file():
        raise ModelError(f"'{path}' has no config.json",
                         hint="is this a Hugging Face model folder? save it with save_pretrained")
    if not weight_files(path):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelError(f"'{path}' holds only pickled weights ({', '.join(pickled[:3])}); "
                             "mpq reads safetensors only and never unpickles",
                             hint="convert it once where you trust the file: "
                                  "AutoModelForCausalLM.from_pretrained(path).save_pretrained(new)")
        raise ModelError(f"'{path}' has no weight files (*.safetensors)",
                         hint="save the model with save_pretrained(safe_serialization=True)")
    return path


POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence a model with a learned position table can take (its config's
    ``max_position_embeddings`` or GPT-2's ``n_positions``; longer inputs index past the
    table).  None for rotary models, which have no such hard limit."""
    if not any(name.rsplit(".", 1)[-1] in POSITION_TABLES for name, _ in model.named_modules()):
        return None
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_float_source(path: Path) -> None:
    """ModelError when the folder holds an already-quantized checkpoint (an mpq artifact, GPTQ,
    compressed-tensors, ...: config.json has ``mpq`` or ``quantization_config``), whose weights
    a float model class would not find."""
    config = read_config(path)
    quantized = config.get("quantization_config")
    if "mpq" in config or quantized is not None:
        method = "mpq" if "mpq" in config else (
            quantized.get("quant_method") if isinstance(quantized, dict) else None)
        raise ModelError(f"'{path}' is an already-quantized checkpoint ({method or 'quantization_config'}), not a float "
                         "model", hint="quantize the original float model it was made from")


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors files (pickled formats are never read)."""
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors" and p.is_file())


def source_weight_map(path: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (the index's weight map when sharded)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index} is unreadable: {exc}",
                             hint="re-download or re-save the model") from exc
        inside = path.resolve()
        for file in sorted(set(weight_map.values())):
            if not isinstance(file, str) or not (path / file).resolve().is_relative_to(inside):
                raise ModelError(f"{index} names a shard outside the model folder: {file!r}",
                                 hint="every shard must be a file inside the model folder; "
                                      "re-save the model")
        return {name: path / file for name, file in weight_map.items()}
    files = [path / "model.safetensors"] if (path / "model.safetensors").is_file() \
        else weight_files(path)
    out: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                out.update({name: file for name in handle.keys()})
        except (OSError, SafetensorError) as exc:
            raise corrupt_weights(path, exc) from exc
    return out


def read_config(path: Path) -> dict:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path / 'config.json'} is unreadable: {exc}",
                         hint="restore config.json from the model's source") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'} holds a JSON {type(config).__name__}, not an "
                         "object", hint="restore config.json from the model's source")
    return config


def load_config(path: Path):
    """The transformers config of a checked model folder, or ModelError (unknown architecture)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = read_config(path).get("model_type")
    if isinstance(model_type, str) and model_type not in CONFIG_MAPPING:
        raise ModelError(f"{path / 'config.json'}: model_type '{model_type}' is not an "
                         f"architecture transformers {transformers.__version__} knows",
                         hint="check config.json's model_type, or upgrade transformers if the "
                              "architecture is newer")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{path}: unsupported or unreadable model config: {first_line(exc)}",
                         hint="mpq needs an architecture that this transformers version knows") from exc


def load_model(path: str | Path, dtype: torch.dtype | str = "auto") -> nn.Module:
    """Load a causal LM from a local folder on CPU in eval mode, checking that its weight files
    hold every tensor the architecture needs, each with a float dtype and the config's shape,
    and nothing else (mpq.models.stored_tensors), and that the weights are finite."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    config = load_config(path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, use_safetensors=True,
            output_loading_info=True, ignore_mismatched_sizes=True)  # reported below
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot build a causal LM from this config: {first_line(exc)}",
                         hint="mpq quantizes *ForCausalLM models") from exc
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise corrupt_weights(path, exc) from exc
    except ImportError as exc:  # e.g. a GPTQ checkpoint without optimum installed
        raise ModelError(f"{path}: transformers cannot load this checkpoint here: "
                         f"{first_line(exc)}",
                         hint="install the package it names, or evaluate the native mpq "
                              "artifact (mpq convert writes other formats from it)") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would quietly initialise them at random
        shown = ", ".join(missing[:3]) + (f", … {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise ModelError(f"{path}: {len(missing)} tensor(s) that config.json's architecture "
                         f"needs are missing from the weight files: {shown}",
                         hint="re-download the model (a partial copy?), or fix config.json "
                              "(e.g. num_hidden_layers) to match its weights")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:  # reinitialised at random by transformers
        name, stored, wanted = mismatched[0]
        raise ModelError(f"{path}: tensor '{name}' has shape {tuple(stored)}, the config "
                         f"expects {tuple(wanted)}", hint="the weights do not match config.json")
    from mpq.models.stored_tensors import (check_stored_tensors, refuse_unexpected,
                                           unexpected_names)

    check_stored_tensors(path, model, source_weight_map(path))
    refuse_unexpected(path, unexpected_names(model, info.get("unexpected_keys") or ()))
    check_finite(model, where=path)
    return model.eval()


def check_finite(model: nn.Module, where: str | Path | None = None) -> None:
    """ModelError naming the first floating-point tensor with a NaN or Inf (and ``where``)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            prefix = f"{where}: " if where else ""
            raise ModelError(f"{prefix}tensor '{name}' holds NaN or Inf values",
                             hint="the source checkpoint is damaged; quantizing it would too")


def source_files(path: Path) -> list[Path]:
    """Every file mpq reads from the model folder: config.json, the shard index if any, every
    weight file, then the tokenizer and generation files that exist (they make the calibration
    tokens and travel into the artifact), in :data:`PASS_THROUGH` order."""
    index = path / "model.safetensors.index.json"
    extras = [path / name for name in PASS_THROUGH if (path / name).is_file()]
    return [path / "config.json", *([index] if index.is_file() else []), *weight_files(path),
            *extras]


def file_stamps(path: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, size, mtime in ns) of each of the model's files: a cheap witness of change."""
    stamps = {}
    for file in source_files(path):
        stat = file.stat()
        stamps[file.name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return stamps


def check_unchanged(path: Path, stamps: dict[str, tuple[int, int, int]]) -> None:
    """ModelError when the model's files are no longer those ``stamps`` saw (replaced, edited,
    added or removed while a run read them)."""
    hint = "leave the model folder alone during a run and run again"
    try:
        now = file_stamps(path)
    except OSError as exc:
        raise ModelError(f"{path}: the model's files changed while the run read them "
                         f"({first_line(exc)})", hint=hint) from exc
    changed = sorted(name for name in now.keys() | stamps.keys()
                     if now.get(name) != stamps.get(name))
    if changed:
        raise ModelError(f"{path}: the model's files changed while the run read them "
                         f"({', '.join(changed)}); its result would mix two models", hint=hint)


def fingerprint(path: str | Path) -> dict:
    """sha256 over every file mpq reads (:func:`source_files`, streamed, each preceded by its
    name), plus the model type."""
    path = Path(path)
    digest = hashlib.sha256()
    files = source_files(path)
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    config = read_config(path)
    return {"path": str(path.resolve()), "model_type": config.get("model_type"),
            "architectures": config.get("architectures"),
            "files": [f.name for f in files], "sha256": digest.hexdigest()}


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device while buffers (e.g. RoPE tables) stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """A causal LM from ``config`` with meta parameters: names, classes and shapes, no memory."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    where = getattr(config, "name_or_path", "") or "config.json"
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelError(f"{where}: model_type '{getattr(config, 'model_type', None)}' has no "
                         "causal LM class in transformers", hint="mpq quantizes *ForCausalLM "
                         "models (decoder-only text generators)")
    try:
        with parameters_on_meta():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{where}: cannot build a causal LM from config ({first_line(exc)})",
                         hint="mpq quantizes *ForCausalLM models") from exc


def load_skeleton(path: str | Path) -> nn.Module:
    """Validate a model folder and build its meta skeleton (for planning without weights)."""
    return build_skeleton(load_config(check_model_dir(path)))

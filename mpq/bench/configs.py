"""What ``mpq bench`` measures: the target (a model folder, an mpq artifact or a GGUF file) and
its baselines, as :class:`Config` rows, checked before anything is loaded.

Baselines come from the float source: the artifact's recorded provenance (``mpq.source``) or
``--source``; for a plain model folder, the folder itself.
- ``fp32`` / ``bf16``: the source through transformers in that dtype;
- ``int8``: the source quantized int8 per-channel symmetric RTN (the ``w8a16`` preset) into a
  temporary artifact, run by ``mpq.load(kernels=True)`` on torch's int8pack kernel.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mpq.errors import ModelError, OptionError, did_you_mean

BASELINES = ("fp32", "bf16", "int8")
INT8_PRESET = "w8a16"
LLAMA_CPP_HINT = "pip install llama-cpp-python (llama.cpp's Python binding), then rerun"


@dataclass(frozen=True)
class Settings:
    """How each configuration is measured (the same for every row of one run)."""

    threads: int = 2
    prompt_tokens: int = 32
    new_tokens: int = 64
    prefill_tokens: int = 512
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        return cls(**{**data, "batches": tuple(data["batches"])})


@dataclass(frozen=True)
class Config:
    """One row: ``kind`` is ``hf`` (transformers, ``dtype``), ``mpq`` (an artifact through
    mpq.load), ``int8`` (the int8 baseline artifact, built by the runner) or ``gguf``
    (llama.cpp); ``name`` is the row's label.  ``load`` (mpq and int8): ``kernels`` (packed
    kernels where a layer's scheme has one), ``decode`` (the reference per-forward decode) or
    ``dequantize`` (every layer dequantized once)."""

    name: str
    kind: str
    path: str
    dtype: str = "auto"
    load: str = "kernels"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8' → (1, 8): positive integers, no repeats; OptionError otherwise."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        batches = tuple(int(part) for part in parts)
    except ValueError:
        raise OptionError(f"--batch '{text}' is not a comma-separated list of integers",
                          hint="e.g. --batch 1,8") from None
    if not batches or any(b < 1 for b in batches) or len(set(batches)) != len(batches):
        raise OptionError(f"--batch '{text}': batch sizes must be distinct integers ≥ 1",
                          hint="e.g. --batch 1,8")
    return batches


def parse_baselines(text: str) -> tuple[str, ...]:
    """'fp32,bf16,int8' → the names in that order; 'none' → (); OptionError for others."""
    if text.strip().lower() == "none":
        return ()
    names = [part.strip() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in BASELINES:
            hint = did_you_mean(name, BASELINES) or f"choose from {', '.join(BASELINES)} or none"
            raise OptionError(f"--baselines: unknown baseline '{name}'", hint=hint)
    if not names or len(set(names)) != len(names):
        raise OptionError(f"--baselines '{text}': give each of {', '.join(BASELINES)} at most "
                          "once, or none", hint="e.g. --baselines fp32,bf16,int8")
    return tuple(names)


def target_kind(path: Path) -> str:
    """``gguf``, ``mpq`` or ``hf`` for the thing at ``path`` (ModelError/ArtifactError when it
    is none of them)."""
    from mpq.checkpoint.native import written_format
    from mpq.models.source import check_model_dir

    if not path.exists():
        raise ModelError(f"'{path}' does not exist", hint="pass a model folder, an mpq "
                         "artifact or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"'{path}' is a file but not a .gguf file", hint="pass a model "
                             "folder, an mpq artifact or a .gguf file")
        if importlib.util.find_spec("llama_cpp") is None:
            raise ModelError(f"'{path}' is a GGUF file and llama.cpp's Python binding "
                             "(llama_cpp) is not installed", hint=LLAMA_CPP_HINT)
        return "gguf"
    if written_format(path) is not None:
        from mpq.checkpoint.native import open_artifact

        open_artifact(path)  # ArtifactError for other formats mpq wrote, or a damaged header
        return "mpq"
    check_model_dir(path)
    return "hf"


def recorded_source(artifact_path: Path) -> Path | None:
    """The float source folder the artifact records in its provenance (None if absent)."""
    from mpq.checkpoint.native import open_artifact

    source = open_artifact(artifact_path).json_field("source") or {}
    return Path(source["path"]) if source.get("path") else None


def plan(target: str, baselines: tuple[str, ...], source: str | None,
         dtype: str = "auto") -> tuple[list[Config], Path | None]:
    """The rows to measure (target first, then the baselines) and the float source they come
    from (None without baselines).  ``dtype``: the compute dtype of an artifact's unquantized
    tensors (mpq.load's ``dtype``; ``auto`` = the one it records).  Checks every input (paths
    exist and are what they claim)."""
    path = Path(target)
    kind = target_kind(path)
    label = f"{path.name} (kernels{'' if dtype == 'auto' else ', ' + dtype})"
    rows = [Config(label if kind == "mpq" else path.name, kind, str(path),
                   dtype if kind == "mpq" else "auto")]
    if not baselines:
        return rows, None
    if source is not None:
        from_where = "--source"
        found = Path(source)
    elif kind == "hf":
        from_where, found = "the model itself", path
    elif kind == "mpq":
        from_where, found = "the artifact's provenance", recorded_source(path)
        if found is None:
            raise OptionError(f"'{path}' records no source model; the baselines need one",
                              hint="pass --source MODEL, or --baselines none")
    else:
        raise OptionError(f"'{path}': the baselines ({', '.join(baselines)}) need the float "
                          "model the GGUF file came from", hint="pass --source MODEL, or "
                          "--baselines none")
    if not found.exists():
        raise ModelError(f"source model '{found}' (from {from_where}) does not exist",
                         hint="pass --source MODEL, or --baselines none")
    from mpq.models.source import check_model_dir

    check_model_dir(found)
    if kind == "hf" and source is None:
        rows = []  # the model itself is its fp32/bf16 rows
    names = {"fp32": ("float32", "fp32"), "bf16": ("bfloat16", "bf16")}
    for name in baselines:
        if name in names:
            dtype, label = names[name]
            rows.append(Config(f"{found.name} {label}", "hf", str(found), dtype))
        else:
            rows.append(Config(f"{found.name} int8 weight-only (kernels)", "int8", str(found)))
    if kind == "hf" and not any(row.kind == "hf" for row in rows):
        rows.insert(0, Config(path.name, "hf", str(path)))  # no float row asked for: its own
    return rows, found


def max_positions_of(config_path: Path) -> int | None:
    """config.json's maximum positions (n_positions / max_position_embeddings), or None."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_lengths(rows: list[Config], settings: Settings) -> None:
    """OptionError when a prompt (prompt + new tokens, or the prefill) is longer than a model's
    positions."""
    needed = max(settings.prompt_tokens + settings.new_tokens, settings.prefill_tokens)
    for row in rows:
        if row.kind == "gguf":
            continue
        limit = max_positions_of(Path(row.path) / "config.json")
        if limit is not None and needed > limit:
            raise OptionError(f"'{row.path}' has {limit} positions; this run needs {needed} "
                              "(--prefill-tokens, or --prompt-tokens + --new-tokens)",
                              hint=f"use lengths of at most {limit} tokens")


def build_int8(source: Path, where: Path) -> Path:
    """The int8 weight-only baseline of ``source`` (preset w8a16, no calibration) at
    ``where``."""
    from mpq.quantize import quantize

    quantize(source, INT8_PRESET, where)
    return where

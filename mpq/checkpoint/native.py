"""The native ``mpq`` checkpoint: safetensors shards + config.json + tokenizer + model card.

Tensors: every unquantized tensor under its state-dict name in the model's dtype; each quantized
layer ``<p>`` as the local keys of :mod:`mpq.checkpoint.native_codec` prefixed ``<p>.`` (codes
bit-packed, scales and zero points as tensors), plus ``<p>.bias`` when it has one.

Header metadata (strings only, identical in every shard): ``format`` = ``pt`` (for other
safetensors readers), ``mpq.format_version`` (``MAJOR.MINOR``; a reader refuses another major),
``mpq.tool_version``, ``mpq.packing``, and JSON strings ``mpq.recipe``, ``mpq.plan``,
``mpq.calibration``, ``mpq.source``, and, in artifacts of calibrated runs,
``mpq.calibration_coverage`` (mpq.calibration.coverage; a key added within format 1.x, so its
absence means "not recorded", and it carries its own ``version``), and in artifacts whose static
scales ``mpq drift --recalibrate`` rewrote, ``mpq.recalibration`` (mpq.analysis.recalibrate: both
calibration sets).  ``config.json`` gains a top-level ``mpq`` key (format and
version) so a folder can be recognised without opening a shard; it also records the sha256 and
size of every tensor file (``tensor_files``) and the name of the manifest
(mpq.checkpoint.manifest), written last, which records the sha256 and size of every other file of
the folder (config.json included).  ``mpq verify`` and ``mpq.load`` check both.

The output folder appears atomically: everything is written to a hidden temporary sibling that is
renamed into place at the end; on failure or interruption the temporary folder is removed.
"""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from mpq.errors import ArtifactError, OutputError
from mpq.checkpoint.lazy import LazyTensors, specs_of
from mpq.checkpoint.manifest import MANIFEST_FILE, MANIFEST_KEY, file_digest, write_manifest
from mpq.checkpoint.safetensors_writer import write_safetensors
from mpq.config.plan import Plan
from mpq.config.run_log import RunLog, read_plan_record

FORMAT_NAME = "mpq"
FORMAT_VERSION = "1.0"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
TENSOR_FILES_KEY = "tensor_files"  # config.json's mpq entry: {file: {sha256, bytes}}


def version_problem(version: object) -> str | None:
    """Why an artifact of format ``version`` (``MAJOR.MINOR``) cannot be read, or None.
    Every reader asks this (open_artifact, verify): a newer minor version reads, another major
    does not."""
    text = str(version) if version is not None else ""
    major = FORMAT_VERSION.split(".", 1)[0]
    if not text or text.split(".", 1)[0] != major:
        return (f"mpq format version '{text or 'missing'}' is not supported "
                f"(this mpq reads {major}.x)")
    return None


def header_plan(metadata: Mapping[str, str], where: Path) -> tuple[Plan, RunLog]:
    """The plan and run log in mpq's header strings ``metadata`` (read from ``where``: a
    tensor file, or a GGUF file's metadata); ArtifactError for a format version this mpq does
    not read, or a missing or damaged plan."""
    problem = version_problem(metadata.get("mpq.format_version"))
    if problem:
        raise ArtifactError(f"{where}: {problem}",
                            hint="use the mpq version that wrote it, or re-quantize")
    try:
        return read_plan_record(json.loads(metadata["mpq.plan"]))
    except (KeyError, ValueError, TypeError, ArtifactError) as exc:
        raise ArtifactError(f"{where}: metadata is damaged ({exc})",
                            hint="re-run mpq quantize") from exc


def shard_tensors(tensors: Mapping[str, torch.Tensor], max_bytes: int
                  ) -> list[dict[str, torch.Tensor]]:
    """Split tensors, in name order, into shards of at most ``max_bytes`` (one tensor may exceed).
    Only sizes are read: pass meta tensors (LazyTensors.specs) to plan the shards of tensors not
    yet produced."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def check_output_apart(out_dir: Path, inputs: Iterable[Path]) -> None:
    """OutputError when ``out_dir`` is one of ``inputs``, contains one, or lies inside an input
    folder: writing (or ``--force`` replacing) it would destroy or alter an input."""
    out = out_dir.resolve()
    for given in inputs:
        path = Path(given).resolve()
        if out == path or path.is_relative_to(out):
            relation = "is" if out == path else "contains"
            raise OutputError(f"output '{out_dir}' {relation} the input '{given}': writing the "
                              "artifact there would destroy it",
                              hint="choose an -o apart from the model, recipe and data")
        if path.is_dir() and out.is_relative_to(path):
            raise OutputError(f"output '{out_dir}' lies inside the input folder '{given}'",
                              hint="choose an -o apart from the model, recipe and data")


def check_output_free(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise OutputError(f"output '{out_dir}' already exists",
                          hint="pass --force to replace it, or choose another -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output '{out_dir}' exists and is not a directory",
                          hint="remove it or choose another -o")
    parent = out_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output '{out_dir}': '{parent}' is "
                          f"{'not a directory' if not parent.is_dir() else 'not writable'}",
                          hint="choose an -o inside a writable folder")


@contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of a run writing ``out_dir`` (``.OUT.mpq-lock`` beside it, an
    advisory ``flock`` the system releases if the process dies); OutputError when another run
    holds it.  Once held, the half-written temporary folders that killed runs writing the same
    output left beside it are removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path = out_dir.parent / f".{out_dir.name}.mpq-lock"
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise OutputError(f"another mpq run (pid {holder}) is writing '{out_dir}'",
                          hint="wait for it to finish, or choose another -o") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        for left in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.mpq-tmp-*"):
            shutil.rmtree(left, ignore_errors=True)  # a killed run's half-written folder
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def write_artifact(out_dir: str | Path, tensors: Mapping[str, torch.Tensor],
                   metadata: dict[str, str],
                   config: dict, *, extra_files: dict[str, Path | str] | None = None,
                   force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the checkpoint folder atomically. ``extra_files`` maps a file name in the artifact to
    a source path (copied) or to text (written).  ``tensors`` may be a LazyTensors: the shards
    are planned from its sizes and each tensor is produced only when its turn comes in the file
    (mpq.checkpoint.safetensors_writer), so at most one group of tensors is in memory."""
    return write_folder(out_dir, force, lambda tmp: _write_contents(
        tmp, tensors, metadata, config, extra_files or {}, max_shard_bytes))


def write_folder(out_dir: str | Path, force: bool, fill: Callable[[Path], object]) -> Path:
    """Write an artifact folder atomically: ``fill(tmp)`` writes every file into a temporary
    sibling folder, which then takes ``out_dir``'s place (an existing one only with ``force``).
    An OS error becomes OutputError; nothing half-written is left at ``out_dir``."""
    out_dir = Path(out_dir)
    check_output_free(out_dir, force)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create '{out_dir.parent}': {exc}") from exc
    tmp = out_dir.parent / f".{out_dir.name}.mpq-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        _swap_into_place(tmp, out_dir, force)
    except OSError as exc:
        raise OutputError(f"cannot write '{out_dir}': {exc}",
                          hint="check free disk space and permissions") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_contents(tmp: Path, tensors, metadata, config, extra_files, max_shard_bytes) -> None:
    header = {"format": "pt", **metadata}
    specs = specs_of(tensors)
    shards = shard_tensors(specs, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for name, shard in zip(names, shards):
        write_safetensors(tmp / name, {k: specs[k] for k in shard}, tensors.__getitem__,
                          metadata=header)
        if isinstance(tensors, LazyTensors):
            tensors.release()
        weight_map.update({k: name for k in shard})
    if isinstance(config.get("mpq"), dict):  # content hashes, checked by `mpq verify`
        config = {**config, "mpq": {**config["mpq"], MANIFEST_KEY: MANIFEST_FILE,
                                    TENSOR_FILES_KEY: {name: file_digest(tmp / name)
                                                       for name in names}}}
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, source in extra_files.items():
        if isinstance(source, Path):
            shutil.copyfile(source, tmp / name)
        else:
            (tmp / name).write_text(source, encoding="utf-8")
    write_manifest(tmp)  # last: it records every file above


def _swap_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        check_output_free(out_dir, force)
        old = out_dir.parent / f".{out_dir.name}.mpq-old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


@dataclass
class Artifact:
    """An opened native artifact: its folder, parsed header metadata, plan and config."""

    path: Path
    metadata: dict[str, str]
    plan: Plan
    log: RunLog  # what the run that wrote it produced (results, transform records, rotations)
    config: dict
    files: list[Path]

    def json_field(self, key: str):
        value = self.metadata.get(f"mpq.{key}")
        return json.loads(value) if value else None

    def tensor_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def written_format(path: str | Path) -> str | None:
    """The format name in config.json's ``mpq`` key (None: not written by mpq, or unreadable)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        entry = json.loads(config.read_text(encoding="utf-8")).get("mpq")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(entry, dict):
        return None
    return str(entry.get("format", FORMAT_NAME))


def is_artifact(path: str | Path) -> bool:
    """Whether ``path`` is a native mpq artifact (other formats mpq writes load elsewhere)."""
    return written_format(path) == FORMAT_NAME


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise ArtifactError(f"{index} is unreadable: {exc}") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = [path / SINGLE_FILE]
    for file in files:
        if not file.is_file():
            raise ArtifactError(f"artifact '{path}' is missing {file.name}",
                                hint="the artifact is incomplete; re-run mpq quantize")
    return files


def open_artifact(path: str | Path) -> Artifact:
    """Open and validate an artifact's metadata (tensors are read later, on demand)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}' does not exist or is not a directory",
                            hint="check the path; pass a folder written by `mpq quantize`")
    written = written_format(path)
    if written is None:
        raise ArtifactError(f"'{path}' is not an mpq artifact (config.json has no 'mpq' key)",
                            hint="pass a folder written by `mpq quantize`")
    if written != FORMAT_NAME:
        raise ArtifactError(f"'{path}' is a {written} checkpoint written by mpq, not a native "
                            "mpq artifact", hint="load it with transformers "
                            "(AutoModelForCausalLM.from_pretrained) or its own runtime; `mpq "
                            "convert` reads native artifacts only")
    files = _shard_files(path)
    try:
        with safe_open(str(files[0]), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{files[0]} is unreadable or corrupt: {exc}") from exc
    plan, log = header_plan(metadata, files[0])
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: metadata is damaged ({exc})",
                            hint="re-run mpq quantize") from exc
    problem = version_problem(config["mpq"].get("format_version"))
    if problem:
        raise ArtifactError(f"{path / 'config.json'}: {problem}",
                            hint="use the mpq version that wrote it, or re-quantize")
    return Artifact(path=path, metadata=metadata, plan=plan, log=log, config=config, files=files)


def read_tensors(artifact: Artifact, select: Callable[[str], bool] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact (or those whose name ``select`` accepts)."""
    tensors = {}
    for file in artifact.files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if select is None or select(key):
                        tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{file} is unreadable or corrupt: {exc}",
                                hint="re-run mpq quantize") from exc
    return tensors

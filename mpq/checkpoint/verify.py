"""``verify``: check an artifact folder written by mpq against what it records about itself.

Checks, in order (each gives one :class:`Check`):

1. ``config.json`` is readable and has the ``mpq`` entry mpq writes (format, and a format
   version this mpq reads: mpq.checkpoint.native.version_problem, the rule every reader uses);
2. the manifest config.json names (mpq.checkpoint.manifest, ``mpq-manifest.json``) is there and
   well formed; an artifact without one (written before mpq recorded every file) fails, with
   the way out: re-write it with ``mpq convert``;
3. every file the manifest or ``tensor_files`` records exists with the recorded size and sha256
   (config.json, tensor files, index, tokenizer, generation config, model card…; the two records
   must agree), each file read once;
4. no *unrecorded file*: every file of the folder at any depth but hidden ones and
   documentation (the rule of mpq.checkpoint.manifest) is recorded: an added index, remote
   code (``*.py``), tokenizer file… fails (without a manifest, only added ``*.safetensors``
   files are found);
5. every tensor file's header parses and carries the format version config.json records;
6. for native artifacts, every quantized layer decodes (tensors present, shapes and dtypes as
   the stored plan says) to finite values (so a NaN scale or zero point is caught), and every
   other floating-point tensor is finite.

A GGUF folder (``model.gguf``, no config.json: mpq.checkpoint.gguf_folder) has no config entry:
its manifest, its files as recorded and no other, the GGUF's ``mpq.*`` metadata (format, a
version this mpq reads, a plan that parses), and every tensor dequantized by the ``gguf``
package finite.

Steps 1-4 are what :func:`require_intact` (mpq.load, mpq eval) checks before reading anything.
Reading uses safetensors and JSON only (never unpickling).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mpq.errors import ArtifactError
from mpq.checkpoint.gguf_folder import GGUF_FILE, is_gguf_folder, open_gguf_folder
from mpq.checkpoint.manifest import (MANIFEST_FILE, MANIFEST_KEY, ManifestError, file_digest,
                                     folder_files, read_manifest, safe_relative)
from mpq.checkpoint.native import FORMAT_NAME, TENSOR_FILES_KEY, version_problem


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def verify_artifact(path: str | Path) -> list[Check]:
    """All checks of the module docstring; stops early only when the config is unusable."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}' does not exist or is not a directory",
                            hint="pass the folder written by mpq quantize or mpq convert")
    if is_gguf_folder(path):
        return _gguf_checks(path)
    entry, checks = _content_checks(path)
    if entry is None or not all(check.ok for check in checks):
        return checks  # a damaged file: its header and tensors are not worth reading
    version = str(entry.get("format_version"))
    checks += [_header_check(path / name, version) for name in sorted(entry[TENSOR_FILES_KEY])]
    if entry.get("format", FORMAT_NAME) == FORMAT_NAME and all(c.ok for c in checks):
        checks.append(_decode_check(path))
    return checks


def require_intact(path: str | Path, *, without_manifest_ok: bool = False) -> None:
    """ArtifactError naming the first failure among steps 1-4 of the module docstring (config
    entry, manifest, every recorded file's size and sha256, no unrecorded file): what mpq.load
    checks before it reads anything.  ``without_manifest_ok``: an artifact written before
    manifests passes on its tensor files alone (mpq convert, which re-writes such artifacts)."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact '{path}' does not exist or is not a directory",
                            hint="pass the folder written by mpq quantize or mpq convert")
    entry, checks = _content_checks(path)
    if without_manifest_ok and entry is not None and entry.get(MANIFEST_KEY) is None:
        checks = [check for check in checks if check.name != "manifest"]
    failed = [check for check in checks if not check.ok]
    if failed:
        first = failed[0]
        raise ArtifactError(f"{path}: {first.name}: {first.detail}",
                            hint="the artifact was changed or damaged after it was written; "
                                 "re-run mpq quantize (or copy it again), or load it with "
                                 "verify=False (--no-verify) if you changed it on purpose")


def _content_checks(path: Path) -> tuple[dict | None, list[Check]]:
    """The config entry (None when unusable) and the checks of steps 1 to 4."""
    entry, config_check = _config_entry(path)
    checks = [config_check]
    if entry is None:
        return None, checks
    tensor_files = entry.get(TENSOR_FILES_KEY)
    if not isinstance(tensor_files, dict) or not tensor_files:
        checks.append(Check("content hashes", False, "config.json records no tensor_files "
                            "(written before mpq recorded them); re-write it with mpq convert"))
        return entry, checks
    outside = sorted(str(name) for name in tensor_files if not safe_relative(name))
    if outside:
        checks.append(Check("content hashes", False, f"tensor_files names {outside[0]!r}, "
                            "which is not a path inside the folder"))
        return entry, checks
    manifest_name, manifest, manifest_check = _manifest(path, entry)
    checks.append(manifest_check)
    recorded = dict(tensor_files)
    if manifest is not None:
        disagree = sorted(name for name in tensor_files if manifest.get(name) != tensor_files[name])
        if disagree:
            checks.append(Check(manifest_name, False, f"disagrees with config.json's "
                                f"tensor_files about {', '.join(disagree)}"))
        recorded.update(manifest)
    if manifest is not None:
        return entry, checks + _recorded_files(path, recorded, manifest_name)
    checks += [_file_check(path, name, expected) for name, expected in sorted(recorded.items())]
    # without a manifest only tensor files can be told apart
    extra = sorted(p.name for p in path.glob("*.safetensors") if p.name not in recorded)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        checks.append(Check("unrecorded files", False, f"{shown}: not in tensor_files"))
    return entry, checks


def _recorded_files(path: Path, recorded: dict, manifest_name: str) -> list[Check]:
    """Step 3 and 4: every recorded file as recorded, and no file beside them."""
    checks = [_file_check(path, name, expected) for name, expected in sorted(recorded.items())]
    extra = [name for name in folder_files(path, documents=False)
             if name not in recorded and name != manifest_name]
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        checks.append(Check("unrecorded files", False, f"{shown}: not in the manifest, and a "
                                                        "loader could read them"))
    return checks


def _gguf_checks(path: Path) -> list[Check]:
    """A GGUF folder (mpq.checkpoint.gguf_folder): its manifest, every file as recorded and no
    other, then the GGUF's mpq metadata and plan, then every tensor dequantizes (the ``gguf``
    package's dequantizers) to finite values."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return [Check(MANIFEST_FILE, False, "missing: a GGUF folder written by mpq records "
                      "its files there")]
    try:
        records = read_manifest(manifest)
    except ManifestError as exc:
        return [Check(MANIFEST_FILE, False, str(exc))]
    checks = [Check(MANIFEST_FILE, True, f"{len(records)} files recorded")]
    checks += _recorded_files(path, records, MANIFEST_FILE)
    if not all(check.ok for check in checks):
        return checks
    try:
        folder = open_gguf_folder(path)
    except ArtifactError as exc:
        return checks + [Check(f"{GGUF_FILE} header", False, exc.one_line())]
    checks.append(Check(f"{GGUF_FILE} header", True, f"{len(folder.tensors)} tensors, mpq "
                        f"format {folder.metadata['mpq.format_version']}, plan of "
                        f"{len(folder.plan.layers)} layers"))
    return checks + [_gguf_tensor_check(folder.file)]


def _gguf_tensor_check(file: Path) -> Check:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(file))
    bad = []
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if not np.isfinite(values).all():
            bad.append(tensor.name)
    if bad:
        return Check("tensors", False, f"NaN/Inf in {', '.join(bad[:5])}"
                     + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return Check("tensors", True, f"{len(reader.tensors)} tensors dequantize to finite values")


def _manifest(path: Path, entry: dict) -> tuple[str, dict | None, Check]:
    """The manifest's name, its records (None when unusable) and its check (step 2)."""
    name = entry.get(MANIFEST_KEY)
    if name is None:
        return "manifest", None, Check("manifest", False, "config.json names no manifest "
                                       "(written before mpq recorded every file, so edits to "
                                       "config.json or the tokenizer would go unnoticed); "
                                       "re-write it with mpq convert (from the native "
                                       "artifact: mpq convert NATIVE -o NEW --format F) or "
                                       "mpq quantize")
    if not safe_relative(name) or "/" in name:
        return "manifest", None, Check("manifest", False, f"config.json names {name!r} as the "
                                       "manifest, which is not a file name")
    if not (path / name).is_file():
        return name, None, Check(name, False, "missing (config.json names it): the records "
                                 "of every file but the tensor files are gone")
    try:
        records = read_manifest(path / name)
    except ManifestError as exc:
        return name, None, Check(name, False, str(exc))
    return name, records, Check(name, True, f"{len(records)} files recorded")


def _config_entry(path: Path) -> tuple[dict | None, Check]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, Check("config.json mpq entry", False, f"unreadable: {exc}")
    entry = config.get("mpq") if isinstance(config, dict) else None
    if not isinstance(entry, dict):
        return None, Check("config.json mpq entry", False, "no 'mpq' entry: not written by mpq")
    problem = version_problem(entry.get("format_version"))
    if problem:
        return None, Check("config.json mpq entry", False, problem)
    return entry, Check("config.json mpq entry", True,
                        f"format {entry.get('format', FORMAT_NAME)} {entry['format_version']}")


def _file_check(path: Path, name: str, expected: dict) -> Check:
    file = path / name
    if not file.is_file():
        return Check(name, False, "missing")
    actual = file_digest(file)
    if actual["bytes"] != expected.get("bytes"):
        return Check(name, False, f"{actual['bytes']} bytes, recorded {expected.get('bytes')}")
    if actual["sha256"] != expected.get("sha256"):
        return Check(name, False, f"sha256 {actual['sha256'][:16]}…, recorded "
                                  f"{str(expected.get('sha256'))[:16]}…")
    return Check(name, True, f"sha256 {actual['sha256'][:16]}…, {actual['bytes']} bytes")


def _header_check(file: Path, version: str) -> Check:
    """The header parses and carries ``version``, the one config.json records."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            count = len(list(handle.keys()))
    except (SafetensorError, OSError) as exc:
        return Check(f"{file.name} header", False, f"unreadable: {exc}")
    found = metadata.get("mpq.format_version")
    if found != version:
        return Check(f"{file.name} header", False, f"mpq.format_version {found!r}, "
                     f"config.json records {version!r}")
    return Check(f"{file.name} header", True, f"{count} tensors")


def _decode_check(path: Path) -> Check:
    from mpq.checkpoint.state import state_from_artifact

    try:
        state = state_from_artifact(path)
    except ArtifactError as exc:
        return Check("tensors", False, exc.one_line())
    bad = sorted([name for name, tensor in state.dense.items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
                 + [f"{name} (decoded: its codes and scales)" for name, qw in state.qweights.items()
                    if not torch.isfinite(qw.dequantize(torch.float32)).all()])
    if bad:
        return Check("tensors", False, f"NaN/Inf in {', '.join(bad[:5])}"
                     + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return Check("tensors", True, f"{len(state.qweights)} quantized layers decode, "
                                  f"{len(state.dense)} dense tensors finite")

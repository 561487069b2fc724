"""``verify``: check an artifact folder written by mpq against what it records about itself.

Checks, in order (each gives one :class:`Check`):

1. ``config.json`` is readable and has the ``mpq`` entry mpq writes (format, format version);
2. every tensor file it lists under ``tensor_files`` exists with the recorded size and sha256,
   and no other ``*.safetensors`` file is in the folder;
3. every tensor file's header parses and carries the same mpq format version;
4. for native artifacts, every quantized layer decodes (tensors present, shapes and dtypes as
   the stored plan says) to finite values (so a NaN scale or zero point is caught), and every
   other floating-point tensor is finite.

Reading uses safetensors and JSON only (never unpickling).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mpq.errors import ArtifactError
from mpq.checkpoint.native import FORMAT_NAME, FORMAT_VERSION, TENSOR_FILES_KEY, file_digest


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
    entry, checks = _content_checks(path)
    if entry is None or not all(check.ok for check in checks):
        return checks  # a damaged file: its header and tensors are not worth reading
    recorded = entry[TENSOR_FILES_KEY]
    checks += [_header_check(path / name) for name in sorted(recorded)]
    if entry.get("format", FORMAT_NAME) == FORMAT_NAME and all(c.ok for c in checks):
        checks.append(_decode_check(path))
    return checks


def require_intact(path: str | Path) -> None:
    """ArtifactError naming the first failure when the artifact's config entry or tensor files
    do not match what it recorded (steps 1 and 2 of the module docstring): what mpq.load
    checks before it reads anything."""
    path = Path(path)
    _, checks = _content_checks(path)
    failed = [check for check in checks if not check.ok]
    if failed:
        first = failed[0]
        raise ArtifactError(f"{path}: {first.name}: {first.detail}",
                            hint="the artifact was changed or damaged after it was written; "
                                 "re-run mpq quantize (or copy it again), or load it with "
                                 "verify=False (--no-verify) if you changed it on purpose")


def _content_checks(path: Path) -> tuple[dict | None, list[Check]]:
    """The config entry (None when unusable) and the checks of steps 1 and 2."""
    entry, config_check = _config_entry(path)
    checks = [config_check]
    if entry is None:
        return None, checks
    recorded = entry.get(TENSOR_FILES_KEY)
    if not isinstance(recorded, dict) or not recorded:
        checks.append(Check("content hashes", False, "config.json records no tensor_files "
                            "(written before mpq recorded them); re-write it with mpq convert"))
        return entry, checks
    checks += [_file_check(path, name, expected) for name, expected in sorted(recorded.items())]
    extra = sorted(p.name for p in path.glob("*.safetensors") if p.name not in recorded)
    if extra:
        checks.append(Check("unrecorded files", False, f"{', '.join(extra)} not in tensor_files"))
    return entry, checks


def _config_entry(path: Path) -> tuple[dict | None, Check]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, Check("config.json", False, f"unreadable: {exc}")
    entry = config.get("mpq") if isinstance(config, dict) else None
    if not isinstance(entry, dict):
        return None, Check("config.json", False, "no 'mpq' entry: not written by mpq")
    version = str(entry.get("format_version", ""))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        return None, Check("config.json", False, f"format version '{version}' is not "
                           f"{FORMAT_VERSION.split('.')[0]}.x, which this mpq reads")
    return entry, Check("config.json", True,
                        f"format {entry.get('format', FORMAT_NAME)} {version}")


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


def _header_check(file: Path) -> Check:
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            count = len(list(handle.keys()))
    except (SafetensorError, OSError) as exc:
        return Check(f"{file.name} header", False, f"unreadable: {exc}")
    version = metadata.get("mpq.format_version")
    if version != FORMAT_VERSION:
        return Check(f"{file.name} header", False, f"mpq.format_version {version!r}, "
                     f"expected {FORMAT_VERSION!r}")
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

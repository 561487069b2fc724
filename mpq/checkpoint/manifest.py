"""The artifact manifest: the sha256 and size of every file of an artifact folder.

Every writer puts ``mpq-manifest.json`` into the folder as its last file, before the folder is
renamed into place::

    {"mpq_manifest": 1,
     "files": {"README.md": {"bytes": 1234, "sha256": "…"}, "config.json": {…}, …}}

``files`` maps each other file's path, relative to the folder with ``/`` separators, to its
digest: tensor files, config.json, the index, tokenizer and generation files copied from the
source model, a writer's own files (quantize_config.json) and the README.md model card.
config.json cannot record its own hash, which is why the manifest is a file of its own;
config.json's ``mpq`` entry records the manifest's name (``manifest``, no hash: that would be
circular), so a deleted manifest is noticed.

The manifest records every file of the folder at any depth but hidden ones: any part of the
path starts with ``.`` (``.gitattributes``, ``.cache/``: tools' own bookkeeping, which Hugging
Face loaders do not read).  A recorded file is always checked, so an edited README.md (the
model card) fails too.

A file found later that the manifest does not record is an *unrecorded file* for
:mod:`mpq.checkpoint.verify` unless it is hidden or documentation: a suffix in
:data:`DOCUMENT_SUFFIXES` (markdown, reStructuredText, PDF, images) or, without a suffix, a
name in :data:`DOCUMENT_NAMES` (``LICENSE``, ``NOTICE``…).  Every other file counts, whatever
its suffix: loaders read far more than a fixed list of suffixes would name
(``tokenizer.model.v3``, ``*.tiktoken``, remote code ``*.py``, pickled ``*.bin``/``*.pt``,
``*.msgpack``, ``*.h5``, ``*.onnx``, files in subfolders).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath

MANIFEST_FILE = "mpq-manifest.json"
MANIFEST_KEY = "manifest"  # config.json's mpq entry: the manifest's file name
MANIFEST_VERSION = 1
DOCUMENT_SUFFIXES = frozenset({".md", ".rst", ".pdf", ".png", ".jpg", ".jpeg", ".gif", ".svg",
                               ".webp"})
DOCUMENT_NAMES = frozenset({"license", "licence", "notice", "copying", "authors"})
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """The manifest file is unreadable or malformed (the message says how)."""


def file_digest(path: Path) -> dict:
    """``{"sha256": hex, "bytes": size}`` of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def hidden(relative: str) -> bool:
    """Whether any part of a relative path starts with ``.``."""
    return any(part.startswith(".") for part in PurePosixPath(relative).parts)


def documentation(relative: str) -> bool:
    """Whether a relative path names documentation no loader reads (module docstring)."""
    name = PurePosixPath(relative).name
    suffix = PurePosixPath(name).suffix.lower()
    return suffix in DOCUMENT_SUFFIXES or (not suffix and name.lower() in DOCUMENT_NAMES)


def folder_files(folder: Path, *, documents: bool = True) -> list[str]:
    """The files of ``folder`` at any depth but hidden ones (and documentation, unless
    ``documents``), as sorted relative paths with ``/`` separators.  A symbolic link to a
    folder is listed as ``name/`` (its contents are not walked)."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        for name in dirs:
            if (Path(root) / name).is_symlink():
                found.append((base / name).as_posix() + "/")
        found += [(base / name).as_posix() for name in files]
    return sorted(path for path in found if not hidden(path)
                  and (documents or not documentation(path.rstrip("/"))))


def write_manifest(folder: Path) -> dict[str, dict]:
    """Write :data:`MANIFEST_FILE` into ``folder`` recording every other file of it but hidden
    ones (call it last); returns the recorded ``{path: digest}``."""
    recorded = {name: file_digest(folder / name) for name in folder_files(folder)
                if name != MANIFEST_FILE}
    text = json.dumps({"mpq_manifest": MANIFEST_VERSION, "files": recorded}, indent=2,
                      sort_keys=True) + "\n"
    (folder / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return recorded


def safe_relative(name: object) -> bool:
    """Whether ``name`` is a relative path inside a folder (no ``..``, not absolute)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and str(path) == name


def read_manifest(file: Path) -> dict[str, dict]:
    """The ``{path: {"sha256", "bytes"}}`` a manifest records; ManifestError when the file is
    unreadable, of another manifest version, or any entry is malformed."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"unreadable: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ManifestError("not a manifest: no 'files' object")
    if data.get("mpq_manifest") != MANIFEST_VERSION:
        raise ManifestError(f"manifest version {data.get('mpq_manifest')!r} is not "
                            f"{MANIFEST_VERSION}, which this mpq reads")
    for name, entry in data["files"].items():
        if not safe_relative(name):
            raise ManifestError(f"entry {name!r} is not a path inside the folder")
        if (not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int)
                or not isinstance(entry.get("sha256"), str)
                or not _SHA256.fullmatch(entry["sha256"])):
            raise ManifestError(f"entry {name!r} has no valid sha256 and bytes")
    return data["files"]

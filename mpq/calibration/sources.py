"""Calibration text sources: where documents come from.

A loader is registered in :data:`SOURCES` under a name and has the signature
``loader(location: str, *, field: str = "text", split: str | None = None) -> Iterator[str]``;
it yields documents (str) and raises :class:`~mpq.errors.CalibrationError` for bad data.
Empty or whitespace-only documents are skipped.  Loaders:

- ``text``: a UTF-8 text file.  Documents are blocks of non-blank lines separated by one or more
  blank lines (lines holding only whitespace).  A file with no blank line at all is read as one
  document per non-empty line (the one-article-per-line convention, e.g. lee_background.txt).
- ``jsonl``: one JSON object per line; the document is ``obj[field]`` (default ``text``).  Blank
  lines are skipped.  A ``.json`` file holding a JSON array of objects is read the same way.
- ``parquet``: column ``field`` of a parquet file, read batch by batch with pyarrow; nulls skipped.
- ``disk``: a folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``: split
  ``split``, default ``train``), column ``field``.
- ``hub``: ``datasets.load_dataset(name, config, split=split or "train")``.  With HF_HUB_OFFLINE or
  HF_DATASETS_OFFLINE set it fails at once without any network access.

:func:`detect_source` maps a spec (path, ``hf:NAME[:CONFIG]``, or ``LOADER:PATH``) to a loader
name; :func:`load_documents` runs it and refuses a source with no text.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from mpq.errors import CalibrationError
from mpq.registry import Registry

Loader = Callable[..., Iterator[str]]
SOURCES: Registry[Loader] = Registry("calibration source")

SUFFIXES = {".txt": "text", ".text": "text", ".md": "text",
            ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HUB_PREFIX = "hf:"
_FORMAT_HINT = ("use a .txt/.md, .jsonl/.json or .parquet file, a datasets save_to_disk folder, "
                "hf:NAME[:CONFIG] for a Hub dataset, or force a loader with text:PATH, jsonl:PATH, "
                "parquet:PATH, disk:PATH")


def detect_source(spec: str) -> tuple[str, str]:
    """Return ``(loader_name, path_or_name)`` for a calibration spec.

    ``hf:NAME[:CONFIG]`` → hub; ``LOADER:PATH`` forces a registered loader; otherwise the path
    must exist and is recognised by suffix (case-insensitive) or, for a folder, by the files
    ``datasets.save_to_disk`` writes.
    """
    if spec.startswith(HUB_PREFIX):
        name = spec[len(HUB_PREFIX):]
        if not name:
            raise CalibrationError(f"calibration spec '{spec}' names no dataset",
                                   hint="write hf:NAME or hf:NAME:CONFIG")
        return "hub", name
    prefix, sep, rest = spec.partition(":")
    if sep and len(prefix) > 1 and prefix in SOURCES:  # len > 1 keeps Windows drive letters paths
        if prefix != "hub" and not Path(rest).exists():
            raise _missing(rest)
        return prefix, rest
    path = Path(spec)
    if not path.exists():
        raise _missing(spec)
    if path.is_dir():
        if any((path / marker).is_file() for marker in DISK_MARKERS):
            return "disk", spec
        raise CalibrationError(f"calibration folder {spec} is not a datasets save_to_disk folder "
                               f"(none of {', '.join(DISK_MARKERS)} in it)", hint=_FORMAT_HINT)
    loader = SUFFIXES.get(path.suffix.lower())
    if loader is None:
        raise CalibrationError(f"cannot tell the format of calibration file {spec} from its "
                               f"suffix '{path.suffix}'", hint=_FORMAT_HINT)
    return loader, spec


def load_documents(spec: str, *, field: str = "text",
                   split: str | None = None) -> tuple[str, list[str]]:
    """Detect the loader for ``spec``, read every document; ``(loader_name, documents)``.

    Raises CalibrationError when the source yields no text.
    """
    name, location = detect_source(spec)
    docs = list(SOURCES.get(name)(location, field=field, split=split))
    if not docs:
        raise CalibrationError(f"calibration source {spec} contains no text",
                               hint="pass a file with at least one non-empty document")
    return name, docs


def read_text_file(path: str | os.PathLike) -> str:
    """The whole file decoded as strict UTF-8 (a leading BOM is dropped).

    Missing, unreadable or non-UTF-8 files raise CalibrationError; the latter names the byte offset.
    """
    return _decode(_read_bytes(path), path)


# --- loaders -------------------------------------------------------------------------------------

@SOURCES.register("text")
def load_text(path: str, *, field: str = "text", split: str | None = None) -> Iterator[str]:
    """Paragraph blocks of a UTF-8 text file (one per line if the file has no blank line)."""
    text = read_text_file(path)
    blocks = re.split(r"\r?\n[ \t\f\v\r]*\n", text)
    if len(blocks) == 1:
        blocks = text.splitlines()
    for block in blocks:
        block = block.strip("\r\n")
        if block.strip():
            yield block


@SOURCES.register("jsonl")
def load_jsonl(path: str, *, field: str = "text", split: str | None = None) -> Iterator[str]:
    """``obj[field]`` of each JSON line (or of each element of a top-level JSON array)."""
    data = _read_bytes(path)
    if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
        yield from _json_array(path, data, field)
        return
    offset = 0
    for lineno, raw in enumerate(data.splitlines(keepends=True), start=1):
        line = _decode(raw, path, offset)
        offset += len(raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})",
                                   hint="each line of a .jsonl file must be one JSON object",
                                   ) from None
        doc = _field_of(record, field, f"{path}:{lineno}")
        if doc.strip():
            yield doc


@SOURCES.register("parquet")
def load_parquet(path: str, *, field: str = "text", split: str | None = None) -> Iterator[str]:
    """Column ``field`` of a parquet file, read batch by batch with pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise CalibrationError(f"cannot read parquet file {path}: {e}") from None
    columns = pf.schema_arrow.names
    if field not in columns:
        raise _no_column(path, field, columns)
    for batch in pf.iter_batches(columns=[field]):
        yield from _strings(batch.column(0).to_pylist(), f"{path} column '{field}'")


@SOURCES.register("disk")
def load_disk(path: str, *, field: str = "text", split: str | None = None) -> Iterator[str]:
    """Column ``field`` of a save_to_disk folder; a DatasetDict uses ``split`` (default train)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot read datasets folder {path}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise CalibrationError(f"datasets folder {path} has no split '{split}'",
                                   hint=f"splits: {', '.join(ds)}; pass one as the split")
        ds = ds[split]
    if field not in ds.column_names:
        raise _no_column(path, field, ds.column_names)
    for batch in ds.select_columns([field]).iter(batch_size=1000):
        yield from _strings(batch[field], f"{path} column '{field}'")


@SOURCES.register("hub")
def load_hub(name: str, *, field: str = "text", split: str | None = None) -> Iterator[str]:
    """``load_dataset(NAME, CONFIG, split=...)`` for ``NAME[:CONFIG]``; fails fast offline."""
    hint = ("the Hugging Face Hub is not reachable; pass a local file (.txt, .jsonl, .parquet or "
            "a datasets save_to_disk folder) instead")
    if any(_env_true(var) for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise CalibrationError(f"cannot load Hub dataset '{name}': offline mode "
                               "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)", hint=hint)
    import datasets

    dataset_name, _, config = name.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(dataset_name, config or None, split=split)
        if field not in ds.column_names:
            raise _no_column(f"hf:{name}", field, ds.column_names)
        docs = list(_strings(ds[field], f"hf:{name} column '{field}'"))
    except CalibrationError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the hub stack becomes one clear error
        if _looks_like_network(e):
            raise CalibrationError(f"cannot load Hub dataset '{name}': {type(e).__name__}: {e}",
                                   hint=hint) from e
        raise CalibrationError(f"cannot load Hub dataset '{name}' split '{split}': "
                               f"{type(e).__name__}: {e}",
                               hint="check the name, config and split, or pass a local file") from e
    yield from docs


# --- helpers -------------------------------------------------------------------------------------

def _read_bytes(path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise _missing(str(path)) from None
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file {path}: {e.strerror or e}") from None


def _missing(path: str) -> CalibrationError:
    return CalibrationError(f"calibration file {path} does not exist",
                            hint="check the path; for a Hugging Face Hub dataset write "
                                 "hf:NAME[:CONFIG]")


def _decode(data: bytes, path, offset: int = 0) -> str:
    """Strict UTF-8; a BOM at file offset 0 is dropped; errors name the file byte offset."""
    if offset == 0 and data.startswith(b"\xef\xbb\xbf"):
        data, offset = data[3:], 3
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte "
                               f"offset {offset + e.start}",
                               hint="re-encode the file as UTF-8") from None


def _no_column(where: str, field: str, columns) -> CalibrationError:
    return CalibrationError(f"{where} has no column '{field}'",
                            hint=f"columns: {', '.join(columns)}; choose one as the text field")


def _field_of(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = f" (keys: {', '.join(record)})" if isinstance(record, dict) else ""
        raise CalibrationError(f"{where}: no field '{field}'{keys}",
                               hint="choose the text field that every record has")
    value = record[field]
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: field '{field}' is {type(value).__name__}, not a string")
    return value


def _json_array(path, data: bytes, field: str) -> Iterator[str]:
    try:
        records = json.loads(_decode(data, path))
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for i, record in enumerate(records):
        doc = _field_of(record, field, f"{path}[{i}]")
        if doc.strip():
            yield doc


def _strings(values, where: str) -> Iterator[str]:
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise CalibrationError(f"{where} holds {type(value).__name__} values, not strings",
                                   hint="choose a text column")
        if value.strip():
            yield value


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_network(e: BaseException) -> bool:
    """True for connection/timeout failures of requests, httpx, urllib3 or a missing hub cache."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if type(e).__name__ in {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
            return True
        if (type(e).__module__ or "").split(".")[0] in {"requests", "httpx", "httpcore", "urllib3"}:
            return True
        e = e.__cause__ or e.__context__
    return False

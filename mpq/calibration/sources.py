"""Calibration text sources: where documents come from.

A loader is registered in :data:`SOURCES` under a name and has the signature
``loader(location: str, *, field: str = "text", split: str | None = None) -> Iterator[str]``;
it yields documents (str) and raises :class:`~mpq.errors.CalibrationError` for bad data.
Empty or whitespace-only documents are skipped.  Loaders:

- ``text``: a UTF-8 text file.  Documents are blocks of non-blank lines separated by one or more
  blank lines (lines holding only whitespace).  A file with no blank line at all is read as one
  document per non-empty line (the one-article-per-line convention, e.g. lee_background.txt).
  Read in chunks (mpq.calibration.reading.text_documents): a document longer than
  ``reading.PIECE_CHARS`` characters comes in parts (:class:`~mpq.calibration.reading.Unfinished`),
  and a file first read line by line raises ``BlankLineFound`` at a later blank line (the caller
  reads it again with ``paragraphs=True``).
- ``jsonl``: one JSON object per line, read line by line; the document is ``obj[field]`` (default
  ``text``).  Blank lines are skipped.  A ``.json`` file holding a JSON array of objects is read
  the same way, but whole (the standard library parses a JSON array only whole: use .jsonl for
  large sources).
- ``parquet``: column ``field`` of a parquet file, read batch by batch with pyarrow; nulls skipped.
- ``disk``: a folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``: split
  ``split``, default ``train``), column ``field``, read in batches.
- ``hub``: ``datasets.load_dataset(name, config, split=split or "train")``, column read in
  batches.  With HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set it fails at once without any network
  access.

Loaders are generators: they read only as far as their consumer iterates
(mpq.calibration.dataset stops at its reading budget).  :func:`detect_source` maps a spec (path,
``hf:NAME[:CONFIG]``, or ``LOADER:PATH``) to a loader name; :func:`load_documents` reads every
document of a source (whole documents) and refuses a source with no text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

from mpq.calibration.reading import (BlankLineFound, decode, join_parts, missing_file,
                                     open_binary, read_bytes, text_documents, unreadable)
from mpq.errors import CalibrationError
from mpq.registry import Registry

Loader = Callable[..., Iterator[str]]
SOURCES: Registry[Loader] = Registry("calibration source")

SUFFIXES = {".txt": "text", ".text": "text", ".md": "text",
            ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HUB_PREFIX = "hf:"
_BATCH_ROWS = 1000  # rows of a parquet file or dataset read at a time
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
            raise missing_file(rest)
        return prefix, rest
    path = Path(spec)
    if not path.exists():
        raise missing_file(spec)
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
    loader = SOURCES.get(name)
    try:
        docs = list(join_parts(loader(location, field=field, split=split)))
    except BlankLineFound:
        docs = list(join_parts(loader(location, field=field, split=split, paragraphs=True)))
    if not docs:
        raise CalibrationError(f"calibration source {spec} contains no text",
                               hint="pass a file with at least one non-empty document")
    return name, docs


def read_text_file(path: str | os.PathLike) -> str:
    """The whole file decoded as strict UTF-8 (a leading BOM is dropped).

    Missing, unreadable or non-UTF-8 files raise CalibrationError; the latter names the byte offset.
    """
    return decode(read_bytes(path), path)


# --- loaders -------------------------------------------------------------------------------------

@SOURCES.register("text")
def load_text(path: str, *, field: str = "text", split: str | None = None,
              paragraphs: bool | None = None) -> Iterator[str]:
    """Paragraph blocks of a UTF-8 text file (one per line if the file has no blank line), read
    in chunks; long ones in parts (mpq.calibration.reading.text_documents)."""
    yield from text_documents(path, paragraphs=paragraphs)


@SOURCES.register("jsonl")
def load_jsonl(path: str, *, field: str = "text", split: str | None = None) -> Iterator[str]:
    """``obj[field]`` of each JSON line (or of each element of a top-level JSON array)."""
    with open_binary(path) as handle:
        if _starts_array(path, handle):
            yield from _json_array(path, _read_rest(path, handle), field)
            return
        for lineno, offset, raw in _numbered_lines(path, handle):
            yield from _jsonl_line(path, lineno, decode(raw, path, offset), field)


def _jsonl_line(path, lineno: int, line: str, field: str) -> Iterator[str]:
    """The document of one line of a jsonl file (nothing for a blank line or an empty text)."""
    if not line.strip():
        return
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
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[field]):
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
    for batch in ds.select_columns([field]).iter(batch_size=_BATCH_ROWS):
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
    except CalibrationError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the hub stack becomes one clear error
        if _looks_like_network(e):
            raise CalibrationError(f"cannot load Hub dataset '{name}': {type(e).__name__}: {e}",
                                   hint=hint) from e
        raise CalibrationError(f"cannot load Hub dataset '{name}' split '{split}': "
                               f"{type(e).__name__}: {e}",
                               hint="check the name, config and split, or pass a local file") from e
    for batch in ds.select_columns([field]).iter(batch_size=_BATCH_ROWS):
        yield from _strings(batch[field], f"hf:{name} column '{field}'")


# --- helpers -------------------------------------------------------------------------------------

def _starts_array(path, handle) -> bool:
    """Whether the file's first byte other than BOM bytes and whitespace is ``[``; rewinds."""
    while True:
        try:
            data = handle.read(1 << 16)
        except OSError as e:
            raise unreadable(path, e) from None
        rest = data.lstrip(b"\xef\xbb\xbf \t\r\n")
        if rest or not data:
            handle.seek(0)
            return rest[:1] == b"["


def _read_rest(path, handle) -> bytes:
    try:
        return handle.read()
    except OSError as e:
        raise unreadable(path, e) from None


def _numbered_lines(path, handle) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, line)`` as ``bytes.splitlines(keepends=True)`` of the whole
    file would give them (``\n``, ``\r\n`` and a lone ``\r`` end a line), one line at a time."""
    lineno, offset = 0, 0
    while True:
        try:
            raw = handle.readline()  # up to and with b"\n"; a \r\n pair is never split
        except OSError as e:
            raise unreadable(path, e) from None
        if not raw:
            return
        for line in raw.splitlines(keepends=True):
            lineno += 1
            yield lineno, offset, line
            offset += len(line)


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
        records = json.loads(decode(data, path))
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

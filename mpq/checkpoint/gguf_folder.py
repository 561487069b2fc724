"""Reading back a GGUF folder mpq wrote (mpq.checkpoint.gguf_writer): ``OUT/model.gguf`` beside
README.md and the manifest, and no config.json (llama.cpp reads the model's configuration from
the GGUF itself).

Its provenance is the same ``mpq.*`` header strings every mpq format writes, stored as GGUF string
metadata; its records are the manifest (``mpq-manifest.json``: every file's size and sha256).
:func:`open_gguf_folder` gives what ``mpq inspect`` shows (the plan, the run's results, recipe,
source, calibration, sizes, each layer's bytes in the file); ``mpq verify`` checks the folder
(mpq.checkpoint.verify).  Reading uses the ``gguf`` package's reader (a memory map; nothing is
unpickled).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mpq.errors import ArtifactError, FormatError
from mpq.checkpoint.gguf_arch import arch_of, tensor_name
from mpq.checkpoint.native import header_plan
from mpq.config.plan import Plan
from mpq.config.run_log import RunLog

GGUF_FILE = "model.gguf"  # the name the writer gives it (mpq.checkpoint.gguf_writer)
FORMAT_NAME = "gguf"


def is_gguf_folder(path: str | Path) -> bool:
    """A folder holding ``model.gguf`` and no config.json (what ``--format gguf`` writes)."""
    path = Path(path)
    return (path / GGUF_FILE).is_file() and not (path / "config.json").exists()


def read_mpq_keys(file: Path) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """The ``mpq.*`` string metadata of a GGUF file, and every tensor's (GGUF type, bytes) by
    its GGUF name.  ArtifactError when the file does not parse."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ArtifactError(f"{file} is not a readable GGUF file: {exc}",
                            hint="re-write it with mpq convert NATIVE -o OUT --format gguf") \
            from None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("mpq.") and field.types == [gguf.GGUFValueType.STRING]:
            metadata[key] = field.contents()
    tensors = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors}
    return metadata, tensors


@dataclass
class GgufFolder:
    """An opened GGUF folder written by mpq: its mpq metadata, plan and run log, tensors."""

    path: Path
    metadata: dict[str, str]
    plan: Plan
    log: RunLog
    tensors: dict[str, tuple[str, int]]  # GGUF name → (type, bytes)

    @property
    def file(self) -> Path:
        return self.path / GGUF_FILE

    def json_field(self, key: str):
        value = self.metadata.get(f"mpq.{key}")
        return json.loads(value) if value else None

    def tensor_bytes(self) -> int:
        return self.file.stat().st_size

    def layer_tensors(self) -> dict[str, tuple[str, int]]:
        """Each quantized layer's GGUF tensor (type, bytes), by layer name (a tied head shares
        the embedding's tensor: listed under the embedding only)."""
        source = self.json_field("source") or {}
        blocks = max((layer.block for layer in self.plan.layers if layer.block is not None),
                     default=-1) + 1
        try:
            arch = arch_of({"model_type": source.get("model_type")})
        except FormatError:
            return {}
        out = {}
        for layer in self.plan.quantized():
            if self.plan.shared_with(layer.name) is not None:
                continue
            try:
                name = tensor_name(layer.weight_key, arch, blocks)
            except FormatError:
                continue
            if name in self.tensors:
                out[layer.name] = self.tensors[name]
        return out


def open_gguf_folder(path: str | Path) -> GgufFolder:
    """Open a GGUF folder mpq wrote; ArtifactError when it is not one this mpq reads."""
    path = Path(path)
    if not is_gguf_folder(path):
        raise ArtifactError(f"'{path}' is not a GGUF folder written by mpq (no {GGUF_FILE}, or "
                            "a config.json beside it)",
                            hint="pass the folder written by mpq quantize/convert --format gguf")
    metadata, tensors = read_mpq_keys(path / GGUF_FILE)
    if metadata.get("mpq.format") != FORMAT_NAME:
        raise ArtifactError(f"{path / GGUF_FILE} carries no mpq metadata (mpq.format "
                            f"{metadata.get('mpq.format')!r}): not written by mpq",
                            hint="pass a folder written by mpq quantize/convert --format gguf")
    plan, log = header_plan(metadata, path / GGUF_FILE)
    return GgufFolder(path=path, metadata=metadata, plan=plan, log=log, tensors=tensors)

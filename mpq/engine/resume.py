"""Resumable runs: each finished decoder block is persisted in a work directory beside the output.

Layout of ``<out>.mpq-work/``:

- ``run.json``: the run's fingerprint (model weights' sha256, recipe, calibration set's sha256,
  pipeline options, mpq version).  A rerun whose fingerprint differs is refused (ResumeError)
  instead of mixing blocks of two different runs.
- ``block-NNNNN.safetensors``: the block's tensors once it is done: ``state.<name>`` for every
  non-empty entry of its state dict (norm weights changed by transforms, biases, KV scales) and
  ``q.<layer>.<key>`` for the codec tensors of each quantized layer (mpq.checkpoint.native_codec).
- ``block-NNNNN.json``: per-layer results, the transforms' records and the sha256 of the
  block's tensor file.  It is written last (atomically), so a block counts as finished exactly
  when its JSON exists; a resumed run refuses a block whose file no longer has that sha256.

Blocks finish in order; the run resumes after the longest prefix of finished blocks.  The work
directory is removed once the artifact has been written.  Loading uses safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mpq import __version__
from mpq.errors import OutputError, ResumeError
from mpq.checkpoint.native import file_digest
from mpq.checkpoint.native_codec import decode, encode, split_layer_tensors
from mpq.config.plan import LayerPlan
from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.models.layout import install_layer_weight
from mpq.models.source import first_line
from mpq.numerics.base import QuantizedWeight

WORK_SUFFIX = ".mpq-work"
RUN_FILE = "run.json"
MODES = ("auto", "require", "fresh")


def work_dir_for(out_dir: Path) -> Path:
    """Where the work directory of a run writing ``out_dir`` lives (a sibling)."""
    return out_dir.parent / f"{out_dir.name}{WORK_SUFFIX}"


def digest(value) -> str:
    """sha256 of a JSON-serialisable value in canonical form."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class BlockRecord:
    """What a finished block left behind: its tensors and its JSON record."""

    state: dict[str, torch.Tensor]
    qweights: dict[str, QuantizedWeight]
    layer_results: dict[str, dict]
    transform_records: list[dict | None]


class Checkpoint:
    """The work directory of one run (see the module docstring)."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path = path
        self.fingerprint = fingerprint

    @classmethod
    def open(cls, out_dir: Path, fingerprint: dict, mode: str = "auto") -> "Checkpoint":
        """The work directory for ``out_dir``: reused when its fingerprint matches (``auto``,
        ``require``), started over (``fresh``).  ``require`` with no work directory, or a
        mismatching one without ``fresh``, is a ResumeError."""
        if mode not in MODES:
            raise ValueError(f"resume mode {mode!r} not in {MODES}")
        path = work_dir_for(out_dir)
        if path.exists() and mode == "fresh":
            shutil.rmtree(path)
        if not path.exists():
            if mode == "require":
                raise ResumeError(f"--resume: nothing to resume, '{path}' does not exist",
                                  hint="run without --resume to start a new run")
            return cls._create(path, fingerprint)
        stored = _read_json(path / RUN_FILE)
        if stored is None:  # killed before run.json landed: nothing finished yet
            shutil.rmtree(path)
            return cls._create(path, fingerprint)
        changed = sorted(key for key in set(stored) | set(fingerprint)
                         if stored.get(key) != fingerprint.get(key))
        if changed:
            raise ResumeError(
                f"work directory '{path}' belongs to a different run ({', '.join(changed)} "
                "changed since it was started)",
                hint="rerun with the original inputs to resume, or pass --no-resume to discard "
                     "it and start over")
        return cls(path, fingerprint)

    @classmethod
    def _create(cls, path: Path, fingerprint: dict) -> "Checkpoint":
        try:
            path.mkdir(parents=True)
            _write_atomic(path / RUN_FILE, json.dumps(fingerprint, indent=2, sort_keys=True))
        except OSError as exc:
            raise OutputError(f"cannot create the work directory '{path}': {exc}",
                              hint="check free disk space and permissions beside the output") \
                from exc
        return cls(path, fingerprint)

    def finished_blocks(self) -> int:
        """How many blocks, from block 0 on, are finished."""
        count = 0
        while (self._stem(count).with_suffix(".json")).is_file():
            count += 1
        return count

    def save_block(self, index: int, block: torch.nn.Module,
                   qweights: dict[str, QuantizedWeight], layers: list[LayerPlan],
                   layer_results: dict[str, dict], transform_records: list[dict | None]) -> None:
        """Persist block ``index`` (call once it is finished, weights final)."""
        tensors = {f"state.{name}": tensor.detach().to("cpu").contiguous()
                   for name, tensor in block.state_dict().items() if tensor.numel()}
        for layer in layers:
            for key, tensor in encode(qweights[layer.name]).items():
                tensors[f"q.{layer.name}.{key}"] = tensor
        record = {"layers": {layer.name: layer_results[layer.name] for layer in layers},
                  "transforms": transform_records}
        stem = self._stem(index)
        tmp = stem.with_suffix(".safetensors.tmp")
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, stem.with_suffix(".safetensors"))
            record["sha256"] = file_digest(stem.with_suffix(".safetensors"))["sha256"]
            _write_atomic(stem.with_suffix(".json"), json.dumps(record, sort_keys=True))
        except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own
            # The block is unfinished (no JSON record): drop its partial files, keep the
            # finished blocks so that a rerun after freeing space resumes after them.
            for partial in (tmp, stem.with_suffix(".safetensors"),
                            stem.with_suffix(".json.tmp")):
                partial.unlink(missing_ok=True)
            raise OutputError(f"cannot save block {index} in the work directory "
                              f"'{self.path}': {first_line(exc)}",
                              hint="free disk space beside the output and rerun: the finished "
                                   "blocks are kept and the run resumes after them") from exc

    def load_block(self, index: int, layers: list[LayerPlan]) -> BlockRecord:
        """Read back block ``index`` (ResumeError when its files are damaged)."""
        stem = self._stem(index)
        record = _read_json(stem.with_suffix(".json"))
        if not isinstance(record, dict):
            raise ResumeError(f"block {index} in '{self.path}' has no readable record",
                              hint="pass --no-resume to start over")
        try:
            digest = file_digest(stem.with_suffix(".safetensors"))["sha256"]
            tensors = load_file(str(stem.with_suffix(".safetensors")))
        except (OSError, SafetensorError) as exc:
            raise ResumeError(f"block {index} in '{self.path}' is unreadable: {exc}",
                              hint="pass --no-resume to start over") from exc
        if record.get("sha256") != digest:
            raise ResumeError(f"block {index} in '{self.path}' is not the file that was saved "
                              f"(sha256 {digest[:16]}…, recorded "
                              f"{str(record.get('sha256'))[:16]}…)",
                              hint="pass --no-resume to start over")
        state = {name[len("state."):]: t for name, t in tensors.items() if name.startswith("state.")}
        qweights = {}
        for layer in layers:
            local = split_layer_tensors({n[2:]: t for n, t in tensors.items()
                                         if n.startswith("q.")}, layer.name)
            qweights[layer.name] = decode(local, layer.scheme.weights, tuple(layer.shape),
                                          prefix=f"{layer.name}.")
        return BlockRecord(state=state, qweights=qweights, layer_results=record["layers"],
                           transform_records=record["transforms"])

    def block_file(self, index: int) -> Path:
        return self._stem(index).with_suffix(".safetensors")

    def state_names(self, index: int) -> list[str]:
        """The block-local names of the state tensors saved for block ``index``."""
        with self._open(index) as handle:
            return [name[len("state."):] for name in handle.keys() if name.startswith("state.")]

    def load_state_tensor(self, index: int, name: str) -> torch.Tensor:
        """One saved state tensor of block ``index`` (block-local name)."""
        with self._open(index) as handle:
            return handle.get_tensor(f"state.{name}")

    def load_qweight(self, index: int, layer: LayerPlan) -> QuantizedWeight:
        """One quantized layer of block ``index``, decoded from its file alone (the other
        layers' tensors are not read)."""
        prefix = f"q.{layer.name}."
        with self._open(index) as handle:
            local = {name[2:]: handle.get_tensor(name) for name in handle.keys()
                     if name.startswith(prefix)}
        local = split_layer_tensors(local, layer.name)
        return decode(local, layer.scheme.weights, tuple(layer.shape), prefix=f"{layer.name}.")

    def _open(self, index: int):
        try:
            return safe_open(str(self.block_file(index)), framework="pt")
        except (OSError, SafetensorError) as exc:
            raise ResumeError(f"block {index} in '{self.path}' is unreadable: {exc}",
                              hint="pass --no-resume to start over") from exc

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _stem(self, index: int) -> Path:
        return self.path / f"block-{index:05d}"


class ResumeHook(RunHook):
    """Restores the blocks an earlier run finished (``before_block``: weights, tensors changed by
    transforms, results, transform records; the next block's inputs are then recomputed exactly
    as the earlier run did) and saves each block this run finishes (``block_end``; rank 0)."""

    def __init__(self, checkpoint: Checkpoint, ranks=None) -> None:
        self.checkpoint = checkpoint
        finished = checkpoint.finished_blocks()
        if ranks is not None:  # rank 0's view of the work directory, before it writes to it
            finished = ranks.gather(finished)[0]
        self.finished = finished

    def before_block(self, run: RunState, turn: BlockTurn) -> None:
        if turn.index >= self.finished:
            return
        record = self.checkpoint.load_block(turn.index, turn.layers)
        run.events("block_resumed", index=turn.index, layers=len(turn.layers))
        block = turn.module
        block.to(run.device)
        current = block.state_dict()
        with torch.no_grad():
            for name, value in record.state.items():
                if name in current and current[name].numel():
                    owner, _, attr = name.rpartition(".")
                    tensor = getattr(block.get_submodule(owner) if owner else block, attr)
                    tensor.data = value.to(device=tensor.device, dtype=tensor.dtype)
        for layer in turn.layers:
            qw = record.qweights[layer.name]
            install_layer_weight(run.model, layer.name, layer.expert,
                                 qw.dequantize(torch.float32))
            run.log.result(layer.name).update(record.layer_results[layer.name])
            run.qweights[layer.name] = qw
        for records, applied in zip(run.log.transforms, record.transform_records):
            records.append(applied)
        turn.restored = True

    def block_end(self, run: RunState, turn: BlockTurn) -> None:
        if turn.restored or not run.writer:
            return
        self.checkpoint.save_block(
            turn.index, turn.module, run.qweights, turn.layers,
            {layer.name: run.log.result(layer.name) for layer in turn.layers},
            [records[-1] for records in run.log.transforms])


def run_fingerprint(*, model_sha256: str, recipe: dict, calibration_sha256: str | None,
                    options: dict) -> dict:
    """The fields a resumed run must share with the run that wrote the work directory
    (``options``: a flat dict of JSON scalars)."""
    return {"mpq_version": __version__, "model": model_sha256, "recipe": digest(recipe),
            "calibration": calibration_sha256, "options": options}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None

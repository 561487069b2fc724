"""Streaming: quantize a model without ever holding all of it in memory.

The model is built as a meta skeleton (mpq.models.source.build_skeleton); only the tensors outside the
decoder blocks (embeddings, final norm, head, buffers) are read up front.  Each block's tensors
are read from the source safetensors shards (through ``model.safetensors.index.json`` when
sharded) when the engine reaches it (:meth:`BlockStreamer.load`, finiteness checked then),
in the dtype ``load_model`` would give them; once the block is finished and saved in the resume
work directory its parameters go back to the meta device (:meth:`BlockStreamer.release`).

The artifact is then written from the work directory: :func:`streamed_state` gives an
ArtifactState whose quantized weights and finished blocks' dense tensors are read from the
block files on access, and the writers produce one layer's tensors at a time
(mpq.checkpoint.lazy, mpq.checkpoint.safetensors_writer).  The bytes written are those of the
whole-model path (tests/engine/test_streaming.py).

Peak memory is then about one block, the calibration activations and the tensors outside the
blocks, flat in depth (benchmarks/rss_vs_depth.py).  Not streamed (:func:`streaming_blocker` says why):
recipes with ``rotation:`` (QuaRot rotates the embedding and every block together), layers
outside the blocks that need calibration statistics (the whole model runs for them), and
checkpoints whose tensor names or dtypes transformers would remap on loading.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mpq.models.layout import ModelLayout, blocks_of
from mpq.errors import ModelError, corrupt_weights
from mpq.checkpoint.lazy import LazyTensors
from mpq.checkpoint.state import ArtifactState, hf_config, weight_keys
from mpq.models.source import (build_skeleton, load_config, read_config, source_weight_map)
from mpq.config.plan import Plan
from mpq.config.run_log import RunLog
from mpq.numerics.base import QuantizedWeight
from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.engine.resume import Checkpoint
from mpq.memory import release_free_memory

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(path: Path, dtype: str | torch.dtype, weight_map: dict[str, Path]
                  ) -> torch.dtype:
    """The floating dtype load_model (from_pretrained) gives: ``dtype``; for ``auto`` the
    config's ``dtype``/``torch_dtype``, else the checkpoint's first floating tensor's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if str(dtype) not in _DTYPES:
            raise ModelError(f"unknown dtype '{dtype}'", hint="use auto, float32, bfloat16 or "
                             "float16")
        return _DTYPES[str(dtype)]
    config = read_config(path)
    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and name.replace("torch.", "") in _DTYPES:
        return _DTYPES[name.replace("torch.", "")]
    for key, file in weight_map.items():
        with safe_open(str(file), framework="pt") as handle:
            if key in handle.keys():
                sliced = handle.get_slice(key)
                dt = _safetensors_dtype(sliced.get_dtype())
                if dt is not None and dt.is_floating_point:
                    return dt
    return torch.float32


def _safetensors_dtype(name: str) -> torch.dtype | None:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F64": torch.float64}.get(name)


def _split(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


class BlockStreamer(RunHook):
    """Reads a model's tensors from its source files: the ones outside the blocks up front
    (:meth:`load_resident`), each block's when its turn comes (:meth:`load`, at the engine's
    ``before_block``), and sends a finished block's parameters back to meta (:meth:`release`,
    at ``block_end``, once the block is saved in the work directory)."""

    def __init__(self, source: Path, model: nn.Module, layout: ModelLayout,
                 weight_map: dict[str, Path]):
        self.source = source
        self.model = model
        self.layout = layout
        self.weight_map = weight_map
        state = model.state_dict(keep_vars=True)
        self.shapes = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        self.tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        self.resident_names = [name for name in state if self.block_of(name) is None]
        self.loaded_blocks: set[int] = set()

    def block_of(self, name: str) -> int | None:
        prefix = self.layout.blocks_path + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])

    def block_names(self, index: int) -> list[str]:
        prefix = f"{self.layout.blocks_path}.{index}."
        return [name for name in self.shapes if name.startswith(prefix)]

    def _read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file, keys in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for key in keys:
                        yield key, handle.get_tensor(key)
            except (OSError, SafetensorError) as exc:
                raise corrupt_weights(self.source, exc) from exc

    def _install(self, names: list[str]) -> None:
        wanted = [n for n in names if n in self.weight_map]
        for name, tensor in self._read(wanted):
            shape, dtype = self.shapes[name]
            if tuple(tensor.shape) != shape:
                raise ModelError(f"{self.source}: tensor '{name}' has shape "
                                 f"{tuple(tensor.shape)}, the config expects {shape}",
                                 hint="the weights do not match config.json")
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ModelError(f"{self.source}: tensor '{name}' holds NaN or Inf values",
                                 hint="the source checkpoint is damaged; quantizing it would too")
            owner, attr = _split(name)
            module = self.model.get_submodule(owner)
            if attr in module._parameters:
                old = module._parameters[attr]
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:
                module._buffers[attr] = tensor

    def load_resident(self) -> None:
        """Read every tensor outside the blocks; tie the tied ones as from_pretrained does."""
        self._install(self.resident_names)
        if self.tied:
            self.model.tie_weights()

    def load(self, index: int, block: nn.Module) -> None:
        """Read block ``index``'s tensors from the source files (ModelError for NaN/Inf)."""
        if index in self.loaded_blocks:
            return
        self._install(self.block_names(index))
        self.loaded_blocks.add(index)

    def release(self, index: int, block: nn.Module) -> None:
        """Send block ``index``'s parameters back to meta (its state is in the work directory)."""
        prefix = f"{self.layout.blocks_path}.{index}."
        for name, param in list(block.named_parameters(recurse=True)):
            owner, attr = _split(name)
            module = block.get_submodule(owner)
            shape, dtype = self.shapes.get(prefix + name, (tuple(param.shape), param.dtype))
            module._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=dtype,
                                                                device="meta"),
                                                    requires_grad=param.requires_grad)
        self.loaded_blocks.discard(index)

    def before_block(self, run: RunState, turn: BlockTurn) -> None:
        self.load(turn.index, turn.module)

    def block_end(self, run: RunState, turn: BlockTurn) -> None:
        """Drop the saved block's weights (back to meta) and its QuantizedWeights."""
        for layer in turn.layers:
            run.qweights.pop(layer.name, None)
        self.release(turn.index, turn.module)
        release_free_memory()

    def resident_bytes(self) -> int:
        """Bytes of the blocks' parameters that are not on meta (tests, diagnostics)."""
        blocks = blocks_of(self.model, self.layout)
        return sum(p.numel() * p.element_size() for p in blocks.parameters()
                   if p.device.type != "meta")


def streaming_blocker(model: nn.Module, weight_map: dict[str, Path], layout: ModelLayout,
                      plan: Plan, recipe, wanted: dict) -> str | None:
    """Why this run cannot stream (None: it can)."""
    if recipe.rotation is not None:
        return "rotation needs the whole model"
    outside = [l.name for l in plan.quantized() if l.block is None and l.name in wanted]
    if outside:
        return f"{outside[0]} (outside the blocks) needs statistics from the whole model"
    if getattr(model, "_keep_in_fp32_modules", None):
        return "the model keeps some modules in fp32"
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    prefix = layout.blocks_path + "."
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in weight_map:
            continue
        if name in tied and not name.startswith(prefix):
            continue
        if isinstance(tensor, nn.Parameter):
            return f"tensor '{name}' is not stored under that name in the source files"
    return None


def build_streamed(source: Path, dtype: str | torch.dtype = "auto"
                   ) -> tuple[nn.Module, dict[str, Path]]:
    """The meta skeleton of the model in ``source`` (nothing read yet) and its weight map."""
    weight_map = source_weight_map(source)
    resolved = resolve_dtype(source, dtype, weight_map)
    model = build_skeleton(load_config(source), dtype=resolved)
    return model.eval(), weight_map


class CheckpointQWeights(Mapping):
    """Layer name → QuantizedWeight: blocks' layers decoded from the work directory on
    access, the others (e.g. a quantized lm_head) from memory."""

    def __init__(self, plan: Plan, checkpoint: Checkpoint, in_memory: dict[str, QuantizedWeight]):
        self.checkpoint = checkpoint
        self.in_memory = in_memory
        self.layers = {l.name: l for l in plan.quantized()}
        self.names = [l.name for l in plan.quantized()
                      if l.block is not None or l.name in in_memory]

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name in self.in_memory:
            return self.in_memory[name]
        layer = self.layers.get(name)
        if layer is None or layer.block is None:
            raise KeyError(name)
        return self.checkpoint.load_qweight(layer.block, layer)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def streamed_dense(model: nn.Module, layout: ModelLayout, dropped: set[str],
                   checkpoint: Checkpoint) -> LazyTensors:
    """The artifact's dense tensors in model.state_dict() order (tied tensors once), without
    those in ``dropped`` (the quantized layers' weights): those outside the blocks from memory,
    the blocks' from their work-directory files on access."""
    dense = LazyTensors()
    seen: set[int] = set()
    prefix = layout.blocks_path + "."
    saved: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in dropped:
            continue
        if name.startswith(prefix):
            index_text, local = name[len(prefix):].split(".", 1)
            index = int(index_text)
            if index not in saved:
                saved[index] = set(checkpoint.state_names(index))
            if local in saved[index]:
                dense.add(lambda index=index, local=local, name=name:
                          {name: checkpoint.load_state_tensor(index, local)})
            continue
        if id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        dense.add_tensor(name, tensor.detach())
    return dense


def streamed_state(model: nn.Module, layout: ModelLayout, plan: Plan, log: RunLog,
                   checkpoint: Checkpoint,
                   in_memory: dict[str, QuantizedWeight], *, provenance: dict,
                   files: dict) -> ArtifactState:
    """The ArtifactState of a streamed run, read from the work directory on access."""
    qweights = CheckpointQWeights(plan, checkpoint, in_memory)
    return ArtifactState(plan=plan, log=log, qweights=qweights,
                         dense=streamed_dense(model, layout, weight_keys(plan, qweights), checkpoint),
                         config=hf_config(model), provenance=provenance, files=files)

"""The native ``mpq`` format (mpq.checkpoint.native): lossless, every scheme mpq can produce."""
from __future__ import annotations

import torch

from mpq.checkpoint.lazy import LazyTensors
from mpq.checkpoint.native import FORMAT_NAME
from mpq.checkpoint.native_codec import encode
from mpq.checkpoint.state import ArtifactState
from mpq.checkpoint.writers import WRITERS, FolderContents, dense_group, mpq_config_key
from mpq.config.plan import Plan


def native_tensors(state: ArtifactState) -> LazyTensors:
    """The dense tensors, each quantized weight's codec tensors under ``<layer>.``, and
    ``<layer>.input_scale`` (fp32 [1]) for layers with static input activation scales
    (produced layer by layer for a streamed state, mpq.checkpoint.writers.dense_group).  A
    tied head that shares the embedding's quantized tensor (mpq.config.tying) has none of its
    own: the embedding's are stored once."""
    tensors = dense_group(state)
    for name in state.qweights:
        if state.plan.shared_with(name) is not None:
            continue
        tensors.add(lambda name=name: {f"{name}.{local}": tensor
                                       for local, tensor in encode(state.qweights[name]).items()})
    for layer in state.plan.quantized():
        input_scale = state.log.input_scale(layer.name)
        if input_scale is not None:
            tensors.add_tensor(f"{layer.name}.input_scale",
                               torch.tensor([input_scale], dtype=torch.float32))
    return tensors


class NativeWriter:
    """mpq's own format: lossless for every scheme; loaded by mpq.load and mpq eval."""

    name = FORMAT_NAME
    online_rotations = True  # mpq.load installs them
    load_hint = 'import mpq; model = mpq.load("path/to/this/folder")'

    def unsupported(self, plan: Plan) -> list[str]:
        return []

    def preflight(self, plan: Plan) -> list[str]:
        return []

    def contents(self, state: ArtifactState) -> FolderContents:
        config = {**state.config, "mpq": mpq_config_key(state, self.name)}
        return FolderContents(tensors=native_tensors(state), config=config,
                              code_keys=("qweight", "weight"))


NATIVE = WRITERS.register(FORMAT_NAME)(NativeWriter())

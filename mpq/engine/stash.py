"""Keeping a pass's per-input activations in one contiguous allocation.

A calibration pass produces, for every input batch, a tensor that must outlive the pass (the next
block's inputs, a recorded output or tail input for replay) among many short-lived ones.  Kept
where they were born, the long-lived tensors pin the allocator's heap between freed temporaries
and the process's resident memory grows well past the data it holds.  Copying each into a slice
of one buffer sized for the whole pass (large enough to be its own mapping, given back to the OS
as a whole) keeps the heap to the working set of one batch.  The copy is exact.

With ``device`` the buffer lives there whatever the tensors' device: offloaded activations
(``mpq quantize --offload-activations``) are computed on the GPU and kept in host memory.
"""
from __future__ import annotations

import torch


class Stash:
    """Copies of a sequence of tensors whose sizes are proportional to ``weights`` (e.g. the
    tokens of each input batch), in one buffer allocated on first use and sized from the first
    tensor, on ``device`` (default: the first tensor's).  A tensor that does not fit (other
    dtype, or sizes not proportional) is kept as it is (moved to ``device`` when one is given).
    """

    def __init__(self, weights: list[int], device: torch.device | str | None = None) -> None:
        self.weights = weights
        self.device = torch.device(device) if device is not None else None
        self.buffer: torch.Tensor | None = None
        self.used = 0

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` inside the buffer (or ``tensor`` itself when it does not fit)."""
        size = tensor.numel()
        if self.buffer is None:
            if not self.weights or size % self.weights[0]:
                return self._as_is(tensor)
            self.buffer = torch.empty(size // self.weights[0] * sum(self.weights),
                                      dtype=tensor.dtype, device=self.device or tensor.device)
        if (tensor.dtype != self.buffer.dtype
                or (self.device is None and tensor.device != self.buffer.device)
                or self.used + size > self.buffer.numel()):
            return self._as_is(tensor)
        view = self.buffer[self.used:self.used + size].view(tensor.shape)
        view.copy_(tensor)
        self.used += size
        return view

    def _as_is(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.device is None else tensor.to(self.device)

    def keep_output(self, output):
        """``keep`` applied to a module output's tensor (itself, or a tuple's first element)."""
        if isinstance(output, torch.Tensor):
            return self.keep(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.keep(output[0]), *output[1:])
        return output

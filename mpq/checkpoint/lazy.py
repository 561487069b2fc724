"""Tensors produced on demand, so that a writer never holds a whole artifact in memory.

A :class:`LazyTensors` is a read-only mapping name → tensor built from *groups*: a group is a
function returning some named tensors (one layer's codec tensors, one dense tensor read from a
resume work directory).  Each group is run once when added, to learn its names, dtypes and
shapes (:meth:`LazyTensors.specs`, meta tensors), and again whenever one of its tensors is
asked for; the last group produced is cached, so reading the names of one group in a row runs it
once.  With ``resident=True`` the produced tensors are kept instead (for states already in
memory: nothing is computed twice).  Otherwise the allocator's free pages are returned to the
OS after each group (mpq.memory.release_free_memory): decoding group after group leaves glibc's
heap fragmented, and the resident set would grow with the number of groups.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator

import torch

from mpq.memory import release_free_memory

Group = Callable[[], dict[str, torch.Tensor]]


class LazyTensors(Mapping):
    """name → tensor, produced group by group (see the module docstring).  Keys iterate in the
    order they were added."""

    def __init__(self, resident: bool = False):
        self.resident = resident
        self._groups: list[Group] = []
        self._where: dict[str, int] = {}
        self._specs: dict[str, torch.Tensor] = {}
        self._kept: dict[str, torch.Tensor] = {}
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    def add(self, produce: Group) -> dict[str, torch.Tensor]:
        """Add a group; returns its tensors (produced once now, e.g. for side results)."""
        tensors = produce()
        index = len(self._groups)
        self._groups.append(produce)
        for name, tensor in tensors.items():
            self._kept.pop(name, None)  # a later group's tensor replaces an earlier one
            self._where[name] = index
            self._specs[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            if self.resident:
                self._kept[name] = tensor
        if not self.resident:
            release_free_memory()
        return tensors

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor already in memory (kept as is)."""
        self._groups.append(lambda: {name: tensor})
        self._where[name] = len(self._groups) - 1
        self._specs[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        self._kept[name] = tensor

    def resident_names(self) -> set[str]:
        """The names whose tensors are held in memory (never recomputed)."""
        return set(self._kept)

    def specs(self) -> dict[str, torch.Tensor]:
        """Meta tensors with each tensor's dtype and shape (sizes without producing anything)."""
        return dict(self._specs)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._kept:
            return self._kept[name]
        index = self._where[name]
        if self._cached is None or self._cached[0] != index:
            self._cached = None
            release_free_memory()
            self._cached = (index, self._groups[index]())
        return self._cached[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def release(self) -> None:
        """Drop the cached group."""
        self._cached = None


def specs_of(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Tensors whose dtype and shape stand for ``tensors``' (meta ones for a LazyTensors)."""
    return tensors.specs() if isinstance(tensors, LazyTensors) else tensors

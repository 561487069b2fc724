"""Multi-process quantization under ``torchrun`` (torch.distributed, gloo backend).

``torchrun --nproc-per-node N --no-python mpq quantize ...`` starts N processes; each one sees
``WORLD_SIZE``/``RANK`` in its environment and :func:`init_from_env` joins them into one group.
The work is split two ways:

- **calibration**: the calibration batches (mpq.engine.runner.batch_samples) are split into N
  contiguous shares (:meth:`Ranks.share`); each rank runs the blocks on its share only, and the
  statistics are combined after each collection pass (each collector's ``reduce``, called from
  mpq.engine.collect.results): sums all-reduced, maxima all-reduced, row samples gathered in rank order;
- **solves**: within each step, layer i is quantized by rank ``i mod N``
  (:meth:`Ranks.solve_step`) and its QuantizedWeight is sent to the others, which install the
  same dequantized weights.

Rank 0 writes the work directory and the artifact; the others only compute.  The artifact is
the one a single process writes, byte for byte, when every process runs with the same number of
threads (tests/engine/test_distributed.py): sums of statistics are accumulated in float64 from float32
per-batch terms, which makes them exact, hence independent of how the batches are split (and of
the order a collective adds them in), except for terms spanning more than about 2^25 in
magnitude, where the last bit of a float32 statistic could differ (not seen in practice).

Backends: ``gloo`` for CPU tensors and objects; where CUDA and NCCL are available the group is
``cpu:gloo,cuda:nccl``, so statistics held on a GPU (``--device cuda``) are reduced by NCCL on
the GPU, and each process takes the GPU of its ``LOCAL_RANK`` (``--device cuda`` means
``cuda:LOCAL_RANK``; :func:`rank_device`).  The GPU path has not been run on GPUs yet.

Not supported across processes yet (refused with a RecipeError): recipes with transforms (AWQ,
SmoothQuant) and KV-cache quantization.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from mpq.errors import CalibrationError, ModelError, RecipeError

T = TypeVar("T")
_CURRENT: "Ranks | None" = None


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-process run."""

    rank: int
    world: int

    @property
    def writer(self) -> bool:
        """Rank 0 writes the work directory, the artifact and the progress."""
        return self.rank == 0

    def share(self, items: Sequence[T], weights: Sequence[float] | None = None) -> list[T]:
        """This rank's contiguous share of ``items`` (ranks in order cover them in order), split
        so that the shares' summed ``weights`` (e.g. tokens per calibration batch; default 1
        each) are as even as whole items allow, each share holding at least one item."""
        n = len(items)
        if n < self.world:
            raise CalibrationError(
                f"{n} calibration batches cannot be split across {self.world} processes",
                hint="pass more --num-samples (or a smaller --calib-batch-tokens), or run fewer "
                     "processes")
        bounds = split_points([1.0] * n if weights is None else list(weights), self.world)
        return list(items[bounds[self.rank]:bounds[self.rank + 1]])

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (a new tensor on ``tensor``'s device)."""
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if tensor.is_cuda and _has_cuda_backend():
            out = tensor.detach().clone().contiguous()
            dist.all_reduce(out, op=op)
            return out
        host = tensor.detach().to("cpu", copy=True).contiguous()
        dist.all_reduce(host, op=op)
        return host.to(tensor.device)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def owns(self, i: int) -> bool:
        """Whether work item number ``i`` is this rank's (i mod N)."""
        return i % self.world == self.rank

    def solve_step(self, items: Sequence[T], solve: Callable[[T], object], first: int = 0
                   ) -> list:
        """Run ``solve`` on this rank's items of ``items`` (item i is work item ``first + i``,
        :meth:`owns`) and return every item's result, in order, on every rank."""
        mine = {i: solve(item) for i, item in enumerate(items) if self.owns(first + i)}
        merged: dict[int, object] = {}
        for part in self.gather(mine):
            merged.update(part)
        return [merged[i] for i in range(len(items))]


def split_points(weights: Sequence[float], parts: int) -> list[int]:
    """``parts + 1`` indices cutting ``weights`` (at least ``parts`` of them) into contiguous
    runs of near-equal sums: run r takes the items whose midpoint falls in its r-th of the
    total; every run keeps at least one item."""
    n, total = len(weights), float(sum(weights))
    mids, cum = [], 0.0
    for w in weights:
        mids.append(cum + w / 2)
        cum += w
    bounds = [0]
    for r in range(1, parts):
        start = sum(1 for m in mids if m < r * total / parts)
        bounds.append(min(max(start, bounds[-1] + 1), n - (parts - r)))
    bounds.append(n)
    return bounds


def current() -> Ranks | None:
    """The run's Ranks when this process is one of several, else None."""
    return _CURRENT


def init_from_env(timeout_minutes: float = 60.0) -> Ranks | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), once; None otherwise."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend_for_host(), timeout=timedelta(minutes=timeout_minutes))
    _CURRENT = Ranks(rank=dist.get_rank(), world=dist.get_world_size())
    return _CURRENT


def backend_for_host() -> str:
    """``cpu:gloo,cuda:nccl`` where CUDA and NCCL are available, else ``gloo``."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _has_cuda_backend() -> bool:
    return any(d.type == "cuda" for d in dist.group.WORLD._device_types)


def rank_device(device: torch.device, local_rank: int | None = None,
                gpus: int | None = None) -> torch.device:
    """The device this process runs on: under torchrun, ``cuda`` without an index becomes
    ``cuda:LOCAL_RANK`` (ModelError when there are fewer GPUs than processes on this machine);
    anything else is kept."""
    if device.type != "cuda" or device.index is not None:
        return device
    if local_rank is None:
        if os.environ.get("LOCAL_RANK") is None:
            return device
        local_rank = int(os.environ["LOCAL_RANK"])
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if local_rank >= gpus:
        raise ModelError(f"process {local_rank} on this machine has no GPU of its own: "
                         f"{gpus} visible",
                         hint="run at most one process per GPU (torchrun --nproc-per-node "
                              f"{gpus}), or give --device cuda:N explicitly")
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(timeout_minutes: float = 60.0) -> Iterator[Ranks | None]:
    """Join torchrun's process group for the body (None in a single process) and leave it.

    On success every rank waits for the others (rank 0 writes last) before the group is
    destroyed; a process that exits with the group still alive can abort in gloo's threads
    ("terminate called without an active exception").  On an error the group is destroyed
    without waiting: torchrun stops the other ranks."""
    ranks = init_from_env(timeout_minutes)
    try:
        yield ranks
    except BaseException:
        _leave(ranks, wait=False)
        raise
    _leave(ranks, wait=True)


def _leave(ranks: Ranks | None, wait: bool) -> None:
    global _CURRENT
    if ranks is None:
        return
    if wait:
        ranks.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def check_supported(plan) -> None:
    """RecipeError for what multi-process runs cannot do yet."""
    if plan.transforms:
        raise RecipeError(f"transform '{plan.transforms[0].type}' is not supported across "
                          "several processes yet",
                          hint="run it in one process (without torchrun)")
    if plan.kv_cache:
        raise RecipeError("kv_cache quantization is not supported across several processes yet",
                          hint="run it in one process (without torchrun)")
    expert = next((layer for layer in plan.quantized() if layer.expert is not None), None)
    if expert is not None:
        raise RecipeError(f"fused MoE experts ({expert.name}) are not supported across several "
                          "processes yet", hint="run it in one process (without torchrun)")

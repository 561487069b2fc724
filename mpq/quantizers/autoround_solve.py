"""Signed gradient descent over rounding offsets and clipping factors (SignRound, arXiv:2309.05516).

:func:`sign_descent` is the optimisation loop only: the caller supplies ``step_loss``, which
computes the loss of one mini-batch of calibration samples and its gradients (backward).  As in
the published method: each iteration draws a mini-batch of samples (a seeded shuffle, reshuffled
when used up), every parameter moves by −lr·sign(grad) with lr decaying linearly to 0 over the
iterations, the parameters are projected back to their ranges, and the parameters of the
iteration with the lowest mini-batch loss are the result (best-loss tracking).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mpq.quantizers.autoround_grid import TunedIntWeight
from mpq.quantizers.autoround_options import AutoRoundOptions


@dataclass(frozen=True)
class DescentResult:
    """Losses of the tuning: ``init_loss`` (iteration 0, the round-to-nearest start),
    ``best_loss`` at ``best_iter`` (whose parameters were kept); NaN when ``iters`` is 0."""

    init_loss: float
    best_loss: float
    best_iter: int
    iters: int


class IndexSampler:
    """Batches of sample indices from seeded shuffles of range(n)."""

    def __init__(self, n: int, batch: int, generator: torch.Generator):
        self.n, self.batch, self.generator = n, min(batch, n), generator
        self.order: list[int] = []

    def next(self) -> list[int]:
        if len(self.order) < self.batch:
            self.order = torch.randperm(self.n, generator=self.generator).tolist()
        taken, self.order = self.order[:self.batch], self.order[self.batch:]
        return taken


def sign_descent(weights: Sequence[TunedIntWeight], step_loss: Callable[[list[int]], float],
                 num_items: int, per_step: int, opts: AutoRoundOptions,
                 seed: int) -> DescentResult:
    """Tune ``weights`` in place (their best parameters are left in them).

    Each iteration draws ``per_step`` of the ``num_items`` calibration items (samples, or
    batches of them); ``step_loss(indices)`` returns their loss (a float) after accumulating its
    gradients into the weights' parameters (the grads are cleared before each call).
    """
    groups = [(p, opts.lr) for w in weights for p in w.rounding]
    groups += [(p, opts.minmax_lr) for w in weights for p in w.clipping]
    params = [p for p, _ in groups]
    if opts.iters == 0 or num_items == 0:
        return DescentResult(float("nan"), float("nan"), 0, 0)
    generator = torch.Generator().manual_seed(seed)
    sampler = IndexSampler(num_items, per_step, generator)
    best_loss, best_iter, best = float("inf"), 0, [p.detach().clone() for p in params]
    init_loss = float("nan")
    for i in range(opts.iters):
        for p in params:
            p.grad = None
        loss = step_loss(sampler.next())
        if i == 0:
            init_loss = loss
        if loss < best_loss:
            best_loss, best_iter = loss, i
            best = [p.detach().clone() for p in params]
        decay = 1.0 - i / opts.iters
        with torch.no_grad():
            for p, lr in groups:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-lr * decay)
        for w in weights:
            w.project()
    with torch.no_grad():
        for p, value in zip(params, best):
            p.copy_(value)
    return DescentResult(init_loss, best_loss, best_iter, opts.iters)

"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323) as a pure tensor solve: weight [N, K] + Hessian [K, K] → Q.

Algorithm (the IST-DASLab reference ``fasterquant``, re-derived):

1. Dead columns (diag H == 0): their row/column of H is zeroed, H[i, i] = 1 and W[:, i] = 0, so
   they quantize to exactly 0 and receive no error feedback.
2. act_order: columns are processed by descending diag H (``torch.sort(..., stable=True)``: ties
   keep the original column order, lower index first); H is permuted alike; Q is un-permuted.
3. U = upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H).  When a Cholesky fails
   (``cholesky_ex`` info ≠ 0, or a non-finite factor) damp is retried at max(10·damp, 1e-3) capped
   at ``max_damp``; once ``max_damp`` itself fails a :class:`SchemeError` is raised.
4. Columns left to right in blocks of ``block_size``: q = grid(w), e = (w − q)/U[i, i], the rest
   of the block gets w_j −= e·U[i, j]; after the block W[:, end:] −= E · U[block, end:] (lazy
   batch update).  The reported loss is Σ e²/2 = Σ (w − q)²/U[i, i]²/2 over the whole matrix,
   the reference's ``Losses`` sum.

Error feedback (GPTAQ, Li et al., "GPTQv2: Efficient Finetuning-Free Quantization with
Asymmetric Calibration", ICML 2025): the target becomes the float model's layer output,
||W X̃ − Q X||² with X̃ the layer's inputs in the float model and X those in the partially
quantized one; = ||(W − Q) X + W ΔX||², ΔX = X̃ − X.  With D = (2/T)·ΔX Xᵀ (the ``cross``
argument, scaled like H) and U from step 3, the closed form lets the columns processed after
column i compensate w_i's share of the inherited error: W ← W + α·W·triu₁(D Uᵀ)·U, triu₁ the
strictly upper triangle in processing order (act-order permutes D like H).  It is applied once,
before step 4, with the float weights W (the paper's reference code applies the same terms
column by column with the running weights; the difference is of second order), and dead
columns get none of it.  Without the mask and with α = 1 the shift would move W to the plain
least-squares optimum W X̃ Xᵀ H⁻¹; the paper's α (0.25 by default) damps the correction.

Grids: the number format's ``gptq_columns`` (a :class:`mpq.numerics.format.ColumnGrid`; formats
without one are refused).  All arithmetic is fp32 on the weight's device; codes are exactly those
chosen in the solve and ``QuantizedWeight.dequantize()`` reproduces Q bit for bit.  The built-in
grids:

- ``int`` 2–8 bits, sym/asym, tensor/channel/group.  Tensor/channel params come from the whole
  (dead-zeroed) W up front.  Groups: params of a group are computed by ``int_params`` from the
  *current* (error-updated) weights of its columns when the solve reaches its first column.  Unlike
  the reference, pending updates from earlier columns of the same block are included, so the result
  does not depend on ``block_size`` (the reference reads the block-start W for groups that start
  mid-block).  ``static_groups``: every group's params from the original W in original order.
  act_order without static groups forms groups in processing order, so g_idx[perm[p]] = p // gs
  (non-monotonic); with static groups g_idx = k // gs.
  ``clip_search``: wherever int params are computed (up front or per group), they come from
  :func:`mpq.quantizers.clip_search.searched_int_params` with the columns' diag H (after the
  dead-column fix) as error weights, instead of ``int_params``' min-max.
- ``fp8_e4m3`` / ``fp8_e5m2`` tensor/channel: scale fixed up front from the absmax of W.
  (``block`` granularity and formats without a grid, e.g. mxfp4, mxfp8 and nvfp4, are refused by
  :func:`check_supported`.)
- ``nf4`` (blocks of 64): each block's absmax from the current weights at its first column, like
  int groups; codes = nearest table entry.  Not with double_quant; nf4 and fp8 not with act_order.
- the GGUF block types (legacy, K-quants, iq4_nl): a block's parameters from the current weights
  at its first column, or all up front with static groups; act_order only with static groups
  (their blocks are consecutive columns and no g_idx is stored); ``clip_search`` passes the
  columns' diag H to the format's own weighted parameter search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mpq.errors import SchemeError
from mpq.numerics.base import NUMBER_FORMATS
from mpq.numerics.format import format_names
from mpq.quantizers.clip_search import searched_int_params
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.numerics.args import WeightArgs

DAMP_FLOOR = 1e-3  # first retry when the requested damp is 0


@dataclass
class GPTQResult:
    """Output of :func:`gptq_solve`, in the original column order.

    ``q`` fp32 [N, K] is the quantized matrix; ``codes``/``scale``/``zero``/``g_idx`` are laid out
    as :class:`mpq.numerics.base.QuantizedWeight` expects.  ``loss`` = Σ (w − q)²/U[i,i]²/2 (see the
    module docstring); ``damp`` is the damping fraction used after ``damp_retries`` retries.
    """

    q: torch.Tensor
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    loss: float
    damp: float
    damp_retries: int
    feedback_shift: float | None = None  # ‖shift‖/‖W‖ of the error feedback, when applied


def _formats(option: str) -> str:
    """'the int format' / 'the a, b formats': those whose GPTQ grid takes ``option``."""
    names = format_names(lambda f: f.gptq_columns is not None
                         and getattr(f.gptq_columns, option))
    return f"the {', '.join(names)} format" + ("s" if len(names) > 1 else "")


def check_supported(args: WeightArgs, act_order: bool, static_groups: bool,
                    clip_search: bool = False) -> None:
    """Raise SchemeError for weight args / option combinations the solve cannot produce."""
    grid = NUMBER_FORMATS.get(args.format).gptq_columns
    if grid is None:
        supported = format_names(lambda f: f.gptq_columns is not None)
        raise SchemeError(f"gptq does not support the {args.format} format (it supports "
                          f"{', '.join(supported)})", hint="use algorithm: rtn")
    if args.granularity == "block":
        raise SchemeError(f"gptq does not support {args.format} with granularity 'block'",
                          hint="use granularity: channel, or algorithm: rtn")
    if clip_search and not grid.clip_search:
        raise SchemeError(f"gptq clip_search supports {_formats('clip_search')} only, not "
                          f"{args.format}", hint="set clip_search: false")
    grid.check(args)
    if act_order and not grid.act_order:
        if not grid.static_act_order:
            raise SchemeError(f"gptq act_order supports {_formats('act_order')} and, with "
                              f"static_groups, {_formats('static_act_order')} only, not "
                              f"{args.format}", hint="set act_order: false")
        if not static_groups:
            raise SchemeError(f"gptq act_order on {args.format} needs static_groups: true (its "
                              "blocks are consecutive columns; static groups keep every column "
                              "in its block)", hint="add static_groups: true")
    if static_groups and args.granularity != "group":
        raise SchemeError("gptq static_groups needs granularity 'group'",
                          hint="remove static_groups")


def inverse_cholesky(h: torch.Tensor, damp: float, max_damp: float
                     ) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, raising damp until it exists.

    Returns (U, damp used, number of retries).  ``h`` is not modified.
    """
    mean_diag = h.diagonal().mean()
    retries = 0
    while True:
        hd = h.clone()
        hd.diagonal().add_(damp * mean_diag)
        low, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper, damp, retries
        nxt = min(max(10.0 * damp, DAMP_FLOOR), max_damp)
        if nxt <= damp:
            raise SchemeError(
                f"gptq: the Hessian is not positive definite even with damp={damp:g} "
                f"after {retries} retries (max_damp={max_damp:g})",
                hint="raise damp or max_damp, use more calibration samples, "
                     "or check the calibration inputs for NaN/inf")
        damp, retries = nxt, retries + 1


def prepare_hessian(hessian: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copy of ``hessian`` on w's device with dead columns fixed; also zeroes them in ``w``.

    Returns (H, dead mask [K]).
    """
    k = w.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise SchemeError(f"gptq: Hessian shape {tuple(hessian.shape)} does not match the weight's "
                          f"input dimension {k}",
                          hint="the Hessian must be [K, K] for a weight [N, K]")
    h = hessian.detach().to(device=w.device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise SchemeError("gptq: the Hessian has NaN/inf values",
                          hint="check the calibration inputs for NaN/inf (e.g. overflow in fp16)")
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, :] = 0
        h[:, dead] = 0
        h.diagonal()[dead] = 1
        w[:, dead] = 0
    return h, dead


@dataclass(frozen=True)
class _ColumnWeights:
    """The clipping search the grids get (:class:`mpq.numerics.format.ClipSearch`):
    ``col_weight`` [K] the columns' diag H in the order the grid's parameters see them."""

    args: WeightArgs
    col_weight: torch.Tensor

    def weights(self, lo: int, hi: int) -> torch.Tensor:
        return self.col_weight[lo:hi]

    def int_params(self, cols: torch.Tensor, lo: int, hi: int):
        return searched_int_params(cols, self.args, self.col_weight[lo:hi])


def _current_cols(wt: torch.Tensor, hinv: torch.Tensor, err: torch.Tensor,
                  i1: int, p0: int, p1: int, i2: int) -> torch.Tensor:
    """Columns p0:p1 as [N, p1−p0], with every update from columns < p0 applied.

    Rows of ``wt`` inside the block [i1, i2) are updated in place; rows past i2 still miss the
    block's pending lazy update from its first p0 − i1 columns.
    """
    if p1 <= i2:
        return wt[p0:p1].t()
    tail = wt[i2:p1]
    if p0 > i1:
        tail = tail - hinv[i1:p0, i2:p1].t() @ err[:p0 - i1]
    return torch.cat([wt[p0:i2], tail]).t()


def feedback_shift(w: torch.Tensor, cross: torch.Tensor, upper: torch.Tensor,
                   perm: torch.Tensor | None, dead: torch.Tensor, alpha: float) -> torch.Tensor:
    """GPTAQ's shift α·W·triu₁(D Uᵀ)·U of ``w`` [N, K] (module docstring), in w's column order;
    ``upper`` is U in processing order (``perm``), ``cross`` D [K, K] in the original order."""
    k = w.shape[1]
    if tuple(cross.shape) != (k, k):
        raise SchemeError(f"gptq: float_cross shape {tuple(cross.shape)} does not match the "
                          f"weight's input dimension {k}")
    d = cross.detach().to(device=w.device, dtype=torch.float32, copy=True)
    if not bool(torch.isfinite(d).all()):
        raise SchemeError("gptq: the float_cross statistic has NaN/inf values",
                          hint="check the calibration inputs for NaN/inf (e.g. overflow in fp16)")
    d[dead, :] = 0
    d[:, dead] = 0
    wp = w
    if perm is not None:
        d, wp = d[perm][:, perm], w[:, perm]
    shift = (wp @ torch.triu(d @ upper.t(), diagonal=1)) @ upper
    shift.mul_(alpha)
    if perm is None:
        return shift
    out = torch.empty_like(shift)
    out[:, perm] = shift
    return out


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, args: WeightArgs,
               options: GPTQOptions = GPTQOptions(), cross: torch.Tensor | None = None
               ) -> GPTQResult:
    """Quantize ``weight`` [N, K] on the grid of ``args`` minimising tr((W−Q) H (W−Q)ᵀ) by GPTQ,
    with ``options`` (damping, block size, act-order, static groups, clip search).  With
    ``cross`` = D [K, K] (needed when ``options.error_feedback``) the target is the float
    model's output instead (error feedback, module docstring).

    ``hessian`` [K, K] (e.g. (2/T)·Σ x xᵀ) and ``cross`` are not modified.  Raises SchemeError
    for shape mismatches, unsupported combinations and a Hessian that cannot be made positive
    definite.
    """
    damp, block_size, act_order = options.damp, options.block_size, options.act_order
    static_groups, max_damp, clip_search = (options.static_groups, options.max_damp,
                                            options.clip_search)
    check_supported(args, act_order, static_groups, clip_search)
    args.check_shape(tuple(weight.shape), where="gptq weight")
    if block_size < 1:
        raise SchemeError(f"gptq block_size must be ≥ 1, got {block_size}")
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    h, dead = prepare_hessian(hessian, w)
    if options.error_feedback and cross is None:
        raise SchemeError("gptq error_feedback needs the float_cross statistic")
    diag = h.diagonal().clone() if clip_search else None

    perm = None
    if act_order:
        perm = torch.sort(h.diagonal(), descending=True, stable=True).indices
        h = h[perm][:, perm]
    hinv, damp_used, retries = inverse_cholesky(h, damp, max_damp)
    shift_norm = None
    if options.error_feedback:
        shift = feedback_shift(w, cross, hinv, perm, dead, options.feedback_alpha)
        shift_norm = float(shift.norm() / w.norm().clamp_min(1e-30))
        w += shift
        w[:, dead] = 0

    gs = args.group_size if args.granularity == "group" else None
    num_groups = k // gs if gs else 1
    dynamic = gs is not None and not static_groups
    clip = None
    if clip_search:  # error weights of the columns, in the order the params see them
        clip = _ColumnWeights(args, diag[perm] if dynamic and perm is not None else diag)
    grid_cls = NUMBER_FORMATS.get(args.format).gptq_columns
    grid = grid_cls(args, w, num_groups, dynamic, clip)
    order = perm.tolist() if perm is not None else range(k)  # column processed at each p
    # group row used by the p-th processed column
    if gs is None:
        groups = [0] * k
    elif static_groups and perm is not None:
        groups = [c // gs for c in perm.tolist()]
    else:
        groups = [p // gs for p in range(k)]

    wt = torch.empty((k, n), dtype=torch.float32, device=w.device)
    wt.copy_((w[:, perm] if perm is not None else w).t())
    loss = torch.zeros((), dtype=torch.float32, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        hb = hinv[i1:i2, i1:i2]
        err = torch.empty((i2 - i1, n), dtype=torch.float32, device=w.device)
        for j in range(i2 - i1):
            p = i1 + j
            if dynamic and p % gs == 0:
                grid.set_group(p // gs, _current_cols(wt, hinv, err, i1, p, p + gs, i2))
            w_p = wt[p]
            q = grid.column(p, order[p], groups[p], w_p)
            e = err[j]
            torch.sub(w_p, q, out=e)
            e.div_(hb[j, j])
            w_p.copy_(q)  # row p of wt now holds Q
            if p + 1 < i2:
                wt[p + 1:i2].addr_(hb[j, j + 1:], e, alpha=-1)
        loss += err.square().sum() / 2
        if i2 < k:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err, alpha=-1)

    q_mat, codes = wt.t(), grid.codes.t()
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        q_mat, codes = q_mat[:, inv], codes[:, inv]
        if gs is not None and grid_cls.act_order:  # static-only grids keep consecutive groups
            g_idx = torch.arange(k, device=w.device, dtype=torch.int32) // gs
            if not static_groups:
                g_idx = g_idx[inv]  # column c was processed at position inv[c]
    scale, zero = grid.params()
    return GPTQResult(q=q_mat.contiguous(), codes=codes.contiguous(), scale=scale, zero=zero,
                      g_idx=g_idx, loss=float(loss), damp=float(damp_used), damp_retries=retries,
                      feedback_shift=shift_norm)

"""The ``gptq`` quantizer (Frantar et al., arXiv:2210.17323): wraps :func:`gptq_solve`.

Needs ``stats["hessian"]``, an fp32 [K, K] matrix (2/T)·Σ_t x_t x_tᵀ over the calibration tokens
that fed the layer; it may be shared between layers and is never modified.

Supported weight formats (see :mod:`mpq.quantizers.gptq_solve`): ``int`` 2–8 bits sym/asym with
tensor/channel/group scales (with or without act_order / static_groups); ``fp8_e4m3`` and
``fp8_e5m2`` tensor/channel; ``nf4`` without double_quant; the GGUF block types (act_order only
with static_groups).  act_order with fp8 or nf4 and nf4 with double_quant are rejected by
:meth:`GPTQQuantizer.check`, and so are mxfp4, mxfp8, nvfp4 and fp8 with granularity ``block``
(use rtn for those).

Options (recipe ``options:``, all optional): ``damp`` (float ≥ 0, default 0.01, fraction of the
mean diagonal of H added to it), ``block_size`` (int ≥ 1, default 128, lazy-update block),
``act_order`` (bool, default false: process columns by descending diag H), ``static_groups`` (bool,
default false: group params from the original weights up front; needs granularity group),
``max_damp`` (float ≥ damp, default 1.0: ceiling of the damping retries), ``clip_search`` (bool,
default false; int: scales from :func:`mpq.quantizers.clip_search.searched_int_params`
weighted by diag H instead of min-max; the GGUF block types: their own parameter search weighted
by diag H), ``error_feedback`` (bool, default false: GPTAQ, target
the float model's layer output instead of this layer's own; needs the statistic ``float_cross``,
whose float-model inputs the engine then carries beside the quantized ones, doubling the
activation memory) and ``feedback_alpha`` (float ≥ 0, default 0.25, with error_feedback only: the
weight of the inherited error; see :mod:`mpq.quantizers.gptq_solve`).

``QuantizedWeight.info`` gets ``gptq_loss`` (Σ over the matrix of (w − q)²/d²/2, d the diagonal of
the upper Cholesky factor of the damped H⁻¹, in permuted order under act_order: the reference's
summed ``Losses``), ``damp`` (damping fraction used), ``damp_retries`` and ``act_order``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.errors import SchemeError
from mpq.numerics.base import QuantizedWeight
from mpq.quantizers.base import QUANTIZERS
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import check_supported, gptq_solve
from mpq.numerics.int_grid import prepare_weight
from mpq.config.scheme import LayerScheme


class GPTQQuantizer:
    """GPTQ over a per-layer Hessian; see the module docstring for options and ``info``."""

    name = "gptq"
    needs: frozenset[str] = frozenset({"hessian"})

    def check(self, scheme: LayerScheme) -> None:
        opts = GPTQOptions.from_scheme(scheme)
        check_supported(scheme.weights, opts.act_order, opts.static_groups, opts.clip_search)

    def needs_for(self, scheme: LayerScheme) -> frozenset[str]:
        if GPTQOptions.from_scheme(scheme).error_feedback:
            return self.needs | {"float_cross"}
        return self.needs

    def quantize(self, weight: torch.Tensor, scheme: LayerScheme,
                 stats: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        opts = GPTQOptions.from_scheme(scheme)
        args = scheme.weights
        hessian = stats.get("hessian")
        if hessian is None:
            raise SchemeError("gptq needs the 'hessian' calibration statistic",
                              hint="run gptq with calibration data")
        cross = None
        if opts.error_feedback:
            cross = stats.get("float_cross")
            if cross is None:
                raise SchemeError("gptq error_feedback needs the 'float_cross' calibration "
                                  "statistic", hint="run gptq with calibration data")
        w = prepare_weight(weight, args, args.format)
        res = gptq_solve(w, hessian, args, opts, cross=cross)
        info = {"gptq_loss": res.loss, "damp": res.damp, "damp_retries": res.damp_retries,
                "act_order": opts.act_order}
        if opts.error_feedback:
            info["feedback_shift"] = res.feedback_shift
        return QuantizedWeight(args=args, shape=tuple(w.shape), codes=res.codes, scale=res.scale,
                               zero=res.zero, g_idx=res.g_idx, info=info)


GPTQ = QUANTIZERS.register("gptq")(GPTQQuantizer())

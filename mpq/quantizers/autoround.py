"""The ``autoround`` quantizer: tuned rounding by signed gradient descent, one decoder block at a
time (SignRound / AutoRound: Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent
for the Quantization of LLMs", arXiv:2309.05516; intel/auto-round).

For each decoder block, all of its autoround layers are tuned together: every weight gets a
rounding offset V ∈ [−½, ½] and every scale group clipping factors α ∈ [½, 1]
(mpq.quantizers.autoround_grid), and both are learnt by signed gradient descent
(mpq.quantizers.autoround_solve) on the mean squared error between the block's output with the
quantized weights and the float block's output, over mini-batches of the calibration samples.
The block sees the inputs of the partly quantized model (the previous blocks already
quantized), like every mpq algorithm; its target is, with ``error_feedback`` (the default), the
float model's own block outputs (the float block on the float model's inputs, carried by
mpq.engine.float_stream), as in the published method: the tuning then also corrects the error
the block inherits from the blocks quantized before it; with ``error_feedback: false``, the
float block on the block's own (partly quantized) inputs.  The engine's block step runs it
(mpq.engine.block_tuning): it is a *block-level* quantizer (``block_level``), so
the per-layer :meth:`AutoRoundQuantizer.quantize` is never called by a run.

Weight grids: ``int`` 2–8 bits, symmetric or asymmetric, tensor/channel/group scales, any
``scale_dtype``.  The microscaling grids (mxfp4, nvfp4), fp8 and nf4 are refused at plan time.
Weight-only: layers with ``input_activations`` are refused.  Only linears inside decoder
blocks (not an input embedding, an output head or fused MoE experts).

Options (recipe ``options:``, all optional; mpq.quantizers.autoround_options):
``effort`` (``light`` | ``default`` | ``best``: iterations, samples per step and lr together),
``iters`` (int ≥ 0; 0 gives round-to-nearest), ``batch_size`` (samples per step, int ≥ 1),
``lr`` (rounding offsets' step, default 1/iters), ``minmax_lr`` (clipping factors' step,
default lr), ``clip`` (bool, default true: tune the clipping factors), ``error_feedback``
(bool, default true: target the float model's block outputs, above; on SmolLM2 int4 g64 light
it takes ppl 35.99 to 31.82), ``seed`` (int, default 0;
the sample order of block i is seeded with seed and i, so a run is reproducible and a resumed
run gives the same bytes).  Every autoround layer of one block must have the same options.

``QuantizedWeight.info`` (the run log) gets ``autoround_init_loss`` (the block's loss at
iteration 0, i.e. round-to-nearest), ``autoround_loss`` (the best mini-batch loss, whose
parameters were kept) and ``autoround_best_iter``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError
from mpq.numerics.base import QuantizedWeight
from mpq.quantizers.autoround_options import AutoRoundOptions
from mpq.quantizers.base import QUANTIZERS

BLOCK_OUTPUT = "block_output"
# the float model's outputs of the block (error_feedback): carried by the engine's float stream
FLOAT_BLOCK_OUTPUT = "float_block_output"


class AutoRoundQuantizer:
    """Block-level tuned rounding; see the module docstring."""

    name = "autoround"
    # no statistic collector: the block step computes the float block's outputs itself
    needs: frozenset[str] = frozenset({BLOCK_OUTPUT})
    block_level = True

    def check(self, scheme: LayerScheme) -> None:
        AutoRoundOptions.from_scheme(scheme)
        args = scheme.weights
        if args.format != "int":
            raise SchemeError(f"autoround supports the int grid only, not {args.format}",
                              hint="use format: int, or algorithm: rtn/gptq for this format")
        if scheme.input_activations is not None:
            raise SchemeError("autoround quantizes weights only, not input activations",
                              hint="remove input_activations, or use algorithm: gptq")

    def needs_for(self, scheme: LayerScheme) -> frozenset[str]:
        if AutoRoundOptions.from_scheme(scheme).error_feedback:
            return self.needs | {FLOAT_BLOCK_OUTPUT}
        return self.needs

    def quantize(self, weight: torch.Tensor, scheme: LayerScheme,
                 stats: Mapping[str, torch.Tensor]) -> QuantizedWeight:
        raise SchemeError("autoround tunes whole decoder blocks; it cannot quantize a single "
                          "layer on its own", hint="use it in a rule for decoder-block linears")


AUTOROUND = QUANTIZERS.register("autoround")(AutoRoundQuantizer())


def is_block_level(algorithm: str) -> bool:
    """Whether the registered quantizer ``algorithm`` tunes whole blocks (the engine's block
    step runs it)."""
    return bool(getattr(QUANTIZERS.get(algorithm), "block_level", False))

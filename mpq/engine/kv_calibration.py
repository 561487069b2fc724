"""KV-cache calibration as an engine hook: the pass that computes the next block's inputs (with
this block final, attention run for real) also observes the keys and values each attention
module caches; their scales then become ``k_scale``/``v_scale`` buffers of the modules, which
fake-quantize K/V from then on (mpq.quantizers.kv_cache)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.models.attention import attention_modules, tap_kv
from mpq.numerics.activations import FP8_MAX
from mpq.quantizers.kv_cache import KVObserver, attach_kv_quantization


class KVCalibrationHook(RunHook):
    """Calibrates and attaches the plan's KV-cache scales, block by block (restored blocks
    too: the same pass gives the same scales)."""

    def final_pass(self, run: RunState, turn: BlockTurn):
        if run.plan.kv_cache is None:
            return None
        return self._observe(run, turn)

    @contextmanager
    def _observe(self, run: RunState, turn: BlockTurn) -> Iterator[None]:
        args = run.plan.kv_cache
        modules = attention_modules(run.model, turn.module)
        observers = [KVObserver(args) for _ in modules]
        handles = [tap_kv(module, observer) for (_, module), observer in zip(modules, observers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        for (name, module), observer in zip(modules, observers):
            scales = observer.scales()
            attach_kv_quantization(module, scales, granularity=args.granularity)
            run.events("kv_cache", block=turn.index, module=name,
                       k_absmax=float(scales["k_scale"].max()) * FP8_MAX,
                       v_absmax=float(scales["v_scale"].max()) * FP8_MAX)

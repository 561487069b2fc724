"""KV-cache calibration as an engine hook: the pass that computes the next block's inputs (with
this block final, attention run for real) also observes the keys and values each attention
module caches; their ranges then become the modules' buffers (``k_scale``/``v_scale``, and
``k_zero``/``v_zero`` for int), which fake-quantize K/V from then on (mpq.quantizers.kv_cache).
A dynamic int scheme calibrates nothing: its quantization is attached before the pass, so the
next blocks see quantized K/V as well."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mpq.engine.lifecycle import BlockTurn, RunHook, RunState
from mpq.models.attention import attention_modules, tap_kv
from mpq.quantizers.kv_cache import KVObserver, attach_kv_quantization


class KVCalibrationHook(RunHook):
    """Calibrates and attaches the plan's KV-cache quantization, block by block (restored
    blocks too: the same pass gives the same scales)."""

    def final_pass(self, run: RunState, turn: BlockTurn):
        args = run.plan.kv_cache
        if args is None:
            return None
        if args.dynamic:
            for _, module in attention_modules(run.model, turn.module):
                attach_kv_quantization(module, args, {})
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
            attach_kv_quantization(module, args, observer.tensors())
            run.events("kv_cache", block=turn.index, module=name, **observer.summary())

"""``mpq drift --recalibrate``: an artifact's static scales recomputed to cover new traffic.

The rule is the pipeline's, applied to both data sets: a static input scale is
:func:`mpq.numerics.activations.static_scale` of the layer's input abs-max over every token
(collected by the pipeline's own ``input_absmax`` statistic, mpq.engine.stats), and a KV
cache's tensors are what :class:`mpq.quantizers.kv_cache.KVObserver` makes of the keys and
values the attention modules cache; the abs-max (KV int: min/max) starts from the range the
artifact's scale covers (its calibration set's, recovered exactly from the scale), so a scale
grows where the traffic goes beyond it and never shrinks: the new artifact serves the old
calibration's data as before.  As in the pipeline the traffic's ranges are measured with the
weights quantized and the activations and cache in float (``mpq.load(...,
activations=False)``), in one pass over each traffic sample followed by its greedy
continuation (the decode tokens :func:`mpq.analysis.drift.measure` generated), so decode
positions are covered too.  (The pipeline measures block by block, with the earlier blocks' KV
cache already quantized; and a served model quantizes the activations upstream of each layer,
which moves its inputs by a rounding error: a value at a new abs-max can end a rounding error
beyond it.)

Everything else is kept: the artifact is read into its canonical state
(mpq.checkpoint.state.state_from_artifact), only ``<layer>.input_scale`` (through the run log's
``input_scale`` results) and the attention modules' ``k_scale``/``v_scale`` (``k_zero``/
``v_zero``) change, and the native writer writes it atomically (weights re-encoded
byte-identically, as ``mpq convert`` does).  The header gains ``mpq.recalibration``
(:func:`recalibration_record`): both calibration sets (the weights' one stays in
``mpq.calibration``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from mpq.numerics.activations import grid_half_range, static_scale


def _observe(model, plan, log, samples: Iterable[torch.Tensor]):
    """(layer → input abs-max collector, attention name → KVObserver) after running samples."""
    from mpq.engine.stats import STATS
    from mpq.models.attention import attention_modules, tap_kv
    from mpq.models.layout import blocks_of, layout_of
    from mpq.quantizers.kv_cache import KVObserver

    handles, inputs, kv = [], {}, {}
    for layer in plan.quantized():
        acts = layer.scheme.input_activations
        if acts is None or acts.dynamic:
            continue
        module = model.get_submodule(layer.name)
        collector = inputs[layer.name] = STATS.get("input_absmax")()
        old = log.input_scale(layer.name) * grid_half_range(acts)  # the range it covers
        collector.add(torch.full((1, module.in_features), old, dtype=torch.float32))
        handles.append(module.register_forward_pre_hook(
            lambda module, args, collector=collector: collector.add(args[0])))
    args = plan.kv_cache
    if args is not None and not (args.is_int and args.dynamic):
        layout = layout_of(model)
        for index, block in enumerate(blocks_of(model, layout)):
            for local, module in attention_modules(model, block):
                observer = kv[f"{layout.blocks_path}.{index}.{local}"] = KVObserver(args)
                observer.stats = {which: _kv_range(module, which, args) for which in "kv"}
                handles.append(tap_kv(module, observer))
    try:
        with torch.inference_mode():
            for ids in samples:
                model(input_ids=ids.reshape(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, kv


def _kv_range(module, which: str, args) -> tuple[torch.Tensor, ...]:
    """The range an attention module's stored KV scale covers, as KVObserver keeps it: the
    abs-max (fp8: a scalar per tensor, [kv_heads] per head) or (min, max) [kv_heads, 1, G]."""
    from mpq.numerics import kv_int
    from mpq.numerics.activations import FP8_MAX

    scale = getattr(module, f"{which}_scale").float()
    if not args.is_int:
        absmax = scale * FP8_MAX
        return (absmax.reshape(()) if args.granularity == "tensor" else absmax.reshape(-1),)
    zero = getattr(module, f"{which}_zero").float()
    return -zero * scale, (kv_int.qmax_of(args.bits) - zero) * scale


def new_scales(path: str | Path, samples: Iterable[torch.Tensor]
               ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(layer → new static input scale, ``<attention>.<tensor>`` → new KV tensor) of the
    artifact at ``path``, covering its old ranges and those of ``samples`` (token ids, each
    one forward)."""
    from mpq.loader import load

    model = load(path, activations=False, dequantize=True)
    plan = model.mpq_artifact.plan
    inputs, kv = _observe(model, plan, model.mpq_artifact.log, samples)
    scales = {}
    for name, collector in inputs.items():
        if collector.result() is None:
            continue  # the layer saw no token (kept as it was)
        scales[name] = float(static_scale(collector.result(),
                                          plan.get(name).scheme.input_activations))
    tensors = {f"{name}.{key}": value for name, observer in kv.items()
               for key, value in observer.tensors().items()}
    return scales, tensors


def _calibration_summary(record: dict | None) -> dict[str, Any] | None:
    if not record:
        return None
    return {key: record.get(key) for key in ("source", "sha256", "num_samples", "seq_len",
                                             "total_tokens", "tokenizer")}


def recalibration_record(original: dict | None, traffic: dict, *, source_artifact: str,
                         decode_tokens: int, tokens: int, input_scales: int,
                         kv_tensors: int) -> dict[str, Any]:
    """The ``mpq.recalibration`` header record: that the static scales were recalibrated, from
    which artifact, by which rule, the original calibration set (hash, source, counts) and the
    traffic's (its full provenance), and how much was measured."""
    return {"recalibrated": True, "by": "mpq drift --recalibrate", "from_artifact": source_artifact,
            "rule": "pipeline rule over the ranges of both sets (scales only grow)",
            "original_calibration": _calibration_summary(original), "calibration": dict(traffic),
            "decode_tokens": decode_tokens, "tokens_measured": tokens,
            "input_scales": input_scales, "kv_tensors": kv_tensors}


def recalibrate(path: str | Path, out_dir: str | Path, samples: list[torch.Tensor], *,
                traffic: dict, decode_tokens: int, force: bool = False) -> dict[str, Any]:
    """Write the artifact at ``path`` with static scales from ``samples`` (prompt + continuation
    token ids) to ``out_dir`` (module docstring); returns the recalibration record plus the
    largest change of any scale (``max_scale_ratio``: new / old)."""
    from mpq.checkpoint.native import check_output_apart, check_output_free
    from mpq.checkpoint.native_writer import NATIVE
    from mpq.checkpoint.state import state_from_artifact
    from mpq.checkpoint.writers import write_state

    out_dir = Path(out_dir)
    check_output_free(out_dir, force)
    check_output_apart(out_dir, [Path(path)])
    scales, kv = new_scales(path, samples)
    state = state_from_artifact(path)
    ratios = []
    for name, scale in scales.items():
        result = state.log.result(name)
        if result.get("input_scale"):
            ratios.append(scale / result["input_scale"])
        result["input_scale"] = scale
    for key, tensor in kv.items():
        if key.endswith("_scale") and key in state.dense:
            ratios.append(float((tensor / state.dense[key].float()).max()))
        state.dense[key] = tensor.to(torch.float32)
    record = recalibration_record(
        state.provenance.get("calibration"), traffic, source_artifact=str(path),
        decode_tokens=decode_tokens, tokens=sum(int(s.numel()) for s in samples),
        input_scales=len(scales), kv_tensors=len(kv))
    state.provenance["recalibration"] = record
    write_state(state, out_dir, NATIVE, force=force)
    return {**record, "output": str(out_dir), "max_scale_ratio": max(ratios, default=None)}

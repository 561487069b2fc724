"""The GPTQ v1 format (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``; FORMATS.md).

Per quantized Linear ``<p>`` (K in, N out, b bits, G groups):

- ``qweight`` int32 [K·b/32, N]: unsigned codes packed along K, element k of a column at bits
  b·(k mod 32/b) of word k div (32/b) (mpq's dense layout, transposed, for b ∈ {2, 4, 8}).
- ``qzeros`` int32 [G, N·b/32]: zero points minus one (the v1 convention; symmetric 4-bit: 8,
  stored 7) packed along N the same way.
- ``scales`` float16 [G, N]; ``g_idx`` int32 [K] (group of each input column).
- W[n, k] = scales[g_idx[k], n] · (u[k, n] − (qzeros[g_idx[k], n] + 1)).

``quantize_config.json`` holds bits, group_size (−1 per channel), desc_act, sym, damp_percent,
static_groups, true_sequential, quant_method and checkpoint_format; config.json's
``quantization_config`` mirrors it.

What v1 cannot express (refused): number formats whose ``gptq_v1`` record is
:class:`~mpq.numerics.mappings.NotExpressible` (all but int; the record gives the reason),
3/5/6/7 bits (their v1 packing differs), input activation or KV-cache quantization, layers with
differing bits/group/symmetry (one quantize_config), a decoder-block Linear left unquantized
(loaders replace every one), a quantized layer outside the blocks (lm_head, the input
embedding: v1 loaders replace Linear layers only), and a zero point
of 0 (stored −1, which v1 loaders misread).
Scales are float16, the format's dtype.  With ``scale_dtype: fp16`` in the weight args the
quantizer already rounded them before computing the codes, so the stored model is exactly the
one the algorithm produced (``mpq.gptq_scale_rounding`` in the header: 0).  Other scale dtypes
are rounded when written: the pre-flight check warns (``--strict`` refuses) and the header's
``mpq.gptq_scale_rounding`` gives the largest relative change.
"""
from __future__ import annotations

import json

import torch

from mpq.errors import FormatError
from mpq.checkpoint.state import ArtifactState
from mpq.checkpoint.writers import (WRITERS, FolderContents, dense_group, moe_problems,
                                    mpq_config_key)
from mpq.numerics.packing import pack_rows
from mpq.config.plan import Plan
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.mappings import NotExpressible

FORMAT_NAME = "gptq"
V1_BITS = (2, 4, 8)


def uniform_settings(plan: Plan) -> tuple[int, int, bool] | None:
    """(bits, group_size or −1, symmetric) shared by every quantized layer, else None."""
    settings = {(l.scheme.weights.bits,
                 l.scheme.weights.group_size if l.scheme.weights.granularity == "group" else -1,
                 l.scheme.weights.symmetric) for l in plan.quantized()}
    return settings.pop() if len(settings) == 1 else None


def packed_codes(qw: QuantizedWeight) -> torch.Tensor:
    """qweight int32 [K·b/32, N]."""
    return pack_rows(qw.codes.to(torch.uint8), qw.args.bits).t().contiguous()


def group_index(qw: QuantizedWeight) -> torch.Tensor:
    n, k = qw.shape
    if qw.g_idx is not None:
        return qw.g_idx.to(torch.int32)
    if qw.args.granularity == "group":
        return torch.arange(k, dtype=torch.int32) // qw.args.group_size
    return torch.zeros(k, dtype=torch.int32)


def per_column(t: torch.Tensor, n: int) -> torch.Tensor:
    """[S, G] scale or zero (S = 1 for a per-tensor scale) as [G, N]."""
    return t.expand(n, t.shape[1]).t().contiguous()


def layer_tensors(name: str, qw: QuantizedWeight) -> tuple[dict[str, torch.Tensor], float]:
    """One layer's v1 tensors and the largest relative change of its scales in float16."""
    n, _ = qw.shape
    bits = qw.args.bits
    zero = (torch.full_like(qw.scale, 1 << (bits - 1), dtype=torch.int32) if qw.zero is None
            else qw.zero.to(torch.int32))
    if int(zero.min()) < 1:
        raise FormatError(f"{name}: a zero point is 0, which GPTQ v1 stores as −1 and its "
                          "loaders misread", hint="write --format compressed-tensors or mpq, or "
                          "quantize this layer symmetric")
    scales32 = per_column(qw.scale.to(torch.float32), n)
    scales = scales32.to(torch.float16)
    rounding = float(((scales.float() - scales32).abs() / scales32.abs().clamp_min(1e-30)).max())
    stored_zero = (per_column(zero, n) - 1).to(torch.uint8)
    return {"qweight": packed_codes(qw), "qzeros": pack_rows(stored_zero, bits),
            "scales": scales, "g_idx": group_index(qw)}, rounding


def quantize_config(state: ArtifactState) -> dict:
    bits, group, sym = uniform_settings(state.plan)
    options = [dict(l.scheme.options) for l in state.plan.quantized()]
    pipeline = state.provenance.get("pipeline") or {}
    return {"bits": bits, "group_size": group,
            "desc_act": any(o.get("act_order", False) for o in options), "sym": sym,
            "damp_percent": max((o.get("damp", 0.01) for o in options), default=0.01),
            "static_groups": any(o.get("static_groups", False) for o in options),
            "true_sequential": bool(pipeline.get("true_sequential", True)),
            "quant_method": "gptq", "checkpoint_format": "gptq"}


class GptqV1Writer:
    """GPTQ v1 (qweight/qzeros/scales/g_idx): AutoGPTQ, GPTQModel, transformers+optimum, vLLM."""

    name = FORMAT_NAME
    online_rotations = False
    load_hint = ("# with optimum and gptqmodel installed: from transformers import "
                 "AutoModelForCausalLM; model = AutoModelForCausalLM.from_pretrained("
                 '"path/to/this/folder")')

    def unsupported(self, plan: Plan) -> list[str]:
        problems = moe_problems(plan, "GPTQ v1 loaders replace nn.Linear modules only; "
                                      "transformers holds these experts as 3-D parameters")
        for layer in plan.layers:
            if layer.expert is not None or "router" in layer.class_name.lower():
                continue  # said above when quantized; kept ones stay dense tensors
            if layer.scheme is None:
                if layer.block is not None:
                    problems.append(f"{layer.name}: left unquantized inside a decoder block "
                                    "(v1 loaders replace every block Linear)")
                continue
            args = layer.scheme.weights
            if layer.embedding:
                problems.append(f"{layer.name}: a quantized input embedding (GPTQ v1 stores "
                                "quantized Linear layers only; its loaders read an embedding "
                                "as a float table)")
            elif layer.block is None:
                problems.append(f"{layer.name}: quantized outside the decoder blocks "
                                "(GPTQ v1 has no quantized lm_head)")
            elif isinstance(mapping := NUMBER_FORMATS.get(args.format).gptq_v1, NotExpressible):
                problems.append(f"{layer.name}: {mapping.reason}")
            elif args.bits not in V1_BITS:
                problems.append(f"{layer.name}: {args.bits}-bit weights (mpq writes v1 with "
                                "2, 4 or 8 bits)")
            if layer.scheme.input_activations is not None:
                problems.append(f"{layer.name}: input activation quantization (GPTQ is "
                                "weight-only)")
        if plan.kv_cache is not None:
            problems.append("kv_cache scales (GPTQ v1 stores no KV-cache quantization)")
        if plan.quantized() and uniform_settings(plan) is None:
            problems.append("layers differ in bits, group size or symmetry (GPTQ v1 has one "
                            "quantize_config for the model)")
        return problems

    def preflight(self, plan: Plan) -> list[str]:
        """Layers whose scales are not fp16 (rounded to float16 when written)."""
        rounded = [layer.name for layer in plan.quantized()
                   if layer.scheme.weights.scale_dtype != "fp16"]
        if not rounded:
            return []
        return [f"scales: {len(rounded)} layer(s), e.g. {', '.join(rounded[:3])}, have "
                "non-fp16 scales, rounded to float16 (GPTQ v1's scale dtype) when written; "
                "set weights scale_dtype: fp16 so the algorithm solves with the scales that "
                "are stored"]

    def contents(self, state: ArtifactState) -> FolderContents:
        tensors = dense_group(state)
        worst = 0.0
        for layer in state.plan.quantized():
            roundings: list[float] = []

            def produce(layer=layer, roundings=roundings):
                layer_out, rounding = layer_tensors(layer.name, state.qweights[layer.name])
                roundings.append(rounding)
                return {f"{layer.name}.{k}": v for k, v in layer_out.items()}

            tensors.add(produce)  # produced once now: its rounding is known from here on
            worst = max(worst, roundings[0])
        qconfig = quantize_config(state)
        config = {**state.config, "quantization_config": qconfig,
                  "mpq": mpq_config_key(state, self.name)}
        return FolderContents(
            tensors=tensors, config=config, code_keys=("qweight",),
            header={"mpq.gptq_scale_rounding": json.dumps(worst)},
            files={"quantize_config.json": json.dumps(qconfig, indent=2, sort_keys=True) + "\n"})


GPTQ_V1 = WRITERS.register(FORMAT_NAME)(GptqV1Writer())

"""Scale drift: an artifact's static scales (mpq.analysis.static_scales) against new traffic.

For each traffic sample (token ids [1, L]) the quantized model — loaded with :func:`mpq.load`
(the reference path, no packed kernels; ``mpq drift`` dequantizes the weights once up front,
which gives the same outputs as decoding them per forward) — runs

- **prefill**: one forward of the whole prompt with a fresh KV cache (``use_cache=True``);
- **decode**: ``decode_tokens`` greedy steps, each one forward of the single new token against
  that cache (the first one feeds the argmax of the prompt's last position).

Hooks count, per static scale and per phase, the values it saw and those it clipped (before the
layer's own quantization; KV values as they enter the cache, so a decode step counts only its
new token's keys and values).

KL(float ‖ quantized) of the next-token distributions, when a float reference model is given:
the reference runs once over the prompt followed by the generated tokens (teacher-forced on the
quantized model's own continuation); its rows 0..L-1 pair with the prefill logits, rows
L..L+N-1 with the decode steps'.  Log-softmax in fp32, sums in fp64.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from mpq.analysis.static_scales import ClipStats, StaticScale, static_scales
from mpq.models.attention import tap_kv

PHASES = ("prefill", "decode")


@dataclass
class PhaseKL:
    tokens: int = 0
    kl_sum: float = 0.0
    agree: int = 0

    def add(self, logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        self.kl_sum += float(kl.double().sum())
        self.agree += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
        self.tokens += kl.numel()

    def to_dict(self) -> dict[str, Any]:
        if not self.tokens:
            return {"tokens": 0, "kl_mean": None, "top1_agreement": None}
        return {"tokens": self.tokens, "kl_mean": self.kl_sum / self.tokens,
                "top1_agreement": self.agree / self.tokens}


@dataclass
class DriftReport:
    """What :func:`measure` found: per static scale and phase its :class:`ClipStats`, per phase
    the tokens run and (with a reference) the KL."""

    scales: list[StaticScale]
    clips: dict[str, dict[str, ClipStats]]          # phase → scale key → stats
    tokens: dict[str, int]
    kl: dict[str, PhaseKL] | None
    continuations: list[torch.Tensor] = field(default_factory=list)  # generated ids per sample

    def rows(self) -> list[dict[str, Any]]:
        """One row per static scale: its description and each phase's figures."""
        return [{**scale.describe(), **{phase: self.clips[phase][scale.key].to_dict()
                                        for phase in PHASES}} for scale in self.scales]

    def worst(self) -> tuple[StaticScale | None, str | None, float]:
        """(scale, phase, clipped fraction) of the scale that clips the largest share."""
        best = (None, None, -1.0)
        for scale in self.scales:
            for phase in PHASES:
                fraction = self.clips[phase][scale.key].clipped_fraction
                if fraction > best[2]:
                    best = (scale, phase, fraction)
        return best if best[0] is not None else (None, None, 0.0)

    def over(self, max_clipped_pct: float) -> list[dict[str, Any]]:
        """(scale, phase, percent) of every scale that clips more than ``max_clipped_pct`` %."""
        out = []
        for scale in self.scales:
            for phase in PHASES:
                pct = 100.0 * self.clips[phase][scale.key].clipped_fraction
                if pct > max_clipped_pct:
                    out.append({"tensor": scale.key, "phase": phase, "clipped_pct": pct})
        return out

    def to_dict(self) -> dict[str, Any]:
        kl = None if self.kl is None else {phase: self.kl[phase].to_dict() for phase in PHASES}
        totals = {}
        for phase in PHASES:
            stats = self.clips[phase].values()
            values = sum(s.values for s in stats)
            clipped = sum(s.clipped for s in stats)
            totals[phase] = {"tokens": self.tokens[phase], "values": values, "clipped": clipped,
                             "clipped_fraction": clipped / values if values else 0.0,
                             "scales_clipping": sum(1 for s in stats if s.clipped)}
        return {"phases": totals, "kl": kl, "scales": self.rows()}


class _Meter:
    """Hooks that feed each static scale's inputs into the current phase's ClipStats."""

    def __init__(self, scales: list[StaticScale]):
        self.scales = scales
        self.phase = PHASES[0]
        self.clips = {phase: {s.key: ClipStats() for s in scales} for phase in PHASES}

    def _count(self, scale: StaticScale, x: torch.Tensor) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            self.clips[self.phase][scale.key].add(x, scale.clipped(x))

    @contextmanager
    def attached(self) -> Iterator["_Meter"]:
        handles = []
        kv: dict[int, dict[str, StaticScale]] = {}
        for scale in self.scales:
            if scale.kind == "input":
                handles.append(scale.module.register_forward_pre_hook(  # before the loader's
                    lambda module, args, scale=scale: self._count(scale, args[0]),  # own hook
                    prepend=True))
            else:
                kv.setdefault(id(scale.module), {"module": scale.module})[scale.kind] = scale
        for entry in kv.values():
            def on_kv(key, value, entry=entry):
                self._count(entry["k"], key)
                self._count(entry["v"], value)
                return key, value
            handles.append(tap_kv(entry["module"], on_kv))  # sees K/V before the cache's own
        with ExitStack() as stack:                           # quantization (tapped earlier)
            stack.callback(lambda: [h.remove() for h in handles])
            yield self


def _generate(model: nn.Module, ids: torch.Tensor, decode_tokens: int, meter: _Meter
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prefill logits [L, V], decode logits [N, V], generated ids [N]) of one sample."""
    meter.phase = "prefill"
    out = model(input_ids=ids, use_cache=True)
    prefill = out.logits[0].float()
    cache = out.past_key_values
    token = prefill[-1].argmax()
    generated, decode = [], []
    meter.phase = "decode"
    for _ in range(decode_tokens):
        generated.append(token)
        out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        decode.append(out.logits[0, -1].float())
        token = decode[-1].argmax()
    vocab = prefill.shape[-1]
    decode_logits = torch.stack(decode) if decode else prefill.new_zeros((0, vocab))
    return prefill, decode_logits, torch.stack(generated) if generated else ids.new_zeros(0)


def measure(model: nn.Module, samples: Iterable[torch.Tensor], *, decode_tokens: int = 16,
            reference: nn.Module | None = None,
            on_sample: Callable[[int], None] | None = None) -> DriftReport:
    """Run ``model`` (an mpq.load-ed artifact) on ``samples`` (module docstring).  ValueError
    when the model has no static scale (callers check the plan first)."""
    scales = static_scales(model)
    if not scales:
        raise ValueError("the model has no static scale")
    meter = _Meter(scales)
    tokens = {phase: 0 for phase in PHASES}
    kl = {phase: PhaseKL() for phase in PHASES} if reference is not None else None
    continuations = []
    was_training = model.training
    model.eval()
    try:
        with meter.attached(), torch.inference_mode():
            for index, ids in enumerate(samples):
                ids = ids.reshape(1, -1)
                prefill, decode, generated = _generate(model, ids, decode_tokens, meter)
                tokens["prefill"] += ids.shape[1]
                tokens["decode"] += len(generated)
                continuations.append(generated)
                if kl is not None:
                    full = torch.cat([ids[0], generated]).view(1, -1)
                    ref_logits = reference(input_ids=full, use_cache=False).logits[0].float()
                    length = ids.shape[1]
                    kl["prefill"].add(prefill, ref_logits[:length])
                    if len(generated):
                        kl["decode"].add(decode, ref_logits[length:])
                if on_sample is not None:
                    on_sample(index)
    finally:
        model.train(was_training)
    return DriftReport(scales=scales, clips=meter.clips, tokens=tokens, kl=kl,
                       continuations=continuations)

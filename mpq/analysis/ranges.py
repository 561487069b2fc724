"""Activation range profiling: run calibration tokens through a model and record, per op, the
range of the values it produces (what ``mpq validate`` judges against a precision policy).

Recorded with forward hooks (op kinds, see :data:`KINDS`):

- ``residual``: the input embedding's output and each decoder block's output hidden states;
- ``norm_input`` / ``norm_output``: every module whose class name contains ``Norm``;
- ``attn_logits``: the input of ``torch.nn.functional.softmax`` while an attention module runs
  (the model is switched to ``attn_implementation="eager"`` for the pass, so the logits are
  materialised); masked entries (≤ -1e30, -inf, NaN) are ignored;
- ``linear_input`` / ``linear_output``: every ``nn.Linear`` / ``Conv1D`` / ``QuantLinear``;
- ``mlp_intermediate``: the input of each MLP's down projection (``act(gate) * up``): the family
  record's ``mlp_down`` (mpq.models.families), found by name for a model type without a record;
- ``kv_key`` / ``kv_value``: the keys (after RoPE) and values an attention layer caches, through
  :func:`mpq.models.attention.tap_kv` (the attention modules of
  :func:`mpq.models.attention.attention_modules`; none for GPT-2).

Per op: abs-max, the smallest nonzero |x|, and the number of nonzero values below FP16's
smallest normal (2^-14) and below its smallest subnormal (2^-24, where they flush to zero).
The model runs in fp32, so the ranges are those of the real computation, not of a narrow dtype.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
FP16_MIN_SUBNORMAL = 2.0 ** -24
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
FP32_MAX = float(torch.finfo(torch.float32).max)
FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
DTYPE_MAX = {"fp32": FP32_MAX, "bf16": BF16_MAX, "fp16": FP16_MAX,
             "fp8_e4m3": FP8_E4M3_MAX, "fp8_e5m2": FP8_E5M2_MAX}
MASKED_BELOW = -1e30  # attention logits at or below this are masked positions

# kind → (policy part that governs its dtype, description)
KINDS: dict[str, tuple[str, str]] = {
    "residual": ("residual", "residual stream: embedding output and decoder block outputs"),
    "norm_input": ("norms", "inputs of norm modules (RMSNorm / LayerNorm)"),
    "norm_output": ("norms", "outputs of norm modules"),
    "attn_logits": ("softmax", "attention logits (softmax input, masked entries ignored)"),
    "linear_input": ("activations", "inputs of linear layers"),
    "linear_output": ("activations", "outputs of linear layers"),
    "mlp_intermediate": ("activations", "MLP intermediates (input of the down projection)"),
    "kv_key": ("kv_cache", "cached keys (after RoPE)"),
    "kv_value": ("kv_cache", "cached values"),
}
# for model types without a family record: local names of the linear that reads an MLP's
# intermediate activation
MLP_DOWN_NAMES = ("down_proj", "fc2", "dense_4h_to_h", "w2")


@dataclass
class RangeStats:
    """Running range statistics of one op over every value it produced."""

    absmax: float = 0.0
    min_nonzero: float = math.inf
    count: int = 0
    nonzero: int = 0
    below_fp16_normal: int = 0     # nonzero, |x| < 2^-14
    below_fp16_subnormal: int = 0  # nonzero, |x| < 2^-24 (flushed to zero in fp16)
    nonfinite: int = 0

    def update(self, x: torch.Tensor) -> None:
        self.merge(summarize(x))

    def merge(self, other: "RangeStats") -> None:
        self.absmax = max(self.absmax, other.absmax)
        self.min_nonzero = min(self.min_nonzero, other.min_nonzero)
        self.count += other.count
        self.nonzero += other.nonzero
        self.below_fp16_normal += other.below_fp16_normal
        self.below_fp16_subnormal += other.below_fp16_subnormal
        self.nonfinite += other.nonfinite

    @property
    def underflow_fraction(self) -> float:
        """Fraction of nonzero values below FP16's smallest normal."""
        return self.below_fp16_normal / self.nonzero if self.nonzero else 0.0

    @property
    def flush_fraction(self) -> float:
        """Fraction of nonzero values below FP16's smallest subnormal (they become 0)."""
        return self.below_fp16_subnormal / self.nonzero if self.nonzero else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"absmax": _json_float(self.absmax), "min_nonzero": _json_float(self.min_nonzero),
                "count": self.count, "nonzero": self.nonzero,
                "below_fp16_normal": self.below_fp16_normal,
                "below_fp16_subnormal": self.below_fp16_subnormal,
                "fp16_underflow_fraction": self.underflow_fraction,
                "fp16_flush_fraction": self.flush_fraction, "nonfinite": self.nonfinite,
                "exceeds_fp16": self.absmax > FP16_MAX, "exceeds_bf16": self.absmax > BF16_MAX,
                "exceeds_fp8_e4m3": self.absmax > FP8_E4M3_MAX}


def summarize(x: torch.Tensor) -> RangeStats:
    """The range statistics of one tensor."""
    out = RangeStats()
    a = x.detach().float().abs().reshape(-1)
    n = a.numel()
    if n == 0:
        return out
    top = float(a.max())
    if not math.isfinite(top):
        finite = torch.isfinite(a)
        out.nonfinite = int(n - finite.sum())
        a = a[finite]
        top = math.inf
    nonzero = int(torch.count_nonzero(a))
    if nonzero:
        zeros = a.numel() - nonzero
        out.min_nonzero = float(torch.where(a > 0, a, math.inf).min())
        if out.min_nonzero < FP16_MIN_NORMAL:
            out.below_fp16_normal = int(torch.count_nonzero(a < FP16_MIN_NORMAL)) - zeros
            if out.min_nonzero < FP16_MIN_SUBNORMAL:
                out.below_fp16_subnormal = (int(torch.count_nonzero(a < FP16_MIN_SUBNORMAL))
                                            - zeros)
    out.absmax = top
    out.count = n
    out.nonzero = nonzero
    return out


def _json_float(value: float) -> float | str | None:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else None  # min_nonzero of an all-zero op: no value
    return value


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None)


def _is_linear(module: nn.Module) -> bool:
    from mpq.models.layout import is_linear

    return is_linear(module) or type(module).__name__ == "QuantLinear"


def _mlp_down(model: nn.Module, layout) -> Callable[[str], bool]:
    """Whether a linear (by full name) reads an MLP intermediate: the blocks' ``mlp_down`` of
    the model's family record, or, without a record, a linear named like one."""
    from mpq.models.families import family_of

    family = family_of(model)
    if family is None:
        return lambda name: (name.rsplit(".", 1)[-1] in MLP_DOWN_NAMES
                             or name.endswith("mlp.c_proj"))
    names = ({f"{layout.blocks_path}.{i}.{family.mlp_down}" for i in range(layout.num_blocks)}
             if family.mlp_down is not None else set())
    return names.__contains__


class RangeProfiler:
    """Hooks a model and accumulates :class:`RangeStats` per (kind, op name)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stats: dict[tuple[str, str], RangeStats] = {}
        self.kv_scales: dict[str, dict[str, float]] = {}  # attention name → max k/v scale
        self._attention_stack: list[str] = []
        self._last: tuple[torch.Tensor, int, RangeStats] | None = None

    def record(self, kind: str, name: str, x) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            summary = last[2]  # the same tensor read by several ops (q/k/v, gate/up inputs)
        else:
            summary = summarize(x)
            self._last = (x, x._version, summary)
        self.stats.setdefault((kind, name), RangeStats()).merge(summary)

    # --- hooks -----------------------------------------------------------------------------------

    def _output_hook(self, kind: str, name: str):
        def hook(module, args, output):
            self.record(kind, name, _first_tensor(output))
        return hook

    def _input_hook(self, kinds: tuple[str, ...], name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            for kind in kinds:
                self.record(kind, name, x)
        return hook

    def _attention_hooks(self, name: str):
        def enter(module, args, kwargs):
            self._attention_stack.append(name)

        def leave(module, args, kwargs, output):
            if self._attention_stack:
                self._attention_stack.pop()

        return enter, leave

    def _softmax(self, original):
        def softmax(input, *args, **kwargs):
            if self._attention_stack and isinstance(input, torch.Tensor):
                x = input.detach()
                self.record("attn_logits", self._attention_stack[-1],
                            x[(x > MASKED_BELOW) & torch.isfinite(x)])
            return original(input, *args, **kwargs)
        return softmax

    def _kv_observer(self, name: str):
        def on_kv(key, value):
            self.record("kv_key", name, key)
            self.record("kv_value", name, value)
            return key, value
        return on_kv

    @contextmanager
    def attached(self) -> Iterator["RangeProfiler"]:
        """Install the hooks, eager attention and the softmax wrapper; undo them on exit."""
        from mpq.models.layout import blocks_of, layout_of
        from mpq.models.attention import attention_modules, tap_kv

        model = self.model
        layout = layout_of(model)
        handles = []
        embedding = model.get_input_embeddings()
        block_names = {f"{layout.blocks_path}.{i}" for i in range(layout.num_blocks)}
        attention_names = set()
        is_mlp_down = _mlp_down(model, layout)
        for index, block in enumerate(blocks_of(model, layout)):
            for local, module in attention_modules(model, block):
                name = f"{layout.blocks_path}.{index}.{local}"
                attention_names.add(name)
                handles.append(tap_kv(module, self._kv_observer(name)))
                scales = {which: float(getattr(module, f"{which}_scale").max())
                          for which in ("k", "v") if hasattr(module, f"{which}_scale")}
                if scales:
                    self.kv_scales[name] = scales
        for name, module in model.named_modules():
            cls = type(module).__name__
            if module is embedding:
                handles.append(module.register_forward_hook(self._output_hook("residual", name)))
            elif name in block_names:
                handles.append(module.register_forward_hook(self._output_hook("residual", name)))
            elif "Norm" in cls:
                handles.append(module.register_forward_pre_hook(
                    self._input_hook(("norm_input",), name), with_kwargs=True))
                handles.append(module.register_forward_hook(self._output_hook("norm_output",
                                                                               name)))
            elif _is_linear(module):
                kinds = ("linear_input",)
                if is_mlp_down(name):
                    kinds = ("mlp_intermediate", "linear_input")
                handles.append(module.register_forward_pre_hook(self._input_hook(kinds, name),
                                                                with_kwargs=True))
                handles.append(module.register_forward_hook(self._output_hook("linear_output",
                                                                               name)))
            if name in attention_names or (cls.endswith("Attention") and not any(
                    name.startswith(a + ".") or name == a for a in attention_names)):
                enter, leave = self._attention_hooks(name)
                handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
                handles.append(module.register_forward_hook(leave, with_kwargs=True,
                                                            always_call=True))
        functional = torch.nn.functional
        original_softmax = functional.softmax
        with ExitStack() as stack:
            stack.callback(lambda: [h.remove() for h in handles])
            stack.enter_context(_eager_attention(model))
            functional.softmax = self._softmax(original_softmax)
            stack.callback(setattr, functional, "softmax", original_softmax)
            yield self

    def run(self, samples: Iterable[torch.Tensor], on_sample=None) -> None:
        """Forward every sample ([1, L] token ids) through the hooked model."""
        device = next(self.model.parameters()).device
        with self.attached(), torch.no_grad():
            for index, ids in enumerate(samples):
                self.model(input_ids=ids.to(device), use_cache=False)
                self._last = None
                if on_sample is not None:
                    on_sample(index)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Run attention as explicit matmul + softmax, so the logits pass through softmax."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError, ImportError):
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        try:
            model.set_attn_implementation(previous or "sdpa")
        except (AttributeError, ValueError, ImportError):
            config._attn_implementation = previous


def profile(model: nn.Module, samples: Iterable[torch.Tensor], on_sample=None
            ) -> RangeProfiler:
    """Profile ``model`` on ``samples``; the returned profiler's ``stats`` hold the ranges."""
    profiler = RangeProfiler(model)
    profiler.run(samples, on_sample)
    return profiler

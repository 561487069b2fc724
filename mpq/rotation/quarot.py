"""QuaRot (Ashkboos et al., arXiv:2404.00456): orthogonal rotations that leave the float model's
function unchanged but spread activation outliers, so 4-bit weights and activations work.

Applied to the whole model once, before calibration and quantization (:func:`apply_quarot`):

1. **Untie** the output head from the input embedding (their rotated forms differ).
2. **Norm fusion**: each RMSNorm's scale (Gemma: 1 + w) is multiplied into the columns of the
   linears it feeds (q/k/v, gate/up, and lm_head for the final norm) and the norm is left
   scale-free; RMSNorm(x) = x / rms(x) commutes with any orthogonal Q because rms(xQ) = rms(x).
3. **R1** (residual stream, offline), Q [hidden, hidden]: the embedding rows E → E·Q; linears
   reading the stream W → W·Q; linears writing it (o_proj, down_proj) W → Qᵀ·W, bias b → b·Q.
4. **R2** (per head, offline), a [head_dim, head_dim] rotation between v_proj and o_proj: each
   v head's rows W_v,h → Qᵀ·W_v,h (bias likewise) and each query head's o_proj columns
   W_o,h → W_o,h·Q (one Q for all heads, so grouped-query attention is fine).
5. **R4** (online), Q [intermediate, intermediate] on the down_proj input: W_down → W_down·Q
   offline, and at run time the input x → x·Q (a fast Walsh–Hadamard transform); a forward
   pre-hook that runs before any input quantization.  The artifact's plan records it and
   ``mpq.load`` installs the same hook.

Rotations are randomized Hadamards (mpq.rotation.hadamard: H·diag(s)/√n, s from the seed) when
an exact Hadamard of the size is known (SmolLM2: 576 = 16·36, 64, 1536 = 128·12), else seeded
random orthogonal matrices (``r1: random`` asks for those).  Offline ones need no storing (the
weights carry them); the online R4 must be rebuilt at load time, so it must be a Hadamard.
All arithmetic is float64, then cast back to the model's dtype.
Supported: Llama-like blocks with RMSNorm (llama, mistral, qwen2, qwen3, gemma).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpq.models.layout import ModelLayout, blocks_of, untie_head
from mpq.errors import ModelError, SchemeError
from mpq.config.rotation import QuaRotArgs
from mpq.rotation.hadamard import RotationSpec, orthogonal_for

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma")
PLUS_ONE_NORMS = ("gemma",)
READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def head_dim_of(config) -> int:
    return _config_int(config, "head_dim") or config.hidden_size // config.num_attention_heads


def check_supported(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ModelError(f"QuaRot rotation does not support model type '{model_type}'",
                         hint=f"supported: {', '.join(SUPPORTED)}; remove rotation:")


def rotation_specs(model: nn.Module, args: QuaRotArgs) -> dict[str, RotationSpec]:
    """The R1/R2/R4 rotations for ``model`` (R4 must be an exact Hadamard: SchemeError)."""
    config = model.config
    specs = {"r1": orthogonal_for(config.hidden_size, args.seed, args.r1)}
    if args.r2:
        specs["r2"] = orthogonal_for(head_dim_of(config), args.seed + 1)
    if args.r4:
        r4 = orthogonal_for(config.intermediate_size, args.seed + 2)
        if not r4.deterministic:
            raise SchemeError(f"no Hadamard matrix of order {config.intermediate_size} (the "
                              "MLP width) is known, and the online R4 must be rebuilt at load "
                              "time", hint="set r4: false")
        specs["r4"] = r4
    return specs


def _linear(block: nn.Module, name: str) -> nn.Linear:
    return block.get_submodule(name)


@torch.no_grad()
def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


def _fuse_norm(norm: nn.Module, linears: list[nn.Linear], plus_one: bool) -> None:
    scale = norm.weight.detach().double() + (1.0 if plus_one else 0.0)
    for linear in linears:
        _set(linear.weight, linear.weight.detach().double() * scale)
    _set(norm.weight, torch.zeros_like(scale) if plus_one else torch.ones_like(scale))


@torch.no_grad()
def apply_quarot(model: nn.Module, layout: ModelLayout, args: QuaRotArgs) -> dict[str, Any]:
    """Rotate ``model`` in place (see the module docstring); return what was applied for the run
    log (mpq.config.run_log.RunLog.rotation: untied_head, rotations, online).
    R4's online hooks are installed on the down_proj modules (:func:`install_online`)."""
    check_supported(model)
    specs = rotation_specs(model, args)
    plus_one = model.config.model_type in PLUS_ONE_NORMS
    untied = untie_head(model)
    q1 = specs["r1"].matrix(torch.float64)
    embed = model.get_input_embeddings()
    _set(embed.weight, embed.weight.detach().double() @ q1)
    head = model.get_output_embeddings()
    for block in blocks_of(model, layout):
        for norm_name, readers in READERS.items():
            linears = [_linear(block, name) for name in readers]
            _fuse_norm(block.get_submodule(norm_name), linears, plus_one)
            for linear in linears:
                _set(linear.weight, linear.weight.detach().double() @ q1)
        for name in WRITERS:
            linear = _linear(block, name)
            _set(linear.weight, q1.T @ linear.weight.detach().double())
            if linear.bias is not None:
                _set(linear.bias, linear.bias.detach().double() @ q1)
        if "r2" in specs:
            _rotate_heads(block, specs["r2"], model.config)
        if "r4" in specs:
            down = _linear(block, "mlp.down_proj")
            _set(down.weight, down.weight.detach().double() @ specs["r4"].matrix(torch.float64))
    final_norm = model.get_submodule(layout.blocks_path.rsplit(".", 1)[0] + ".norm")
    _fuse_norm(final_norm, [head], plus_one)
    _set(head.weight, head.weight.detach().double() @ q1)
    if "r4" in specs:
        install_online(model, layout, specs["r4"])
    return {"untied_head": untied,
            "rotations": {name: spec.to_dict() for name, spec in specs.items()},
            "online": {"mlp.down_proj": "r4"} if "r4" in specs else {}}


def _rotate_heads(block: nn.Module, spec: RotationSpec, config) -> None:
    q = spec.matrix(torch.float64)
    hd = spec.n
    v = _linear(block, "self_attn.v_proj")
    w = v.weight.detach().double()  # [kv_heads·hd, hidden]
    _set(v.weight, torch.einsum("ji,hjk->hik", q, w.reshape(-1, hd, w.shape[1]))
         .reshape(w.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.detach().double().reshape(-1, hd) @ q).reshape(-1))
    o = _linear(block, "self_attn.o_proj")
    w = o.weight.detach().double()  # [hidden, heads·hd]
    _set(o.weight, (w.reshape(w.shape[0], -1, hd) @ q).reshape(w.shape))


def install_online(model: nn.Module, layout: ModelLayout, spec: RotationSpec) -> list:
    """x → x·Q on every down_proj input, before any other pre-hook (input quantization)."""
    def hook(module, args):
        return (spec.apply(args[0]), *args[1:])

    return [_linear(block, "mlp.down_proj").register_forward_pre_hook(hook, prepend=True)
            for block in blocks_of(model, layout)]

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
Supported: families whose record (mpq.models.families) has a ``rotation`` part, which names the
norms and the linears they feed, the residual writers and the final norm; R2 uses the record's
attention v/o projections (with q/k/v fused, as Phi-3 stores them: the last kv_heads·head_dim
rows of the fused projection, q, k and v being concatenated in that order) and R4 its
``mlp_down``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpq.models.families import FAMILIES, family_of
from mpq.models.family import Family
from mpq.models.layout import ModelLayout, blocks_of, untie_head
from mpq.errors import ModelError, SchemeError
from mpq.config.rotation import QuaRotArgs
from mpq.rotation.hadamard import RotationSpec, orthogonal_for


def _config_int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def head_dim_of(config) -> int:
    return _config_int(config, "head_dim") or config.hidden_size // config.num_attention_heads


def check_supported(model: nn.Module) -> Family:
    """The model's family record; ModelError unless it declares rotation support."""
    family = family_of(model)
    if family is None or family.rotation is None:
        model_type = getattr(model.config, "model_type", None)
        supported = [t for t, f in FAMILIES.model_types().items() if f.rotation is not None]
        why = (f" (family '{family.name}'): {family.why_not('rotation')}" if family is not None
               else ": no family record names its norms and residual-stream readers/writers")
        raise ModelError(f"QuaRot rotation does not support model type '{model_type}'{why}",
                         hint=f"supported: {', '.join(supported)}; remove rotation:")
    return family


def online_site(model: nn.Module) -> str | None:
    """The block path whose input R4 rotates online (the family's ``mlp_down``), or None when
    the model's family does not support rotation."""
    family = family_of(model)
    return family.mlp_down if family is not None and family.rotation is not None else None


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
    family = check_supported(model)
    sites, attention = family.rotation, family.attention
    specs = rotation_specs(model, args)
    plus_one = family.plus_one_norm
    untied = untie_head(model)
    q1 = specs["r1"].matrix(torch.float64)
    embed = model.get_input_embeddings()
    _set(embed.weight, embed.weight.detach().double() @ q1)
    head = model.get_output_embeddings()
    for block in blocks_of(model, layout):
        for norm_name, readers in sites.readers:
            linears = [_linear(block, name) for name in readers]
            _fuse_norm(block.get_submodule(norm_name), linears, plus_one)
            for linear in linears:
                _set(linear.weight, linear.weight.detach().double() @ q1)
        for name in sites.writers:
            linear = _linear(block, name)
            _set(linear.weight, q1.T @ linear.weight.detach().double())
            if linear.bias is not None:
                _set(linear.bias, linear.bias.detach().double() @ q1)
        if "r2" in specs:
            v_proj = attention.qkv_proj if attention.fused else attention.v_proj
            _rotate_heads(_linear(block, v_proj), _linear(block, attention.o_proj),
                          specs["r2"], v_rows(model.config) if attention.fused else None)
        if "r4" in specs:
            down = _linear(block, family.mlp_down)
            _set(down.weight, down.weight.detach().double() @ specs["r4"].matrix(torch.float64))
    _fuse_norm(model.get_submodule(sites.final_norm), [head], plus_one)
    _set(head.weight, head.weight.detach().double() @ q1)
    if "r4" in specs:
        install_online(model, layout, specs["r4"])
    return {"untied_head": untied,
            "rotations": {name: spec.to_dict() for name, spec in specs.items()},
            "online": {family.mlp_down: "r4"} if "r4" in specs else {}}


def v_rows(config) -> int:
    """How many rows of a fused q/k/v projection are v's: the last kv_heads·head_dim."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads * head_dim_of(config)


def _rotate_heads(v: nn.Linear, o: nn.Linear, spec: RotationSpec, last: int | None = None
                  ) -> None:
    """R2: each v head's rows (of ``v``, or its last ``last`` rows when q/k/v are fused) → Qᵀ·W,
    each query head's o_proj columns → W·Q."""
    q = spec.matrix(torch.float64)
    hd = spec.n
    weight = v.weight.detach().double()  # [(q + k +) kv_heads·hd, hidden]
    rows = slice(weight.shape[0] - (last or weight.shape[0]), weight.shape[0])
    w = weight[rows]
    weight[rows] = torch.einsum("ji,hjk->hik", q, w.reshape(-1, hd, w.shape[1])).reshape(w.shape)
    _set(v.weight, weight)
    if v.bias is not None:
        bias = v.bias.detach().double()
        bias[rows] = (bias[rows].reshape(-1, hd) @ q).reshape(-1)
        _set(v.bias, bias)
    w = o.weight.detach().double()  # [hidden, heads·hd]
    _set(o.weight, (w.reshape(w.shape[0], -1, hd) @ q).reshape(w.shape))


def install_online(model: nn.Module, layout: ModelLayout, spec: RotationSpec) -> list:
    """x → x·Q on every input of the family's ``mlp_down`` (down_proj), before any other
    pre-hook (input quantization)."""
    site = check_supported(model).mlp_down

    def hook(module, args):
        return (spec.apply(args[0]), *args[1:])

    return [_linear(block, site).register_forward_pre_hook(hook, prepend=True)
            for block in blocks_of(model, layout)]

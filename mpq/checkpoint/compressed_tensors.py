"""The ``compressed-tensors`` format: what vLLM and transformers (with the compressed-tensors
package) load.  Facts: FORMATS.md, checked against compressed-tensors 0.20 (``CT_VERSION``).

Per quantized Linear ``<p>``, the per-layer format is the one compressed-tensors itself infers
(``infer_module_format``; the test suite checks the two agree):

- ``pack-quantized`` (int weights, no activation quantization): ``weight_packed`` int32
  [N, ceil(K·b/32)] (the same dense little-endian layout as mpq's ``qweight``), ``weight_scale``
  [N, G] (tensor: [1]), ``weight_shape`` int64 [2]; asymmetric: ``weight_zero_point`` int32
  [ceil(N·b/32), G] (mpq's packed zero points: both store zero + 2^(b−1)).
- ``int-quantized`` (int weights with quantized activations): ``weight`` int8 [N, K] signed codes,
  ``weight_scale``, asymmetric ``weight_zero_point`` int8 [N, G].
- ``float-quantized`` (fp8_e4m3 weights with quantized activations) and ``naive-quantized``
  (fp8_e4m3 weights only): ``weight`` float8_e4m3fn [N, K], ``weight_scale`` [1] or [N, 1].
- ``float-quantized`` / ``naive-quantized`` with 128×128 block scales (fp8_e4m3 granularity
  block): ``weight`` float8_e4m3fn, ``weight_scale`` [ceil(N/128), ceil(K/128)].
- ``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized``: ``weight_packed`` uint8 [N, K/2] (two E2M1
  codes per byte, low nibble first) and ``weight_scale`` (mxfp4: uint8 E8M0 [N, K/32]; nvfp4:
  float8_e4m3fn [N, K/16]); nvfp4 adds ``weight_global_scale`` fp32 [1] (a divisor).
  ``mxfp8-quantized``: ``weight`` float8_e4m3fn, ``weight_scale`` uint8 E8M0 [N, K/32].  These
  are mpq's native tensors unchanged.
- static input activations: ``input_scale`` [1].
- KV cache (``kv_cache_scheme``, static fp8 per tensor or ``attn_head``): ``k_scale`` and
  ``v_scale`` fp32 ([1] or [kv_heads, 1, 1]) on each attention module, as mpq stores them.
  int8/int4 asymmetric KV caches are refused (:func:`kv_unsupported`: native only).

Int and fp8 scales are stored in the model's dtype (compressed-tensors' default ``scale_dtype``:
its loader allocates them in the dtype of the weights), which is the artifact's storage dtype
(the recipe's ``storage_dtype``, mpq.checkpoint.storage).  For fp32 storage the stored state is
exactly mpq's; for bf16/fp16 storage it is exact when the plan's int scales have that
``scale_dtype`` (the quantizer rounded them before computing the codes), and rounded otherwise:
the pre-flight check warns about those layers (``--strict`` refuses them).  One config group per distinct scheme; its targets
are ``["Linear"]`` when it covers every quantized layer, else the layers' exact names; unquantized
Linears go to ``ignore``.  A mix of per-layer formats makes the top-level format
``mixed-precision``.  mpq's metadata stays out of the scheme args (which reject unknown keys): it
is in the safetensors header and config.json's top-level ``mpq`` key.

Which number format maps to what is the format's own record
(``NumberFormat.compressed_tensors``, :class:`mpq.numerics.mappings.CompressedTensorsMapping`):
its type, layout (``int``, ``float`` or its ``native`` tensors renamed), per-layer formats,
strategy and scale dtype; or :class:`~mpq.numerics.mappings.NotExpressible` with the reason.  Not
expressible (refused, layer by layer): formats without a mapping (nf4, fp8_e5m2, ...), asymmetric
zero points at a granularity the mapping does not store them (per-tensor int), quantized inputs
where the mapping has no such format (mxfp4, mxfp8, nvfp4), act-order without static groups
(compressed-tensors ≥ 0.20 stores no g_idx), and a quantized input embedding (the package lists
nn.Embedding as compressible, but mpq does not write it: transformers' load of it, with a tied
head, is not verified).
"""
from __future__ import annotations

import json
from collections import defaultdict

import torch

from mpq.errors import FormatError
from mpq.checkpoint.native_codec import encode
from mpq.checkpoint.state import ArtifactState
from mpq.checkpoint.writers import (WRITERS, FolderContents, dense_group, moe_problems,
                                    mpq_config_key)
from mpq.numerics.packing import pack_cols
from mpq.config.kv_cache import KVCacheArgs
from mpq.config.plan import LayerPlan, Plan
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.args import FP8_BLOCK, ActivationArgs, WeightArgs
from mpq.numerics.mappings import CompressedTensorsMapping
from mpq.config.scheme import LayerScheme

# compressed-tensors quantizes nn.Linear-like modules (weight_packed / weight_scale under the
# module's name); transformers 5 holds Qwen3-MoE/Mixtral experts as fused 3-D parameters of one
# module, which its compressed-tensors loader neither targets nor decompresses
MOE_REASON = ("compressed-tensors stores quantized nn.Linear modules; transformers holds these "
              "experts as 3-D parameters its compressed-tensors loader cannot decompress")

CT_VERSION = "0.20.0"
FORMAT_NAME = "compressed-tensors"
VLLM_INT_BITS = (4, 8)
VLLM_GROUPS = (None, 32, 64, 128)  # None: per channel


def mapping_of(args: WeightArgs | ActivationArgs) -> CompressedTensorsMapping:
    """The compressed-tensors record of ``args``' number format (expressible ones only)."""
    mapping = NUMBER_FORMATS.get(args.format).compressed_tensors
    if not isinstance(mapping, CompressedTensorsMapping):
        raise FormatError(f"{mapping.reason}")
    return mapping


def weight_args(args: WeightArgs, options: dict) -> dict:
    """compressed-tensors QuantizationArgs (as JSON) for mpq's weight args."""
    mapping = mapping_of(args)
    out = {"num_bits": args.bits, "type": mapping.type,
           "symmetric": args.symmetric, "group_size": None, "block_structure": None,
           "dynamic": False, "actorder": "weight" if options.get("act_order") else None}
    if mapping.strategy is not None:  # fixed by the format (the microscaled ones)
        return {**out, "strategy": mapping.strategy, "group_size": args.group_size,
                "scale_dtype": mapping.scale_dtype}
    if args.granularity == "block":
        return {**out, "strategy": "block", "block_structure": [FP8_BLOCK, FP8_BLOCK]}
    return {**out, "strategy": args.granularity,
            "group_size": args.group_size if args.granularity == "group" else None}


def activation_args(acts: ActivationArgs) -> dict:
    return {"num_bits": acts.bits, "type": mapping_of(acts).type,
            "symmetric": True, "strategy": acts.granularity, "group_size": None,
            "block_structure": None, "dynamic": acts.dynamic, "actorder": None}


def layer_format(scheme: LayerScheme) -> str:
    """compressed-tensors' per-layer format for ``scheme`` (its own inference order)."""
    return mapping_of(scheme.weights).layer_format(scheme.input_activations is not None)


EMBEDDING_REASON = ("a quantized input embedding: compressed-tensors 0.20 lists nn.Embedding "
                    "among its compressible modules, but mpq does not write one (loading it "
                    "through transformers, tied head included, is not verified)")


def why_unsupported(layer: LayerPlan) -> str | None:
    if layer.embedding:
        return EMBEDDING_REASON
    if layer.class_name == "Conv1D":  # compressed-tensors' targets match nn.Linear subclasses
        return ("a Conv1D (GPT-2's transposed linear), which compressed-tensors does not "
                "quantize: transformers would read its packed weight as float")
    scheme = layer.scheme
    args = scheme.weights
    options = dict(scheme.options)
    mapping = NUMBER_FORMATS.get(args.format).compressed_tensors
    if not isinstance(mapping, CompressedTensorsMapping):
        return mapping.reason
    if mapping.layer_format(scheme.input_activations is not None) is None:
        return f"input activation quantization with {args.format} weights (mpq quantizes " \
               "activations to int or fp8 only)"
    if not args.symmetric and args.granularity not in mapping.zero_points:
        return f"asymmetric per-{args.granularity} {args.format} weights (compressed-tensors " \
               f"packs zero points only per {' or '.join(mapping.zero_points)})"
    if options.get("act_order") and not options.get("static_groups") \
            and args.granularity == "group":
        return "act_order without static_groups needs a g_idx, which compressed-tensors " \
               "(≥ 0.20) does not store; set static_groups: true"
    return None


def _scheme_key(layer: LayerPlan) -> str:
    scheme = layer.scheme
    acts = scheme.input_activations
    return json.dumps([weight_args(scheme.weights, dict(scheme.options)),
                       activation_args(acts) if acts else None], sort_keys=True)


def kv_unsupported(kv_cache: KVCacheArgs | None) -> str | None:
    """Why ``kv_cache`` cannot be written as a ``kv_cache_scheme`` (None: it can).

    int8/int4 asymmetric KV: QuantizationArgs could name int asymmetric ``attn_head``/``group``
    args, but no loader runs them as mpq does: vLLM's compressed-tensors KV method takes only
    symmetric 8-bit float scales, and compressed-tensors itself computes zero points from a range
    widened to include 0 (and warns that asymmetric KV is unsupported by vLLM), so a loaded
    artifact would quantize its cache differently from the one mpq measured."""
    if kv_cache is None or not kv_cache.is_int:
        return None
    return (f"{kv_cache.format} asymmetric KV cache (vLLM reads only symmetric fp8 KV scales "
            "from kv_cache_scheme, and compressed-tensors' own int zero points differ from "
            "mpq's): native format (mpq) only")


def kv_cache_scheme(kv_cache: KVCacheArgs | None) -> dict | None:
    """The KV-cache QuantizationArgs: static fp8 per tensor or per attention head."""
    if kv_cache is None:
        return None
    strategy = "tensor" if kv_cache.granularity == "tensor" else "attn_head"
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
            "group_size": None, "block_structure": None, "dynamic": False, "actorder": None}


def quantization_config(plan: Plan) -> dict:
    """config.json's ``quantization_config`` for ``plan``."""
    quantized = plan.quantized()
    groups: dict[str, list[LayerPlan]] = defaultdict(list)
    for layer in quantized:
        groups[_scheme_key(layer)].append(layer)
    config_groups, formats = {}, set()
    for index, layers in enumerate(groups.values()):
        scheme = layers[0].scheme
        fmt = layer_format(scheme)
        formats.add(fmt)
        targets = (["Linear"] if len(layers) == len(quantized)
                   else [layer.name for layer in layers])
        acts = scheme.input_activations
        config_groups[f"group_{index}"] = {
            "targets": targets,
            "weights": weight_args(scheme.weights, dict(scheme.options)),
            "input_activations": activation_args(acts) if acts is not None else None,
            "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "version": CT_VERSION,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": [layer.name for layer in plan.layers if layer.scheme is None],
            "kv_cache_scheme": kv_cache_scheme(plan.kv_cache),
            "sparsity_config": {}, "transform_config": {},
            "global_compression_ratio": None}


def layer_tensors(qw: QuantizedWeight, scheme: LayerScheme, dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """One quantized layer's tensors under compressed-tensors' local names."""
    args = qw.args
    n, k = qw.shape
    mapping = mapping_of(args)
    fmt = mapping.layer_format(scheme.input_activations is not None)
    if mapping.layout == "native":  # the native encoding already has compressed-tensors' layout
        names = dict(mapping.names)
        return {names[key]: tensor for key, tensor in encode(qw).items()}
    scale = qw.scale.to(dtype)
    scale = scale.reshape(1) if args.granularity == "tensor" else scale.contiguous()
    if mapping.layout == "float":
        return {"weight": qw.codes.contiguous(), "weight_scale": scale}
    offset = 1 << (args.bits - 1)
    out = {"weight_scale": scale}
    if fmt == "pack-quantized":
        out["weight_packed"] = encode(qw)["qweight"]  # same layout (see the module docstring)
        out["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if qw.zero is not None:
            out["weight_zero_point"] = pack_cols(qw.zero.to(torch.uint8), args.bits)
    else:  # int-quantized: signed codes, unpacked
        out["weight"] = (qw.codes.to(torch.int16) - offset).to(torch.int8)
        if qw.zero is not None:
            out["weight_zero_point"] = (qw.zero.to(torch.int16) - offset).to(torch.int8)
    return out


def scale_rounding_problems(plan: Plan) -> list[str]:
    """Layers whose scales (int, fp8: stored in the model's dtype, the artifact's
    storage_dtype) that dtype cannot hold exactly: their scale_dtype is neither it nor wider
    storage (fp32 storage holds every scale exactly)."""
    storage = plan.storage_dtype
    if storage in (None, "fp32"):
        return []
    rounded: dict[str, list[str]] = defaultdict(list)
    for layer in plan.quantized():
        mapping = NUMBER_FORMATS.get(layer.scheme.weights.format).compressed_tensors
        if isinstance(mapping, CompressedTensorsMapping) and mapping.layout != "native" \
                and layer.scheme.weights.scale_dtype != storage:
            rounded[layer.scheme.weights.scale_dtype].append(layer.name)
    return [f"scales: {len(names)} layer(s) with {scale_dtype} scales, e.g. "
            f"{', '.join(names[:3])}, are rounded to {storage} (compressed-tensors keeps "
            f"scales in the model's dtype); set weights scale_dtype: {storage} (int) so the "
            "algorithm uses the scales that are stored" for scale_dtype, names in rounded.items()]


def vllm_scheme_reasons(layer: LayerPlan) -> list[str]:
    """Why vLLM's int kernels do not take ``layer``'s weight scheme at all (bits, symmetry,
    scale granularity: FORMATS.md); empty for a scheme they take or a non-int format."""
    args = layer.scheme.weights
    mapping = NUMBER_FORMATS.get(args.format).compressed_tensors
    if not isinstance(mapping, CompressedTensorsMapping) or mapping.layout != "int":
        return []
    reasons = []
    if not args.symmetric:
        reasons.append("asymmetric weights")
    if args.bits not in VLLM_INT_BITS:
        reasons.append(f"{args.bits}-bit weights (kernels take 4 or 8)")
    group = args.group_size if args.granularity == "group" else None
    if group not in VLLM_GROUPS or args.granularity == "tensor":
        reasons.append("scale granularity (kernels take channel or group 32/64/128)")
    return reasons


def vllm_shape_reasons(layer: LayerPlan) -> list[str]:
    """Why vLLM's fastest int kernels (Marlin) do not take ``layer``'s shape: a property of the
    model, not of the scheme (other, slower kernels may)."""
    args = layer.scheme.weights
    mapping = NUMBER_FORMATS.get(args.format).compressed_tensors
    if not isinstance(mapping, CompressedTensorsMapping) or mapping.layout != "int":
        return []
    n, k = layer.shape
    return ((["input size K not a multiple of 128"] if k % 128 else [])
            + (["output size N not a multiple of 64"] if n % 64 else []))


def vllm_int_kernel_problems(plan: Plan) -> list[str]:
    """Layers vLLM's fast int kernels would not take (FORMATS.md), grouped by reason."""
    reasons: dict[str, list[str]] = defaultdict(list)
    for layer in plan.quantized():
        for why in vllm_scheme_reasons(layer) + vllm_shape_reasons(layer):
            reasons[why].append(layer.name)
    return [f"{why}: {len(names)} layer(s), e.g. {', '.join(names[:3])}"
            for why, names in reasons.items()]


class CompressedTensorsWriter:
    """compressed-tensors (pack/int/float, mxfp4/mxfp8/nvfp4, mixed-precision): vLLM, transformers."""

    name = FORMAT_NAME
    online_rotations = False  # mpq does not write compressed-tensors' transform_config
    load_hint = ("# pip install compressed-tensors; from transformers import "
                 "AutoModelForCausalLM; model = AutoModelForCausalLM.from_pretrained("
                 '"path/to/this/folder")')

    def unsupported(self, plan: Plan) -> list[str]:
        kv = [f"kv_cache: {why}"] if (why := kv_unsupported(plan.kv_cache)) else []
        return moe_problems(plan, MOE_REASON) + [
            f"{layer.name}: {why}" for layer in plan.quantized()
            if layer.expert is None and (why := why_unsupported(layer)) is not None] + kv

    def preflight(self, plan: Plan) -> list[str]:
        return ([f"vLLM int kernels: {problem}" for problem in vllm_int_kernel_problems(plan)]
                + scale_rounding_problems(plan))

    def contents(self, state: ArtifactState) -> FolderContents:
        dtype = state.dtype()
        tensors = dense_group(state)
        for layer in state.plan.quantized():
            if layer.name not in state.qweights:
                raise FormatError(f"layer {layer.name} is planned but has no quantized weight",
                                  hint="the artifact is incomplete; re-run mpq quantize")
            tensors.add(lambda layer=layer: {
                f"{layer.name}.{local}": tensor for local, tensor in layer_tensors(
                    state.qweights[layer.name], layer.scheme, dtype).items()})
            input_scale = state.log.input_scale(layer.name)
            if input_scale is not None:
                tensors.add_tensor(f"{layer.name}.input_scale", torch.tensor(
                    [input_scale], dtype=dtype))
        config = {**state.config, "quantization_config": quantization_config(state.plan),
                  "mpq": mpq_config_key(state, self.name)}
        return FolderContents(tensors=tensors, config=config,
                              code_keys=("weight_packed", "weight"))


COMPRESSED_TENSORS = WRITERS.register(FORMAT_NAME)(CompressedTensorsWriter())

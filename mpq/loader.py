"""``mpq.load``: an mpq artifact back as a runnable transformers model.

The model skeleton is built from config.json with parameters on the meta device (no random init,
no full-size allocation); quantized layers become :class:`QuantLinear` modules holding their packed
tensors (or plain ``nn.Linear`` with dequantized weights when ``dequantize=True``), a quantized
input embedding a :class:`QuantEmbedding` (or its own module with the dequantized table), and a
tied head that shares the embedding's quantized tensor (mpq.config.tying) uses the very same
tensors; everything else is assigned from the checkpoint.  Tensors are views of the memory-mapped
tensor files (mpq.checkpoint.mapped), not copies; with ``kernels=True`` the stored codes of the
packed layers are paged out once packed (mpq.memory.page_out).  Missing or unexpected tensors and shape mismatches are
:class:`ArtifactError`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mpq.memory import page_out, release_free_memory
from mpq.models.layout import blocks_of, is_linear, layout_of, weight_of
from mpq.errors import ArtifactError, OptionError
from mpq.checkpoint.mapped import map_tensors
from mpq.checkpoint.native import FORMAT_NAME, open_artifact, written_format
from mpq.checkpoint.verify import require_intact
from mpq.checkpoint.native_codec import decode, split_layer_tensors
from mpq.rotation.hadamard import RotationSpec
from mpq.rotation.quarot import install_online, online_site
from mpq.quantizers.kv_cache import attach_kv_quantization, tensor_names, tensor_shape
from mpq.config.kv_cache import KVCacheArgs
from mpq.config.run_log import RunLog
from mpq.models.attention import attention_modules, kv_geometry
from mpq.models.source import build_skeleton, first_line
from mpq.models.experts import is_fused_experts, routers, split_slice, unsupported_layout
from mpq.runtime.qembedding import QuantEmbedding
from mpq.runtime.qexperts import QuantExperts
from mpq.runtime.kernels import DECODE
from mpq.runtime.qlinear import QuantLinear, quantize_inputs_hook

CONVERT_BYTES = 8 << 20  # stored bytes converted to the compute dtype at a time


def _quantized_module(name: str, layer, local: dict[str, torch.Tensor], existing: nn.Module,
                      dequantize: bool, dtype: torch.dtype, kernels: bool,
                      activations: bool = True) -> nn.Module:
    if not is_linear(existing):
        raise ArtifactError(f"artifact quantizes '{name}' but the model built from config.json "
                            f"has a {type(existing).__name__} there",
                            hint="config.json does not match the tensors; re-run mpq quantize")
    n_out, n_in = layer.shape
    expected = tuple(weight_of(existing).shape)
    if expected != (n_out, n_in):
        raise ArtifactError(f"'{name}': artifact shape {tuple(layer.shape)} does not match the "
                            f"model's {expected}", hint="config.json and tensors disagree")
    bias = local.pop("bias", None)
    acts = layer.scheme.input_activations
    input_scale = _input_scale(name, local.pop("input_scale", None), acts)
    if not activations:  # checked above, not applied
        acts, input_scale = None, None
    qw = decode(local, layer.scheme.weights, tuple(layer.shape), prefix=f"{name}.")
    if not dequantize:
        return QuantLinear(layer.scheme.weights, tuple(layer.shape), local,
                           bias.to(dtype) if bias is not None else None,
                           input_args=acts, input_scale=input_scale, kernels=kernels)
    linear = nn.Linear(n_in, n_out, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    if acts is not None:
        linear.register_forward_pre_hook(quantize_inputs_hook(acts, input_scale))
        linear.input_args, linear.input_scale = acts, input_scale  # what the hook applies
    return linear


def _embedding_module(name: str, layer, local: dict[str, torch.Tensor], existing: nn.Module,
                      dequantize: bool, dtype: torch.dtype, kernels: bool) -> nn.Module:
    """The quantized input embedding: a QuantEmbedding, or (``dequantize``) the model's own
    embedding module holding the dequantized table."""
    if not isinstance(existing, nn.Embedding):
        raise ArtifactError(f"artifact quantizes the embedding '{name}' but the model built from "
                            f"config.json has a {type(existing).__name__} there",
                            hint="config.json does not match the tensors; re-run mpq quantize")
    if tuple(existing.weight.shape) != tuple(layer.shape):
        raise ArtifactError(f"'{name}': artifact shape {tuple(layer.shape)} does not match the "
                            f"model's {tuple(existing.weight.shape)}",
                            hint="config.json and tensors disagree")
    if dequantize:
        qw = decode(local, layer.scheme.weights, tuple(layer.shape), prefix=f"{name}.")
        existing.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
        return existing
    module = QuantEmbedding(existing, layer.scheme.weights, tuple(layer.shape), local, dtype)
    # checked on one row: the whole table decoded at once would hold its codes unpacked
    # (several times the table's stored size) for nothing
    module.check(prefix=f"{name}.")
    return module


def _share_head(model: nn.Module, head: str, source: str, dequantize: bool,
                kernels: bool) -> None:
    """Give the tied head ``head`` the quantized table of the embedding ``source``."""
    embedding = model.get_submodule(source)
    existing = model.get_submodule(head)
    if not is_linear(existing) or tuple(weight_of(existing).shape) != (
            embedding.num_embeddings, embedding.embedding_dim):
        raise ArtifactError(f"'{head}' shares the quantized table of '{source}', but the model "
                            "built from config.json has no matching linear there",
                            hint="config.json does not match the tensors; re-run mpq quantize")
    if dequantize:
        existing.weight = embedding.weight  # tied, as in the source model
        return
    model.set_submodule(head, QuantLinear(embedding.args, (embedding.num_embeddings,
                                                           embedding.embedding_dim),
                                          embedding.encoded(), kernels=kernels))


def _load_moe_layer(model: nn.Module, layer, local: dict[str, torch.Tensor],
                    experts: dict, dequantize: bool, dtype: torch.dtype) -> None:
    """An expert slice goes into ``experts`` (as a QuantLinear, or its dequantized weight); a
    quantized router gets its dequantized weight (it is not a linear module)."""
    if layer.scheme.input_activations is not None:
        raise ArtifactError(f"'{layer.name}' has input activation quantization, which mpq does "
                            "not support on MoE experts or routers",
                            hint="the artifact was not written by this mpq version")
    qw = decode(local, layer.scheme.weights, tuple(layer.shape), prefix=f"{layer.name}.")
    if layer.expert is None:  # the router
        router = model.get_submodule(layer.name)
        if tuple(router.weight.shape) != tuple(layer.shape):
            raise ArtifactError(f"'{layer.name}': artifact shape {tuple(layer.shape)} does not "
                                f"match the model's {tuple(router.weight.shape)}",
                                hint="config.json and tensors disagree")
        router.weight = nn.Parameter(qw.dequantize(dtype), requires_grad=False)
        return
    module_name, projection, index = split_slice(layer.name)
    value = qw.dequantize(dtype) if dequantize else QuantLinear(
        layer.scheme.weights, tuple(layer.shape), local)
    experts.setdefault(module_name, {}).setdefault(projection, {})[index] = value


def _install_experts(model: nn.Module, experts: dict, dequantize: bool) -> None:
    """Give each fused experts module its quantized projections: a QuantExperts module, or
    (``dequantize``) dense parameters stacked from the dequantized slices."""
    for module_name, projections in experts.items():
        try:
            original = model.get_submodule(module_name)
        except AttributeError:
            original = None
        if original is None or not is_fused_experts(original) or unsupported_layout(original):
            raise ArtifactError(f"artifact quantizes experts of '{module_name}', which the model "
                                "built from config.json does not hold as supported fused experts",
                                hint="config.json does not match the tensors; re-run mpq quantize")
        stacked = {}
        for projection, slices in projections.items():
            param = getattr(original, projection)
            if sorted(slices) != list(range(param.shape[0])):
                raise ArtifactError(f"'{module_name}.{projection}': the artifact holds experts "
                                    f"{sorted(slices)}, the model has {param.shape[0]}",
                                    hint="the artifact is incomplete; re-run mpq quantize")
            ordered = [slices[index] for index in range(param.shape[0])]
            for index, value in enumerate(ordered):
                shape = tuple(value.shape) if dequantize else (value.out_features,
                                                               value.in_features)
                if shape != tuple(param.shape[1:]):
                    raise ArtifactError(f"'{module_name}.{projection}.{index}': artifact shape "
                                        f"{shape} does not match the model's "
                                        f"{tuple(param.shape[1:])}",
                                        hint="config.json and tensors disagree")
            stacked[projection] = ordered
        if dequantize:
            for projection, ordered in stacked.items():
                setattr(original, projection,
                        nn.Parameter(torch.stack(ordered), requires_grad=False))
        else:
            model.set_submodule(module_name, QuantExperts(original, stacked))


def _input_scale(name: str, scale: torch.Tensor | None, acts) -> torch.Tensor | None:
    """The stored static activation scale, checked against the layer's scheme."""
    static = acts is not None and not acts.dynamic
    if static and scale is None:
        raise ArtifactError(f"missing tensor '{name}.input_scale' (static input activations)",
                            hint="the artifact is incomplete; re-run mpq quantize")
    if scale is None:
        return None
    if not static:
        raise ArtifactError(f"unexpected tensor '{name}.input_scale': the layer's scheme has no "
                            "static input activations", hint="the artifact does not match its plan")
    if tuple(scale.shape) != (1,) or scale.dtype != torch.float32 or not bool(
            torch.isfinite(scale).all() and (scale > 0).all()):
        raise ArtifactError(f"tensor '{name}.input_scale' must be one positive finite fp32 "
                            f"value, got shape {tuple(scale.shape)} {scale.dtype}")
    return scale


def _attach_kv_cache(model: nn.Module, args: KVCacheArgs, tensors: dict[str, torch.Tensor],
                     activations: bool = True) -> None:
    """Take each attention module's stored KV tensors (mpq.quantizers.kv_cache.tensor_names:
    k_scale/v_scale, plus k_zero/v_zero for int; none for a dynamic scheme) out of ``tensors``
    (checked) and make the module fake-quantize its cached keys and values with them (without
    ``activations``: only keep them as the module's buffers)."""
    layout = layout_of(model)
    head_dim = kv_geometry(model.config)[1]
    for index, block in enumerate(blocks_of(model, layout)):
        for local, module in attention_modules(model, block):
            name = f"{layout.blocks_path}.{index}.{local}"
            found = {}
            for tensor_name in tensor_names(args):
                key = f"{name}.{tensor_name}"
                tensor = tensors.pop(key, None)
                if tensor is None:
                    raise ArtifactError(f"missing tensor '{key}' (the plan quantizes the KV cache)",
                                        hint="the artifact is incomplete; re-run mpq quantize")
                heads = tensor.shape[0] if tensor.dim() == 3 else 1  # as the family's module has
                expected = tensor_shape(args, heads, head_dim)
                positive = tensor_name.endswith("scale")
                if tuple(tensor.shape) != expected or tensor.dtype != torch.float32 or not bool(
                        torch.isfinite(tensor).all() and (not positive or (tensor > 0).all())):
                    kind = "positive finite" if positive else "finite"
                    raise ArtifactError(f"tensor '{key}' must be {kind} fp32 of shape "
                                        f"{expected}, got {tuple(tensor.shape)} {tensor.dtype}")
                found[tensor_name] = tensor
            if activations:
                attach_kv_quantization(module, args, found)
            else:
                for tensor_name, tensor in found.items():
                    module.register_buffer(tensor_name, tensor.clone())


def compute_dtype(config, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """config.json's ``dtype`` (the dtype the quantizing run computed in; the artifact may
    store its float tensors narrower, mpq.checkpoint.storage), else that of the first float
    tensor stored, else float32."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named.replace("torch.", ""), None)
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    return next((t.dtype for t in tensors.values() if t.is_floating_point()
                 and t.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)), torch.float32)


def load(path: str | Path, *, dequantize: bool = False, dtype: torch.dtype | None = None,
         verify: bool = True, kernels: bool = False, activations: bool = True) -> nn.Module:
    """Load the artifact at ``path`` on CPU in eval mode.

    ``verify``: first, before reading anything else, check every file of the folder against
    the size and sha256 the artifact recorded (config.json, tensor files, tokenizer…) and that
    no unrecorded file a loader could read was added (mpq.checkpoint.verify.require_intact;
    ArtifactError naming the first failure).
    ``dequantize=False`` keeps quantized layers packed (memory stays low, weights decoded per
    forward); ``True`` dequantizes every layer once up front (faster forwards).  ``dtype`` is the
    compute dtype of unquantized tensors (default: :func:`compute_dtype`, the dtype the run
    computed in; tensors stored narrower, e.g. under ``storage_dtype: bf16``, are upcast).
    ``kernels=True`` (with ``dequantize=False``): layers whose scheme one of torch's packed CPU
    kernels computes exactly up to float rounding — symmetric int ≤ 4 bits in groups of
    32/64/128/256, symmetric int ≤ 8 bits per channel, no act-order, no input quantization —
    are packed once and run that kernel in bf16 (mpq.runtime.kernels); the others decode as
    usual.  Off by default: it changes an fp32 model's outputs by bf16 rounding (less than
    running the model in bf16), and evaluation keeps the reference decode.  OptionError
    together with ``dequantize=True``.  :func:`mpq.runtime.qlinear.layer_paths` lists the path of each layer.
    ``activations=False``: weights only: input activations and the KV cache are not
    fake-quantized (their stored scales are still checked, and the KV scales kept as the
    attention modules' buffers): the model on which the pipeline measures static scales
    (mpq.analysis.recalibrate).
    """
    from transformers import AutoConfig

    if kernels and dequantize:
        raise OptionError("mpq.load: kernels=True and dequantize=True exclude each other",
                          hint="kernels run on packed weights; dequantize=True makes them dense")
    if verify and written_format(path) == FORMAT_NAME:  # other folders: open_artifact says why
        require_intact(path)
    artifact = open_artifact(path)
    config = AutoConfig.from_pretrained(artifact.path, local_files_only=True)
    tensors = map_tensors(artifact)  # views of the mapped files (mpq.checkpoint.mapped)
    if dtype is None:
        dtype = compute_dtype(config, tensors)
    model = build_skeleton(config, dtype)
    gates = {name for name, _ in routers(model)}
    experts: dict[str, dict[str, dict[int, nn.Module]]] = {}  # module → projection → slices
    shared: dict[str, str] = {}  # a tied head → the embedding whose tensor it uses
    for layer in artifact.plan.quantized():
        if (source := artifact.plan.shared_with(layer.name)) is not None:
            shared[layer.name] = source
            continue
        local = split_layer_tensors(tensors, layer.name)
        if layer.expert is not None or layer.name in gates:
            try:
                _load_moe_layer(model, layer, local, experts, dequantize, dtype)
            except ArtifactError as exc:  # name the artifact too
                raise ArtifactError(f"{artifact.path}: {exc.message}", hint=exc.hint) from None
            continue
        try:
            existing = model.get_submodule(layer.name)
        except AttributeError:
            raise ArtifactError(f"artifact quantizes '{layer.name}', which the model built from "
                                "config.json does not have") from None
        try:
            module = (_embedding_module(layer.name, layer, local, existing, dequantize, dtype,
                                        kernels) if layer.embedding else
                      _quantized_module(layer.name, layer, local, existing, dequantize, dtype,
                                        kernels, activations))
        except ArtifactError as exc:  # name the artifact too
            raise ArtifactError(f"{artifact.path}: {exc.message}", hint=exc.hint) from None
        model.set_submodule(layer.name, module)
        if kernels:  # now, before the next layer's codes are read and decoded
            _page_out_packed(module)
            release_free_memory()  # the decoded codes (glibc keeps freed pages otherwise)
    for head, source in shared.items():
        plan_source = artifact.plan.get(source)
        if plan_source is None or plan_source.scheme is None or not plan_source.embedding:
            raise ArtifactError(f"{artifact.path}: {head} shares the quantized tensor of "
                                f"{source}, which the plan does not quantize as an embedding",
                                hint="the artifact metadata is damaged")
        try:
            _share_head(model, head, source, dequantize, kernels)
        except ArtifactError as exc:
            raise ArtifactError(f"{artifact.path}: {exc.message}", hint=exc.hint) from None
    try:
        _install_experts(model, experts, dequantize)
    except ArtifactError as exc:
        raise ArtifactError(f"{artifact.path}: {exc.message}", hint=exc.hint) from None
    if artifact.plan.kv_cache is not None:
        _attach_kv_cache(model, artifact.plan.kv_cache, tensors, activations)
    tensors = _to_dtype(tensors, dtype)
    _check_dense_shapes(model, tensors, artifact.path)
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{artifact.path}: tensor shapes do not match config.json: "
                            f"{first_line(exc)}",
                            hint="the artifact is damaged or its config.json was edited") from exc
    if result.unexpected_keys:
        raise ArtifactError(f"{artifact.path}: unexpected tensors "
                            f"{', '.join(result.unexpected_keys[:5])}",
                            hint="the artifact does not match its config.json")
    if getattr(config, "tie_word_embeddings", False) and artifact.plan.tying is None:
        model.tie_weights()  # (a quantized tied pair was handled above)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ArtifactError(f"{artifact.path}: missing tensor(s) {', '.join(missing[:5])}",
                            hint="the artifact is incomplete; re-run mpq quantize")
    _install_online_rotations(model, artifact.log)
    if kernels:
        _page_out_packed(model)
    release_free_memory()  # the transient buffers of decoding and packing
    model.mpq_artifact = artifact
    return model.eval()


def _page_out_packed(model: nn.Module) -> None:
    """The stored tensors of the layers packed for a kernel are not read again by forwards:
    hand their file pages back (they stay buffers, read back from the file if ever used)."""
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.path != DECODE:
            page_out(module.buffers(recurse=False))


def _to_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors in ``dtype``.  A tensor that needs converting is copied CONVERT_BYTES at a
    time, the file pages of each piece handed back once copied, so a large table never has its
    stored and converted forms resident together."""
    out = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            out[key] = tensor
            continue
        converted = torch.empty(tensor.shape, dtype=dtype)
        flat_in, flat_out = tensor.reshape(-1), converted.view(-1)
        step = max(CONVERT_BYTES // tensor.element_size(), 1)
        for start in range(0, flat_in.numel(), step):
            flat_out[start:start + step].copy_(flat_in[start:start + step])
            page_out([flat_in[start:start + step]])
        out[key] = converted
    return out


def _check_dense_shapes(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """ArtifactError naming the first stored tensor whose shape differs from the model's."""
    expected = model.state_dict(keep_vars=True)
    wrong = [key for key, tensor in tensors.items()
             if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)]
    if wrong:
        key = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ArtifactError(f"{path}: tensor '{key}' has shape {tuple(tensors[key].shape)}, "
                            f"config.json gives {tuple(expected[key].shape)}{more}",
                            hint="the artifact is damaged or its config.json was edited; "
                                 "re-run mpq quantize")


def _install_online_rotations(model: nn.Module, log: RunLog) -> None:
    """The run-time halves of the applied rotations (QuaRot's R4 on the inputs of the family's
    mlp_down, down_proj)."""
    online = log.online_rotations()
    if not online:
        return
    for suffix, record in online.items():
        try:
            spec = RotationSpec.from_dict(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"rotation record for {suffix} is unusable: {exc}",
                                hint="the artifact was written by another mpq version; "
                                     "re-run mpq quantize") from None
        if suffix != online_site(model):
            raise ArtifactError(f"unknown online rotation site '{suffix}'",
                                hint="the artifact was written by a newer mpq")
        install_online(model, layout_of(model), spec)

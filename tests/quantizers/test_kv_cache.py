"""KV-cache FP8 quantization: scales calibrated on post-RoPE keys, stored, applied by mpq.load,
and read the same way by transformers + compressed-tensors."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import mpq
from mpq.errors import ArtifactError, CalibrationError, FormatError, ModelError, RecipeError
from mpq.quantizers.kv_cache import KVObserver, fake_quantize_kv
from mpq.config.kv_cache import KVCacheArgs
from mpq.models.attention import attention_modules, tap_kv
from mpq.models.families import family_of
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from tests.tiny_models import (ARCHITECTURES, RECORD_ARCHITECTURES, model_from_config,
                               save_tiny_model, tiny_config, tiny_model)

# every tiny model whose family records where its attention keeps the KV cache
KV_ARCHS = tuple(a for a in ARCHITECTURES + RECORD_ARCHITECTURES
                 if family_of(tiny_config(a)).attention is not None)


def recipe(granularity: str = "tensor", kv: str | None = None):
    kv = kv or f"{{format: fp8_e4m3, granularity: {granularity}}}"
    return parse_recipe("mpq_recipe: 1\nname: kv\ndefaults:\n  algorithm: rtn\n"
                        f"kv_cache: {kv}\nrules:\n  - targets: [Linear, Conv1D]\n"
                        "    weights: {format: int, bits: 8, granularity: channel}\n", "kv")


def calibration(calib_text):
    return CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)


def without_hooks(model):
    for module in model.modules():
        module._forward_pre_hooks.clear()
    return model


@pytest.mark.parametrize("arch", KV_ARCHS)
def test_tap_sees_exactly_what_the_cache_stores(arch):
    """The tapped keys/values are the post-RoPE tensors a DynamicCache keeps."""
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    block = model.get_submodule(family_of(model).blocks)[0]
    (_, attention), = attention_modules(model, block)
    handle = tap_kv(attention, lambda k, v: (seen.append((k.clone(), v.clone())), (k, v))[1])
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    handle.remove()
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert torch.equal(seen[0][0], keys) and torch.equal(seen[0][1], values)


@pytest.mark.parametrize("arch,granularity", [("llama", "tensor"), ("llama", "head"),
                                               ("granite", "head")])
def test_scales_are_stored_applied_and_read_by_compressed_tensors(arch, granularity, tmp_path,
                                                                  calib_text):
    save_tiny_model(arch, tmp_path / "src")
    quantize(tmp_path / "src", recipe(granularity), tmp_path / "kv", RunOptions(calibration=calibration(calib_text)))
    quantize(tmp_path / "src", recipe(granularity), tmp_path / "ct", RunOptions(calibration=calibration(calib_text), output_format="compressed-tensors"))
    tensors = load_file(tmp_path / "kv" / "model.safetensors")
    shape = (1,) if granularity == "tensor" else (2, 1, 1)  # 2 kv heads
    for i in range(2):
        for name in ("k_scale", "v_scale"):
            scale = tensors[f"model.layers.{i}.self_attn.{name}"]
            assert tuple(scale.shape) == shape and scale.dtype == torch.float32
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    kv_model = mpq.load(tmp_path / "kv", dequantize=True)
    ct_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        with_kv = kv_model(ids).logits
        assert torch.equal(with_kv, ct_model(ids).logits)
        plain = without_hooks(mpq.load(tmp_path / "kv", dequantize=True))(ids).logits
    assert not torch.equal(with_kv, plain)  # the fake quantization really runs
    assert (with_kv - plain).abs().max() < 0.3 * plain.abs().max()  # fp8: ~6% per element


def test_scale_is_the_calibration_absmax_over_448():
    observer = KVObserver(KVCacheArgs(granularity="head"))
    key = torch.zeros(2, 3, 5, 4)
    key[1, 2, 4, 0] = -896.0
    key[0, 0, 0, 1] = 44.8
    observer(key, key.clone())
    scales = observer.tensors()
    assert torch.equal(scales["k_scale"].reshape(-1)[[0, 2]], torch.tensor([0.1, 2.0]))
    x = torch.tensor([[[[0.1 * 17, 1000.0]]]])
    assert torch.equal(fake_quantize_kv(x, torch.tensor([0.1])),
                       torch.tensor([[[[0.1 * 16, 0.1 * 448]]]]))  # fp8 rounds 17 to 16


def test_generation_with_a_real_cache_runs_through_the_tap(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", recipe(), tmp_path / "kv", RunOptions(calibration=calibration(calib_text)))
    model = mpq.load(tmp_path / "kv", dequantize=True)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    with torch.no_grad():  # the cached step gives the same next token as a full recompute
        full = model(out[:, :-1]).logits[0, -1].argmax()
    assert int(full) == int(out[0, -1])


def test_bad_kv_inputs_are_refused(tmp_path, calib_text):
    with pytest.raises(RecipeError, match="kv_cache"):
        recipe(kv="{format: int2}")
    with pytest.raises(RecipeError, match="granularity"):
        recipe(kv="{format: fp8_e4m3, granularity: channel}")
    save_tiny_model("llama", tmp_path / "src")
    with pytest.raises(CalibrationError, match="kv_cache"):
        quantize(tmp_path / "src", recipe(), tmp_path / "x")
    # CodeGen has no family record and fuses q/k/v (qkv_proj): discovery finds no attention
    codegen = transformers.CodeGenConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                         vocab_size=256, n_positions=128, bos_token_id=0,
                                         eos_token_id=1)
    model_from_config(codegen).save_pretrained(tmp_path / "codegen")
    with pytest.raises(ModelError, match="kv_cache: no attention module with k_proj/v_proj"):
        quantize(tmp_path / "codegen", recipe(), tmp_path / "y", RunOptions(calibration=calibration(calib_text)))
    with pytest.raises(FormatError, match="KV-cache"):
        quantize(tmp_path / "src", recipe(), tmp_path / "z", RunOptions(calibration=calibration(calib_text), output_format="gptq"))


def test_loader_refuses_a_missing_or_bad_scale(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", recipe(), tmp_path / "kv", RunOptions(calibration=calibration(calib_text)))
    file = tmp_path / "kv" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(file)
    tensors["model.layers.1.self_attn.v_scale"] = torch.tensor([-1.0])
    save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(ArtifactError, match="v_scale"):
        mpq.load(tmp_path / "kv", verify=False)  # the loader's own check
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, str(file), metadata=metadata)
    with pytest.raises(ArtifactError, match="missing tensor 'model.layers.1.self_attn.v_scale'"):
        mpq.load(tmp_path / "kv", verify=False)  # the loader's own check

"""mpq.analysis.drift and static_scales: clipped values counted exactly, prefill and decode
apart, KL against the float model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mpq
from mpq.analysis.drift import measure
from mpq.analysis.static_scales import ClipStats, StaticScale, static_scales
from mpq.config.kv_cache import KVCacheArgs
from mpq.numerics.args import ActivationArgs
from tests.helpers import byte_tokenizer, outlier_artifact


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    return outlier_artifact(tmp_path_factory.mktemp("drift"))


def prompts(text: str, n: int = 2, length: int = 24) -> list[torch.Tensor]:
    ids = torch.tensor(byte_tokenizer()(text)["input_ids"])
    return [ids[i * length:(i + 1) * length].view(1, -1) for i in range(n)]


def holder(**buffers) -> nn.Module:
    module = nn.Module()
    for name, value in buffers.items():
        module.register_buffer(name, torch.tensor(value, dtype=torch.float32))
    return module


def test_clipping_rules_hand_computed():
    # int8 input, scale 0.1: the grid reaches 127.5 × 0.1 = 12.75
    args = ActivationArgs(format="int", bits=8, dynamic=False, granularity="tensor")
    scale = StaticScale("l", "input", "int8", 12.75, holder(input_scale=[0.1]), args)
    x = torch.tensor([0.0, 12.7, 12.75, 12.8, -13.0, 100.0])
    assert scale.clipped(x).tolist() == [False, False, False, True, True, True]
    # fp8 KV per head [2, 1, 1]: 448 × 0.01 = 4.48 and 448 × 0.1 = 44.8
    kv = KVCacheArgs(format="fp8_e4m3", granularity="head")
    k = StaticScale("a", "k", "fp8_e4m3", 44.8, holder(k_scale=[[[0.01]], [[0.1]]]), kv)
    keys = torch.tensor([4.0, 5.0, 40.0, 50.0]).view(1, 1, 1, 4).expand(1, 2, 1, 4)
    assert k.clipped(keys).sum(dim=(0, 2, 3)).tolist() == [3, 1]
    # int8 KV per head: range [-1, 3] → scale 4/255, zero 63.75
    ikv = KVCacheArgs(format="int8", granularity="head", dynamic=False)
    v = StaticScale("a", "v", "int8", 3.0, holder(v_scale=[[[4 / 255]]], v_zero=[[[63.75]]]), ikv)
    values = torch.tensor([-1.0, -1.1, 2.9, 3.1]).view(1, 1, 1, 4)
    assert v.clipped(values).flatten().tolist() == [False, True, False, True]
    stats = ClipStats()
    stats.add(x, scale.clipped(x))
    stats.add(torch.tensor([70000.0]), torch.tensor([True]))
    assert (stats.values, stats.clipped, stats.fp16_overflow) == (7, 4, 1)
    assert stats.to_dict()["absmax"] == 70000.0


def test_prefill_clips_counted_exactly(outlier):
    src, art = outlier
    model = mpq.load(art)
    import transformers

    float_model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    samples = prompts("ab " * 40)
    report = measure(model, samples, decode_tokens=0)
    key = "model.layers.0.self_attn.q_proj.input_scale"
    limit = 127.5 * model.get_submodule("model.layers.0.self_attn.q_proj").input_scale
    with torch.no_grad():  # the layer's input: block 0's input norm of the float embeddings
        inputs = [float_model.model.layers[0].input_layernorm(
            float_model.model.embed_tokens(ids)) for ids in samples]
    expected = sum(int((x.abs() > limit).sum()) for x in inputs)
    zeros = sum(int((ids == 0).sum()) for ids in samples)
    assert expected == zeros > 0  # one value (channel 0, |8|) per space token
    stats = report.clips["prefill"][key]
    assert (stats.clipped, stats.values) == (expected, 2 * 24 * 64)
    assert report.clips["decode"][key].values == 0
    assert report.tokens == {"prefill": 48, "decode": 0}
    dense = measure(mpq.load(art, dequantize=True), samples, decode_tokens=0)  # mpq drift's
    assert [r["prefill"] for r in dense.rows()] == [r["prefill"] for r in report.rows()]


def test_decode_clips_apart_from_prefill(outlier):
    _, art = outlier
    model = mpq.load(art)
    samples = prompts("abcdefghijklmnopqrstuvwxyz" * 4)
    report = measure(model, samples, decode_tokens=5)
    key = "model.layers.0.self_attn.q_proj.input_scale"
    prefill, decode = report.clips["prefill"][key], report.clips["decode"][key]
    assert prefill.clipped == 0 and prefill.values == 2 * 24 * 64  # letters: calibrated
    assert decode.values == 2 * 5 * 64 and decode.clipped == 2 * 5  # token 0, every step
    assert all(g.tolist() == [0] * 5 for g in report.continuations)
    assert report.tokens == {"prefill": 48, "decode": 10}
    kv = report.clips["decode"]["model.layers.0.self_attn.k_scale"]
    assert kv.values == 2 * 5 * 2 * 16  # only the new token's keys: 2 kv heads × head_dim 16
    assert report.worst()[1] == "decode"


def test_kl_to_the_float_model(tiny_llama_dir, tmp_path, monkeypatch):
    from mpq.calibration import CalibrationOptions
    from mpq.config.recipe import parse_recipe
    from mpq.engine.spec import RunOptions
    from mpq.quantize import quantize
    from tests.helpers import STATIC_RECIPE, LETTERS
    import transformers

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained",
                        lambda *a, **k: byte_tokenizer())
    calib = tmp_path / "c.txt"
    calib.write_text(LETTERS)
    quantize(tiny_llama_dir, parse_recipe(STATIC_RECIPE, "s"), tmp_path / "q",
             RunOptions(calibration=CalibrationOptions(source=str(calib), num_samples=4,
                                                       seq_len=32)))
    model = mpq.load(tmp_path / "q")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    samples = prompts("the cat sat on the mat " * 5)
    report = measure(model, samples, decode_tokens=3, reference=reference)
    kl = report.to_dict()["kl"]
    assert kl["prefill"]["tokens"] == 48 and kl["decode"]["tokens"] == 6
    assert 0 < kl["prefill"]["kl_mean"] < 0.05 and 0 < kl["decode"]["kl_mean"] < 0.05
    assert static_scales(reference) == []  # a float model has none


def test_load_without_activation_quantization(outlier):
    """mpq.load(activations=False): what recalibration measures on: the stored scales are
    checked and kept, nothing is fake-quantized but the weights."""
    _, art = outlier
    ids = prompts("ab " * 40, n=1)[0]
    plain = mpq.load(art, activations=False)
    served = mpq.load(art)
    assert [s.kind for s in static_scales(plain)] == ["k", "v"] * 2  # buffers kept, not applied
    assert len(static_scales(served)) == 18
    attention = plain.get_submodule("model.layers.0.self_attn")
    assert attention.k_scale.dtype == torch.float32 and not attention._forward_pre_hooks
    with torch.no_grad():
        weights_only = plain(ids).logits
        # the served model clips token 0 at block 0's inputs: its hidden states differ
        assert not torch.allclose(served.model(ids).last_hidden_state,
                                  plain.model(ids).last_hidden_state)
    dense = mpq.load(art, activations=False, dequantize=True)
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, weights_only, atol=1e-6)

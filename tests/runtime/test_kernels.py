"""The packed CPU kernel path of QuantLinear / mpq.load(kernels=True) (mpq.runtime.kernels).

Numerics under test.  Per layer, the kernel rounds the input, the scales and the output to bf16
(unit roundoff u = 2⁻⁹) and accumulates in fp32, so each output is within
3u·Σ_k |x_k·ŵ_k| (+ fp32 accumulation noise) of the reference decode's fp32 product.  For a
whole model that rounding propagates through norms, attention and the layers after it, which no
simple closed form bounds, so the logits bound is relative: the kernel path (bf16 matmuls inside
an fp32 model) may differ from the reference decode by at most twice what running the same
artifact entirely in bf16 changes (measured ratios: 0.49 on SmolLM2-135M w4a16, about 1 on the
tiny tied model below, where the bf16-rounded head output is most of the difference).  A wrong
packing (code offset, scale layout, group) gives differences of the logits' own size.
"""
from __future__ import annotations

import pytest
import torch

import mpq
from mpq.checkpoint.native_codec import encode
from mpq.config.recipe import parse_recipe
from mpq.errors import OptionError
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.quantize import quantize
from mpq.runtime import kernels
from mpq.runtime.qlinear import QuantLinear, layer_paths
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.skipif(not all(kernels.available().values()),
                                reason="this torch build has no packed int4/int8 CPU kernels")

U = 2.0 ** -9  # bf16 unit roundoff
BF16_FACTOR = 2.0

LAYER_SCHEMES = {
    "int4 g32": WeightArgs(bits=4, group_size=32),
    "int4 g64": WeightArgs(bits=4, group_size=64),
    "int4 g128": WeightArgs(bits=4, group_size=128),
    "int3 g64": WeightArgs(bits=3, group_size=64),
    "int8 channel": WeightArgs(bits=8, granularity="channel", group_size=None),
    "int4 channel": WeightArgs(bits=4, granularity="channel", group_size=None),
}


def quantized(args: WeightArgs, n: int = 48, k: int = 256, seed: int = 0) -> QuantizedWeight:
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return NUMBER_FORMATS.get(args.format).quantize(weight, args)


def layer(qw: QuantizedWeight, kernels_on: bool, bias=None, input_args=None) -> QuantLinear:
    return QuantLinear(qw.args, qw.shape, encode(qw), bias, input_args=input_args,
                       kernels=kernels_on)


@pytest.mark.parametrize("chunk", [1024, 64])  # 176 rows: one packing chunk, or 64 + 64 + 48
@pytest.mark.parametrize("scheme", sorted(LAYER_SCHEMES))
def test_kernel_layer_is_within_bf16_rounding_of_the_reference(scheme, chunk, monkeypatch):
    monkeypatch.setattr(kernels, "PACK_ROWS", chunk)
    qw = quantized(LAYER_SCHEMES[scheme], n=176)
    bias = torch.randn(qw.shape[0], generator=torch.Generator().manual_seed(1))
    fast, slow = layer(qw, True, bias), layer(qw, False, bias)
    assert fast.path == ("int8pack" if "channel" in scheme else "int4pack")
    x = torch.randn(3, 5, qw.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = fast(x), slow(x)
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    magnitude = x.abs() @ qw.dequantize().abs().t()
    bound = 3 * U * magnitude + 1e-5 * (magnitude + 1)
    assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() / bound).max())
    assert float((got - want).abs().max()) > 0  # it really ran another computation


def test_kernel_layer_takes_bf16_inputs():
    qw = quantized(LAYER_SCHEMES["int4 g32"])
    x = torch.randn(2, qw.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = layer(qw, True)(x.to(torch.bfloat16))
        want = layer(qw, False)(x)
    assert got.dtype == torch.bfloat16
    magnitude = x.abs() @ qw.dequantize().abs().t()
    assert bool(((got.float() - want).abs() <= 4 * U * magnitude + 1e-5).all())


def test_unsupported_weights_stay_on_the_reference_path():
    cases = {
        "asymmetric": WeightArgs(bits=4, symmetric=False, group_size=32),
        "group size": WeightArgs(bits=4, group_size=16),
        "int4 kernel takes at most 4 bits": WeightArgs(bits=5, group_size=32),
        "tensor granularity": WeightArgs(bits=8, granularity="tensor", group_size=None),
        "format nf4": WeightArgs(format="nf4", bits=4, group_size=64),
    }
    for reason, args in cases.items():
        module = layer(quantized(args), True)
        assert module.path == "decode" and reason in module.path_reason, (reason, module.path_reason)
    rows = layer(quantized(WeightArgs(bits=4, group_size=32), n=40), True)
    assert rows.path == "decode" and "output rows" in rows.path_reason


def test_act_order_permutation_stays_on_the_reference_path():
    qw = quantized(WeightArgs(bits=4, group_size=32))
    k = qw.shape[1]
    trivial = (torch.arange(k) // 32).to(torch.int32)
    assert kernels.select(qw.args, qw.shape, trivial) == ("int4pack", "int4 g32")
    shuffled = torch.randperm(k, generator=torch.Generator().manual_seed(0))
    permuted = QuantizedWeight(qw.args, qw.shape, qw.codes, qw.scale,
                               g_idx=((shuffled // 32).to(torch.int32)))
    module = layer(permuted, True)
    assert (module.path, module.path_reason) == ("decode", "act-order permutation (g_idx)")


def test_kernels_off_decodes():
    module = layer(quantized(WeightArgs(bits=4, group_size=32)), False)
    assert module.path == "decode" and module._kernel is None


RECIPE = """mpq_recipe: 1
name: paths
defaults: {algorithm: rtn}
rules:
  - targets: ["re:.*q_proj"]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}
  - targets: ["re:.*k_proj"]
    weights: {format: int, bits: 4, symmetric: false, granularity: group, group_size: 32}
  - targets: ["re:.*v_proj"]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
  - targets: ["re:.*o_proj"]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
    input_activations: {format: int, bits: 8, dynamic: true, granularity: token}
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: true, granularity: group, group_size: 64}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    save_tiny_model("llama", root / "src")
    quantize(root / "src", parse_recipe(RECIPE, "paths.yaml"), root / "out")
    return root / "out"


def test_load_records_the_path_of_each_layer(artifact):
    model = mpq.load(artifact, kernels=True)
    paths = layer_paths(model)
    assert len(paths) == 2 * 7  # seven linears per block (the head is kept in float)
    expected = {"q_proj": "int4pack", "k_proj": "decode", "v_proj": "int8pack",
                "o_proj": "decode", "gate_proj": "int4pack", "up_proj": "int4pack",
                "down_proj": "int4pack"}
    for name, path in paths.items():
        assert path == expected[name.rsplit(".", 1)[-1]], (name, path)
    assert "path=int8pack" in repr(model.get_submodule("model.layers.0.self_attn.v_proj"))
    assert set(layer_paths(mpq.load(artifact)).values()) == {"decode"}


def test_kernel_logits_differ_from_the_reference_by_less_than_bf16_compute(artifact):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = mpq.load(artifact)(ids).logits
        fast = mpq.load(artifact, kernels=True)(ids).logits
        bf16 = mpq.load(artifact, dtype=torch.bfloat16)(ids).logits.float()
    kernel_error = float((fast - reference).abs().max())
    bf16_error = float((bf16 - reference).abs().max())
    assert 0 < kernel_error <= BF16_FACTOR * bf16_error, (kernel_error, bf16_error)


def test_a_model_loaded_with_kernels_generates(artifact):
    model = mpq.load(artifact, kernels=True)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        reference = mpq.load(artifact).generate(ids, max_new_tokens=6, min_new_tokens=6,
                                                do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14) and torch.equal(out[:, :8], ids)
    assert torch.equal(out[:, 8:9], reference[:, 8:9])  # the first greedy token agrees


def test_kernels_and_dequantize_exclude_each_other(artifact):
    with pytest.raises(OptionError, match="exclude each other"):
        mpq.load(artifact, kernels=True, dequantize=True)


def test_a_tied_quantized_head_runs_the_kernel(tmp_path):
    save_tiny_model("llama_tied", tmp_path / "src")
    scheme = "{format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}"
    recipe = parse_recipe("mpq_recipe: 1\nname: tied\ndefaults: {algorithm: rtn}\nrules:\n"
                          f"  - targets: [Embedding, lm_head]\n    weights: {scheme}\n"
                          f"  - targets: [Linear]\n    weights: {scheme}\n", "tied.yaml")
    quantize(tmp_path / "src", recipe, tmp_path / "out")
    model = mpq.load(tmp_path / "out", kernels=True)
    assert layer_paths(model)["lm_head"] == "int4pack"
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, reference = model(ids).logits, mpq.load(tmp_path / "out")(ids).logits
        bf16 = mpq.load(tmp_path / "out", dtype=torch.bfloat16)(ids).logits.float()
    kernel_error = float((fast - reference).abs().max())
    assert 0 < kernel_error <= BF16_FACTOR * float((bf16 - reference).abs().max())

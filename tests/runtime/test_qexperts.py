"""Fused MoE experts through the native format: quantize → artifact → mpq.load.  Every expert
is stored quantized (counted in the artifact), the loaded model's logits equal those of the
float model with the dequantized values written into its expert parameters, and a router
named by a rule is stored quantized and loaded dequantized."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import mpq
from mpq.config.recipe import parse_recipe
from mpq.quantize import quantize
from mpq.runtime.qexperts import QuantExperts
from mpq.runtime.qlinear import QuantLinear
from tests.tiny_models import MOE_ARCHITECTURES, save_tiny_model

ROUTER_TOO = parse_recipe("mpq_recipe: 1\nrules:\n"
                          "  - targets: [model.layers.1.mlp.gate]\n"
                          "    weights: {bits: 8, granularity: channel}\n"
                          "  - targets: [Linear]\n    weights: {bits: 4, group_size: 32}\n",
                          "t.yaml")


def stored_names(path) -> list[str]:
    names = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def dequantized_reference(source, loaded):
    """``source`` with each quantized linear's weight, each expert parameter and each router
    replaced by the loaded model's dequantized values."""
    with torch.no_grad():
        for name, module in loaded.named_modules():
            if isinstance(module, QuantLinear) and ".experts." not in name:
                weight = module.dequantized_weight(torch.float32)
                source.get_submodule(name).weight = torch.nn.Parameter(weight,
                                                                       requires_grad=False)
            elif isinstance(module, QuantExperts):
                target = source.get_submodule(name)
                for projection in module.quantized_projections:
                    dense = module.dense(projection, torch.float32)
                    setattr(target, projection, torch.nn.Parameter(dense, requires_grad=False))
            elif name.endswith("mlp.gate"):
                source.get_submodule(name).weight.copy_(module.weight)
    return source


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_every_expert_is_stored_quantized_and_loads_exactly(arch, tmp_path):
    source = save_tiny_model(arch, tmp_path / "src")
    config = source.config
    result = quantize(tmp_path / "src", ROUTER_TOO, tmp_path / "out")
    names = stored_names(tmp_path / "out")
    experts = {n.rsplit(".", 1)[0] for n in names if ".experts." in n and n.endswith(".qweight")}
    layers = config.num_hidden_layers
    assert len(experts) == layers * 2 * 8  # every expert of both projections, every block
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    assert "model.layers.1.mlp.gate.qweight" in names and "model.layers.0.mlp.gate.weight" in names
    assert result.coverage["unquantized_share"] < 0.2

    loaded = mpq.load(tmp_path / "out")
    modules = [m for m in loaded.modules() if isinstance(m, QuantExperts)]
    assert len(modules) == layers and all(m.quantized_projections == ("gate_up_proj", "down_proj")
                                          for m in modules)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = source(ids).logits
        router = source.model.layers[1].mlp.gate.weight.clone()
        logits = loaded(ids).logits
        dense = mpq.load(tmp_path / "out", dequantize=True)(ids).logits
        expected = dequantized_reference(source, loaded)(ids).logits
    assert torch.equal(logits, expected)
    assert torch.equal(dense, expected)
    assert (logits - float_logits).abs().max() > 1e-4  # the experts were quantized
    changed = (loaded.model.layers[1].mlp.gate.weight - router).abs().max()
    assert 0 < changed < 0.05  # the router named by the rule went through int8
    assert torch.equal(loaded.model.layers[0].mlp.gate.weight,
                       source.model.layers[0].mlp.gate.weight)
    out = loaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_a_kept_projection_stays_dense_beside_quantized_ones(tmp_path):
    source = save_tiny_model("qwen3_moe", tmp_path / "src")
    recipe = parse_recipe("mpq_recipe: 1\nrules:\n  - targets: ['re:.*experts\\.down_proj\\..*']\n"
                          "    skip: true\n  - targets: [Linear]\n"
                          "    weights: {bits: 4, group_size: 32}\n", "t.yaml")
    quantize(tmp_path / "src", recipe, tmp_path / "out")
    names = stored_names(tmp_path / "out")
    assert "model.layers.0.mlp.experts.down_proj" in names
    loaded = mpq.load(tmp_path / "out")
    experts = loaded.model.layers[0].mlp.experts
    assert experts.quantized_projections == ("gate_up_proj",)
    torch.testing.assert_close(experts.down_proj, source.model.layers[0].mlp.experts.down_proj,
                               rtol=0, atol=0)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded(ids).logits
        expected = dequantized_reference(source, loaded)(ids).logits
    # the kept projection is the artifact's copy (other memory): float rounding may differ
    assert (logits - expected).abs().max() <= 1e-6

"""The quantized input embedding end to end on tiny models (tied Llama, untied Llama, Gemma's
scaled embedding): QuantEmbedding decodes looked-up rows exactly as the whole table decodes;
quantize → mpq.load gives the logits of the float model with fake-quantized weights; a tied pair
under one scheme stays one stored tensor, different schemes untie."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import mpq
from mpq.config.recipe import parse_recipe
from mpq.models.layout import untie_head
from mpq.numerics.base import NUMBER_FORMATS
from mpq.quantize import quantize
from mpq.runtime.qembedding import QuantEmbedding
from mpq.checkpoint.native_codec import encode
from tests.tiny_models import save_tiny_model, tiny_model

SCHEMES = {
    "int8 row": "{format: int, bits: 8, symmetric: true, granularity: channel}",
    "int4 g32 asym": "{format: int, bits: 4, symmetric: false, granularity: group, "
                     "group_size: 32}",
    "fp8 row": "{format: fp8_e4m3}",
}
BODY = "{format: int, bits: 4, symmetric: true, granularity: group, group_size: 32}"


def recipe(embedding: str, head: str | None = None, *, together: bool = False):
    rules = f"  - targets: [Embedding{', lm_head' if together else ''}]\n    weights: {embedding}\n"
    if head is not None:
        rules += f"  - targets: [lm_head]\n    weights: {head}\n"
    rules += f"  - targets: [Linear]\n    weights: {BODY}\n"
    return parse_recipe(f"mpq_recipe: 1\nname: emb\ndefaults: {{algorithm: rtn}}\nrules:\n{rules}",
                        "emb.yaml")


def fake_quantized(weight: torch.Tensor, args) -> torch.Tensor:
    return NUMBER_FORMATS.get(args.format).quantize(weight.detach().float(), args).dequantize()


def reference(arch: str, plan) -> nn.Module:
    """The float tiny model with every planned weight replaced by its RTN fake-quantization
    (tied pair untied unless the plan keeps it shared)."""
    model = tiny_model(arch)
    if plan.tying is not None and not plan.tying.shared:
        untie_head(model)
    with torch.no_grad():
        for layer in plan.quantized():
            if plan.shared_with(layer.name) is not None:
                continue
            module = model.get_submodule(layer.name)
            module.weight.copy_(fake_quantized(module.weight, layer.scheme.weights))
    return model.eval()


def stored_keys(folder) -> set[str]:
    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            keys.update(handle.keys())
    return keys


@pytest.fixture()
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
@pytest.mark.parametrize("arch", ["llama_tied", "llama", "gemma"])
def test_quantized_embedding_loads_with_the_fake_quantized_logits(arch, scheme, tmp_path, ids):
    save_tiny_model(arch, tmp_path / "src")
    result = quantize(tmp_path / "src", recipe(SCHEMES[scheme]), tmp_path / "out")
    plan = result.plan
    assert plan.get("model.embed_tokens").embedding
    packed, dense = mpq.load(tmp_path / "out"), mpq.load(tmp_path / "out", dequantize=True)
    assert isinstance(packed.get_input_embeddings(), QuantEmbedding)
    with torch.no_grad():
        expected = reference(arch, plan)(ids).logits
        got, got_dense = packed(ids).logits, dense(ids).logits
    assert torch.equal(got, got_dense)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    keys = stored_keys(tmp_path / "out")
    assert "model.embed_tokens.scale" in keys  # fp8 codes are stored as ".weight"
    assert ("model.embed_tokens.qweight" in keys) == scheme.startswith("int")
    if arch != "llama":  # tied source, only the embedding quantized: the head keeps a copy
        assert result.untied_head and "lm_head.weight" in keys
        assert not plan.tying.shared and not packed.config.tie_word_embeddings


@pytest.mark.parametrize("arch", ["llama_tied", "gemma"])
@pytest.mark.parametrize("scheme", ["int8 row", "int4 g32 asym"])
def test_one_scheme_keeps_the_pair_tied_and_stored_once(arch, scheme, tmp_path, ids):
    save_tiny_model(arch, tmp_path / "src")
    result = quantize(tmp_path / "src", recipe(SCHEMES[scheme], together=True), tmp_path / "out")
    assert result.plan.tying.shared and not result.untied_head
    keys = stored_keys(tmp_path / "out")
    assert not any(key.startswith("lm_head.") for key in keys)  # one tensor, the embedding's
    assert "model.embed_tokens.qweight" in keys
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    packed, dense = mpq.load(tmp_path / "out"), mpq.load(tmp_path / "out", dequantize=True)
    assert packed.lm_head.qweight is packed.model.embed_tokens.qweight
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    with torch.no_grad():
        expected = reference(arch, result.plan)(ids).logits
        got = packed(ids).logits
    assert torch.equal(got, dense(ids).logits)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert result.log.result("lm_head")["shared_with"] == "model.embed_tokens"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Tied `model.embed_tokens` / `lm_head`: kept tied" in card
    assert "the input embedding is quantized" in card


def test_different_schemes_untie_and_both_sides_are_stored(tmp_path, ids):
    save_tiny_model("llama_tied", tmp_path / "src")
    result = quantize(tmp_path / "src", recipe(SCHEMES["int8 row"], SCHEMES["int4 g32 asym"]),
                      tmp_path / "out")
    tying = result.plan.tying
    assert not tying.shared and "different schemes" in tying.reason and result.untied_head
    assert result.coverage["tying"]["untied_bytes"] == 256 * 64 * 4
    keys = stored_keys(tmp_path / "out")
    assert {"model.embed_tokens.qweight", "lm_head.qweight", "lm_head.zero"} <= keys
    assert "lm_head.weight" not in keys
    packed = mpq.load(tmp_path / "out")
    assert packed.mpq_artifact.plan.tying == tying
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, reference("llama_tied", result.plan)(ids).logits,
                              atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_rows_decode_bit_for_bit_like_the_whole_table(scheme):
    args = recipe(SCHEMES[scheme]).rules[0].scheme.weights
    weight = torch.randn(100, 64, generator=torch.Generator().manual_seed(1))
    qw = NUMBER_FORMATS.get(args.format).quantize(weight, args)
    module = QuantEmbedding(nn.Embedding(100, 64), args, (100, 64), encode(qw), torch.float32)
    ids = torch.tensor([[5, 99, 0, 5], [7, 7, 42, 1]])
    table = qw.dequantize(torch.float32)
    assert torch.equal(module(ids), table[ids])
    assert torch.equal(module.dequantized_weight(), table)
    with pytest.raises(IndexError):
        module(torch.tensor([100]))


def test_the_embedding_class_own_scaling_is_kept():
    gemma = tiny_model("gemma").model.embed_tokens  # multiplies by sqrt(hidden) in its forward
    args = recipe(SCHEMES["int8 row"]).rules[0].scheme.weights
    qw = NUMBER_FORMATS.get(args.format).quantize(gemma.weight.detach(), args)
    module = QuantEmbedding(gemma, args, tuple(gemma.weight.shape), encode(qw), torch.float32)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        gemma.weight.copy_(qw.dequantize())
        assert torch.equal(module(ids), gemma(ids))
    assert not torch.equal(module(ids), qw.dequantize()[ids])  # the scale was applied


def test_a_packed_load_decodes_rows_not_the_whole_table(tmp_path, monkeypatch):
    """Decoding the whole table at load would hold its codes unpacked for nothing (a peak of
    several times the stored table on a real vocabulary); one row checks the stored tensors."""
    import mpq.loader as loader
    from mpq.runtime import qembedding

    save_tiny_model("llama_tied", tmp_path / "src")
    quantize(tmp_path / "src", recipe(SCHEMES["int4 g32 asym"], together=True), tmp_path / "out")
    decoded_rows = []
    for module in (loader, qembedding):
        real = module.decode
        monkeypatch.setattr(module, "decode", lambda tensors, args, shape, prefix="", real=real:
                            decoded_rows.append(shape[0]) or real(tensors, args, shape, prefix=prefix))
    mpq.load(tmp_path / "out")
    assert decoded_rows and 256 not in decoded_rows  # the table has 256 rows
    monkeypatch.undo()
    damaged = tmp_path / "out" / "model.safetensors"
    tensors = {}
    with safe_open(damaged, "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["model.embed_tokens.qweight"] = tensors["model.embed_tokens.qweight"][:, :-1].clone()
    from safetensors.torch import save_file
    save_file(tensors, damaged, metadata=metadata)
    with pytest.raises(Exception, match="model.embed_tokens"):
        mpq.load(tmp_path / "out", verify=False)

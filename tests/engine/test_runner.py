"""quantize → artifact → mpq.load → forward, on tiny random models of several architectures."""
from __future__ import annotations

import pytest
import torch

import mpq
from mpq.models.layout import describe_layers, layout_of, weight_of
from mpq.errors import CalibrationError
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from tests.helpers import byte_tokenizer, register_recording_quantizer
from tests.tiny_models import ARCHITECTURES, save_tiny_model


def reference_with_dequantized_weights(source_model, loaded):
    """The float model with each quantized layer's weight replaced by its dequantized value."""
    for name, module in loaded.named_modules():
        if type(module).__name__ == "QuantLinear":
            target = source_model.get_submodule(name)
            weight = module.dequantized_weight(torch.float32)
            if type(target).__name__ == "Conv1D":
                weight = weight.t()
            target.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
    return source_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_quantize_load_forward_every_architecture(arch, tmp_path):
    source = save_tiny_model(arch, tmp_path / "src")
    result = quantize(tmp_path / "src", "w4a16", tmp_path / "out")
    layout = layout_of(source)
    layers, _ = describe_layers(source, layout)
    non_head = [l for l in layers if not l.protected]
    assert len(result.plan.quantized()) == len(non_head) > 0

    loaded = mpq.load(tmp_path / "out")
    assert sum(type(m).__name__ == "QuantLinear" for m in loaded.modules()) == len(non_head)
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        original_logits = source(ids).logits
        logits = loaded(ids).logits
        expected = reference_with_dequantized_weights(source, loaded)(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - expected).abs().max() <= 1e-4
    assert (logits - original_logits).abs().max() > 1e-4  # quantization did something
    out = loaded.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_dequantize_up_front_matches_on_the_fly(tmp_path):
    save_tiny_model("qwen2", tmp_path / "src")
    quantize(tmp_path / "src", "w3a16", tmp_path / "out")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        packed = mpq.load(tmp_path / "out")(ids).logits
        dense = mpq.load(tmp_path / "out", dequantize=True)(ids).logits
    assert (packed - dense).abs().max() <= 1e-5


def test_quantized_tied_head_is_untied(tmp_path):
    source = save_tiny_model("llama_tied", tmp_path / "src")
    recipe = parse_recipe("mpq_recipe: 1\nrules:\n  - targets: lm_head\n"
                          "    weights: {bits: 8, granularity: channel}\n"
                          "  - targets: Linear\n    weights: {bits: 4, group_size: 32}\n", "t.yaml")
    result = quantize(tmp_path / "src", recipe, tmp_path / "out")
    assert result.untied_head and result.plan.get("lm_head").scheme is not None
    loaded = mpq.load(tmp_path / "out")
    assert loaded.config.tie_word_embeddings is False
    # the input embedding keeps its float values
    torch.testing.assert_close(loaded.get_input_embeddings().weight,
                               source.get_input_embeddings().weight)
    head = loaded.get_output_embeddings()
    assert type(head).__name__ == "QuantLinear"
    error = (head.dequantized_weight() - weight_of(source.lm_head)).abs().max()
    assert 0 < error < 0.01


def test_stats_pipeline_feeds_quantizer_with_block_inputs(tmp_path, monkeypatch):
    """A quantizer that needs input_absmax sees the abs-max of its layer's real inputs."""
    seen = register_recording_quantizer(monkeypatch)
    source = save_tiny_model("llama", tmp_path / "src")
    recipe = parse_recipe("mpq_recipe: 1\nrules:\n  - targets: model.layers.0.self_attn.q_proj\n"
                          "    algorithm: recording\n    weights: {bits: 8, granularity: channel}\n",
                          "t.yaml", known_algorithms=["recording", "rtn"])
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(4000)))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained",
                        lambda *a, **k: byte_tokenizer())
    quantize(tmp_path / "src", recipe, tmp_path / "out", RunOptions(calibration=CalibrationOptions(source=str(text), num_samples=4, seq_len=32)))
    assert len(seen) == 1
    captured = []
    handle = source.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: captured.append(args[0].abs().amax(dim=(0, 1))))
    calib = byte_tokenizer()
    from mpq.calibration import build_calibration_set
    samples = build_calibration_set(CalibrationOptions(source=str(text), num_samples=4, seq_len=32), calib).samples
    with torch.no_grad():
        for ids in samples:
            source(ids)
    handle.remove()
    torch.testing.assert_close(seen[0], torch.stack(captured).amax(dim=0))


def test_quantizer_needing_stats_without_calibration_fails(tmp_path, monkeypatch):
    from mpq.quantizers import base

    class Needy:
        name, needs = "needy", frozenset({"input_absmax"})

        def check(self, scheme):
            pass

        def quantize(self, weight, scheme, stats):
            raise AssertionError("must not be called")

    monkeypatch.setitem(base.QUANTIZERS._entries, "needy", Needy())
    save_tiny_model("llama", tmp_path / "src")
    recipe = parse_recipe("mpq_recipe: 1\nrules:\n  - targets: Linear\n    algorithm: needy\n"
                          "    weights: {group_size: 32}\n",
                          "t.yaml")
    with pytest.raises(CalibrationError, match="--calib"):
        quantize(tmp_path / "src", recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()



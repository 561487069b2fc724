"""The GPTQ v1 writer, checked by an independent decoder written from the published layout."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mpq.checkpoint.convert import convert
from mpq.errors import FormatError
from mpq.checkpoint.state import state_from_artifact
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from tests.tiny_models import save_tiny_model


def decode_v1(qweight, qzeros, scales, g_idx, bits):
    """W [N, K] from v1 tensors, element by element as the layout is published:
    u[k, n] = (qweight[k // (32/b), n] >> (b·(k % (32/b)))) & (2^b − 1), likewise for zeros along
    N, zero = stored + 1, W[n, k] = scales[g_idx[k], n] · (u[k, n] − zero[g_idx[k], n])."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    k_total, n_total = words.shape[0] * per_word, words.shape[1]
    k = torch.arange(k_total)
    codes = (words[k // per_word] >> (bits * (k % per_word)).unsqueeze(1)) & mask  # [K, N]
    zwords = qzeros.to(torch.int64) & 0xFFFFFFFF
    n = torch.arange(n_total)
    zeros = ((zwords[:, n // per_word] >> (bits * (n % per_word))) & mask) + 1  # [G, N]
    g = g_idx.to(torch.int64)
    w = scales.to(torch.float32)[g] * (codes - zeros[g]).to(torch.float32)
    return w.t()


def recipe(weights: str, options: str | None = None, algorithm: str = "rtn"):
    text = (f"mpq_recipe: 1\nname: gptq-v1-test\ndefaults:\n  algorithm: {algorithm}\n"
            f"rules:\n  - targets: [Linear]\n    weights: {weights}\n")
    if options:
        text += f"    options: {options}\n"
    return parse_recipe(text, "gptq-v1-test")


CASES = {
    "int4 sym g32": ("{format: int, bits: 4, granularity: group, group_size: 32}", None, "rtn"),
    "int4 asym g32": ("{format: int, bits: 4, symmetric: false, granularity: group, "
                      "group_size: 32}", None, "rtn"),
    "int8 channel": ("{format: int, bits: 8, granularity: channel}", None, "rtn"),
    "int2 asym g64": ("{format: int, bits: 2, symmetric: false, granularity: group, "
                      "group_size: 64}", None, "rtn"),
    "int4 sym full-range g32": ("{format: int, bits: 4, full_range: true, granularity: group, "
                                "group_size: 32}", None, "rtn"),
    "int4 gptq full-range act-order": ("{format: int, bits: 4, full_range: true, "
                                       "granularity: group, group_size: 32}",
                                       "{act_order: true, clip_search: true}", "gptq"),
    "int4 gptq act-order": ("{format: int, bits: 4, granularity: group, group_size: 32}",
                            "{act_order: true}", "gptq"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_independent_decoder_reproduces_the_dequantized_weights(case, tmp_path, calib_text):
    weights, options, algorithm = CASES[case]
    save_tiny_model("llama", tmp_path / "src")
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    quantize(tmp_path / "src", recipe(weights, options, algorithm), tmp_path / "native", RunOptions(calibration=calibration))
    convert(tmp_path / "native", tmp_path / "gptq", "gptq")
    state = state_from_artifact(tmp_path / "native")
    config = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())[
        "quantization_config"] == config
    bits = config["bits"]
    nontrivial_g_idx = False
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), framework="pt") as handle:
        for name, qw in state.qweights.items():
            t = {key: handle.get_tensor(f"{name}.{key}")
                 for key in ("qweight", "qzeros", "scales", "g_idx")}
            assert t["scales"].dtype == torch.float16 and t["qweight"].dtype == torch.int32
            decoded = decode_v1(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
            # mpq's own dequantization of the same state with the scales in the format's fp16
            qw.scale = qw.scale.to(torch.float16).to(torch.float32)
            assert torch.equal(decoded, qw.dequantize(torch.float32)), name
            k, args = qw.shape[1], qw.args
            in_order = (torch.arange(k) // args.group_size if args.granularity == "group"
                        else torch.zeros(k, dtype=torch.long))
            nontrivial_g_idx |= not torch.equal(t["g_idx"].long(), in_order)
    assert config["desc_act"] == (options is not None)
    assert nontrivial_g_idx == (options is not None)  # act-order gives a permuted g_idx
    assert config["sym"] == ("asym" not in case)
    args = next(iter(state.qweights.values())).args
    assert config["group_size"] == (args.group_size if args.granularity == "group" else -1)


@pytest.mark.parametrize("weights, acts, match", [
    ("{format: int, bits: 3, granularity: group, group_size: 32}", None, "3-bit"),
    ("{format: nf4}", None, "nf4 weights"),
    ("{format: int, bits: 8, granularity: channel}",
     "{format: int, bits: 8, dynamic: true, granularity: token}", "weight-only"),
])
def test_inexpressible_plans_are_refused_with_the_layers(weights, acts, match, tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    text = "mpq_recipe: 1\nname: t\ndefaults:\n  algorithm: rtn\n"
    if acts:
        text += f"  input_activations: {acts}\n"
    text += f"rules:\n  - targets: [Linear]\n    weights: {weights}\n"
    with pytest.raises(FormatError, match=match) as info:
        quantize(tmp_path / "src", parse_recipe(text, "t"), tmp_path / "out", RunOptions(output_format="gptq"))
    assert "model.layers.0.self_attn.q_proj" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_mixed_settings_and_unquantized_block_layers_are_refused(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    text = ("mpq_recipe: 1\nname: t\ndefaults:\n  algorithm: rtn\nrules:\n"
            "  - {targets: ['re:.*down_proj'], skip: true}\n"
            "  - targets: ['re:.*self_attn.*']\n"
            "    weights: {format: int, bits: 8, granularity: channel}\n"
            "  - targets: [Linear]\n"
            "    weights: {format: int, bits: 4, granularity: group, group_size: 32}\n")
    with pytest.raises(FormatError) as info:
        quantize(tmp_path / "src", parse_recipe(text, "t"), tmp_path / "out", RunOptions(output_format="gptq"))
    message = str(info.value)
    assert "down_proj: left unquantized" in message and "one quantize_config" in message


def test_zero_point_zero_is_refused_at_write(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", "w4a16-asym", tmp_path / "native")
    state = state_from_artifact(tmp_path / "native")
    name = next(iter(state.qweights))
    state.qweights[name].zero[0, 0] = 0
    from mpq.checkpoint.writers import write_state, writer_for

    with pytest.raises(FormatError, match="zero point is 0"):
        write_state(state, tmp_path / "gptq", writer_for("gptq"))
    assert not (tmp_path / "gptq").exists()

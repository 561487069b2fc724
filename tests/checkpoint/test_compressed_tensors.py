"""The compressed-tensors writer, checked against the real compressed-tensors package: the
artifacts load with plain transformers and compute exactly what mpq.load computes."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from click.testing import CliRunner
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

import mpq
from mpq.cli.main import cli
from mpq.checkpoint.convert import convert
from mpq.errors import ArtifactError, FormatError
from mpq.checkpoint.compressed_tensors import layer_format, quantization_config
from mpq.checkpoint.state import state_from_artifact
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize
from mpq.config.recipe import parse_recipe
from tests.tiny_models import save_tiny_model

INT8_TOKEN = "{format: int, bits: 8, dynamic: true, granularity: token}"
RECIPES = {  # name → (weights, input activations)
    "w4-g32-sym": ("{format: int, bits: 4, granularity: group, group_size: 32}", None),
    "w4-g32-asym": ("{format: int, bits: 4, symmetric: false, granularity: group, "
                    "group_size: 32}", None),
    "w3-channel": ("{format: int, bits: 3, granularity: channel}", None),
    "w2-g32-full-range": ("{format: int, bits: 2, full_range: true, granularity: group, "
                          "group_size: 32}", None),
    "w8-channel": ("{format: int, bits: 8, granularity: channel}", None),
    "w8a8-int8-token": ("{format: int, bits: 8, granularity: channel}", INT8_TOKEN),
    "w8a8-int8-static": ("{format: int, bits: 8, granularity: channel}",
                         "{format: int, bits: 8, dynamic: false}"),
    "w8a8-fp8": ("{format: fp8_e4m3, granularity: channel}",
                 "{format: fp8_e4m3, dynamic: true, granularity: token}"),
    "fp8-tensor-weights": ("{format: fp8_e4m3, granularity: tensor}", None),
    "fp8-block-weights": ("{format: fp8_e4m3, granularity: block}", None),
    "fp8-block-w8a8": ("{format: fp8_e4m3, granularity: block}",
                       "{format: fp8_e4m3, dynamic: true, granularity: token}"),
    "mxfp4": ("{format: mxfp4}", None),
    "mxfp8": ("{format: mxfp8}", None),
    "nvfp4": ("{format: nvfp4}", None),
}


def recipe(weights: str, acts: str | None = None, extra_rules: str = ""):
    """Every Linear gets ``weights`` (and ``acts``) unless one of ``extra_rules`` (YAML list
    items, matched first) says otherwise."""
    text = "mpq_recipe: 1\nname: ct-test\ndefaults:\n  algorithm: rtn\n"
    if acts:
        text += f"  input_activations: {acts}\n"
    text += "rules:\n" + extra_rules + f"  - targets: [Linear]\n    weights: {weights}\n"
    return parse_recipe(text, "ct-test")


def load_with_transformers(path, asymmetric: bool = False):
    """Plain transformers.  Asymmetric pack-quantized checkpoints need ``dequantize=True``:
    transformers 5 / compressed-tensors 0.20 build unpacked zero-point parameters for the
    compressed path (llm-compressor issues #1618, #1704), while the format packs them."""
    kwargs = {}
    if asymmetric:
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def same_logits(native, ct_model, ids):
    with torch.no_grad():
        return torch.equal(native(ids).logits, ct_model(ids).logits)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


BF16_ONLY = ("mxfp4", "mxfp8", "nvfp4")  # compressed-tensors decompresses these to bfloat16


def save_source(path, bf16: bool = False):
    model = save_tiny_model("llama", path)
    if bf16:
        model.to(torch.bfloat16).save_pretrained(path)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_transformers_loads_exactly_what_mpq_loads(name, tmp_path, ids, calib_text):
    """Same logits, bit for bit.  The MX/NV formats use a bfloat16 model: compressed-tensors
    0.20 decompresses FP4/MX weights to bfloat16 whatever the model's dtype."""
    weights, acts = RECIPES[name]
    save_source(tmp_path / "src", bf16=name in BF16_ONLY)
    calibration = CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=32)
    quantize(tmp_path / "src", recipe(weights, acts), tmp_path / "native", RunOptions(calibration=calibration))
    quantize(tmp_path / "src", recipe(weights, acts), tmp_path / "ct", RunOptions(calibration=calibration, output_format="compressed-tensors"))
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    QuantizationConfig.model_validate(config["quantization_config"])  # the package accepts it
    assert config["mpq"]["format"] == "compressed-tensors"
    ct_model = load_with_transformers(tmp_path / "ct", asymmetric="asym" in name)
    assert same_logits(mpq.load(tmp_path / "native", dequantize=True), ct_model, ids)
    # activation quantization really runs in the transformers model when the scheme has it
    if acts:
        plain = mpq.load(tmp_path / "native", dequantize=True)
        for module in plain.modules():
            module._forward_pre_hooks.clear()
        assert not same_logits(plain, ct_model, ids)


def test_convert_writes_the_same_files_as_quantize(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    rec = recipe(RECIPES["w4-g32-asym"][0])
    quantize(tmp_path / "src", rec, tmp_path / "native")
    quantize(tmp_path / "src", rec, tmp_path / "direct", RunOptions(output_format="compressed-tensors"))
    convert(tmp_path / "native", tmp_path / "converted", "compressed-tensors")
    for file in ("model.safetensors", "config.json"):
        assert (tmp_path / "direct" / file).read_bytes() == \
            (tmp_path / "converted" / file).read_bytes()


def test_mixed_precision_groups_and_ignore(tmp_path, ids):
    save_tiny_model("llama", tmp_path / "src")
    rules = ("  - targets: ['re:.*mlp.*']\n"
             "    weights: {format: fp8_e4m3, granularity: channel}\n"
             "  - {targets: ['re:.*o_proj'], skip: true}\n")
    rec = recipe(RECIPES["w4-g32-sym"][0], extra_rules=rules)
    quantize(tmp_path / "src", rec, tmp_path / "native")
    quantize(tmp_path / "src", rec, tmp_path / "ct", RunOptions(output_format="compressed-tensors"))
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    assert {g["format"] for g in qc["config_groups"].values()} == {"pack-quantized",
                                                                  "naive-quantized"}
    assert "model.layers.0.self_attn.o_proj" in qc["ignore"] and "lm_head" in qc["ignore"]
    assert same_logits(mpq.load(tmp_path / "native", dequantize=True),
                       load_with_transformers(tmp_path / "ct"), ids)


@pytest.mark.parametrize("name", BF16_ONLY + ("fp8-block-weights",))
def test_compressed_tensors_decompresses_mpqs_weights_exactly(name, tmp_path):
    """Layer by layer through the package's own decompressor, on an fp32 model."""
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", recipe(*RECIPES[name]), tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "ct", "compressed-tensors")
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    group = json.loads((tmp_path / "ct" / "config.json").read_text())[
        "quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    for layer, qw in state_from_artifact(tmp_path / "native").qweights.items():
        local = {k[len(layer) + 1:]: v for k, v in tensors.items() if k.startswith(layer + ".")}
        weight = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, qw.dequantize(torch.float32).to(weight.dtype)), layer


def test_layer_formats_are_the_ones_compressed_tensors_infers(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    from mpq.engine.spec import plan_model

    for weights, acts in RECIPES.values():
        _, plan = plan_model(model, recipe(weights, acts))
        group = quantization_config(plan)["config_groups"]["group_0"]
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"],
                                    input_activations=group["input_activations"])
        assert infer_module_format(torch.nn.Linear, scheme).value == \
            layer_format(plan.quantized()[0].scheme)


def test_inexpressible_layers_are_refused_before_quantizing(tmp_path, monkeypatch):
    save_tiny_model("llama", tmp_path / "src")
    monkeypatch.setattr("mpq.quantize.run_blocks",
                        lambda *a, **k: pytest.fail("quantized before the format check"))
    with pytest.raises(FormatError, match="nf4 weights"):
        quantize(tmp_path / "src", "nf4", tmp_path / "out", RunOptions(output_format="compressed-tensors"))
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(cli, ["quantize", str(tmp_path / "src"), "-r", "nf4",
                                      "-o", str(tmp_path / "out"),
                                      "--format", "compressed-tensors"])
    assert result.exit_code == 9 and "model.layers.0.self_attn.q_proj" in result.output
    typo = CliRunner().invoke(cli, ["quantize", str(tmp_path / "src"), "-r", "w4a16",
                                    "-o", str(tmp_path / "out"), "--format", "compresed-tensors"])
    assert typo.exit_code == 9 and "did you mean 'compressed-tensors'" in typo.output


def test_preflight_warns_and_strict_refuses(tmp_path):
    save_tiny_model("llama", tmp_path / "src")  # K = 64 or 128, N = 64/32/...
    result = quantize(tmp_path / "src", "w4a16-asym", tmp_path / "ct", RunOptions(output_format="compressed-tensors"))
    text = " ".join(result.warnings)
    assert "asymmetric weights" in text and "not a multiple of 128" in text
    runner = CliRunner()
    strict = runner.invoke(cli, ["quantize", str(tmp_path / "src"), "-r", "w4a16-asym",
                                 "-o", str(tmp_path / "strict"), "--format",
                                 "compressed-tensors", "--strict"])
    assert strict.exit_code == 9 and "pre-flight" in strict.output
    assert not (tmp_path / "strict").exists()


def test_mpq_load_refuses_other_formats_with_a_pointer(tmp_path):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", "w8a16", tmp_path / "ct", RunOptions(output_format="compressed-tensors"))
    with pytest.raises(ArtifactError, match="compressed-tensors checkpoint written by mpq"):
        mpq.load(tmp_path / "ct")
    with pytest.raises(ArtifactError, match="native artifacts only|not a native"):
        convert(tmp_path / "ct", tmp_path / "again", "gptq")


def test_eval_command_scores_a_compressed_tensors_folder_like_the_native(tmp_path, calib_text):
    save_tiny_model("llama", tmp_path / "src")
    quantize(tmp_path / "src", "w4a16", tmp_path / "native")
    convert(tmp_path / "native", tmp_path / "ct", "compressed-tensors")
    ppl = {}
    for name in ("native", "ct"):
        result = CliRunner().invoke(cli, ["eval", str(tmp_path / name), "--data", str(calib_text),
                                          "--window", "32", "--num-windows", "4", "--json"])
        assert result.exit_code == 0, result.output
        ppl[name] = json.loads(result.stdout.strip().splitlines()[-1])["ppl"]
    assert ppl["ct"] == pytest.approx(ppl["native"], rel=1e-6)

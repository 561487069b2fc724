"""Whole-model sizes: quantize, inspect and the dry run report the artifact's bytes and bits per
weight over every parameter, and agree with the files."""
from __future__ import annotations

import json

import pytest
import torch

from mpq.analysis.estimate import estimate_run
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import RunOptions, resolve_run
from mpq.quantize import quantize
from tests.helpers import byte_tokenizer, run_cli
from tests.tiny_models import tiny_model


def save_source(path, arch: str, dtype: torch.dtype):
    model = tiny_model(arch).to(dtype)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model


def recipe(scale_dtype: str):
    return parse_recipe("mpq_recipe: 1\nname: sizes\nrules:\n  - targets: Linear\n"
                        f"    weights: {{bits: 4, group_size: 32, scale_dtype: {scale_dtype}}}\n",
                        "sizes.yaml")


def tensor_bytes(folder) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                t = handle.get_tensor(name)
                total += t.numel() * t.element_size()
    return total


CASES = [("llama", torch.float32, "fp32", "mpq"), ("llama", torch.bfloat16, "fp16", "mpq"),
         ("llama_tied", torch.bfloat16, "fp16", "mpq"), ("qwen2", torch.bfloat16, "fp16", "gptq"),
         ("llama", torch.bfloat16, "bf16", "compressed-tensors")]


@pytest.mark.parametrize("arch, dtype, scale_dtype, fmt", CASES)
def test_reported_sizes_match_the_files_and_the_dry_run(arch, dtype, scale_dtype, fmt,
                                                        tmp_path):
    model = save_source(tmp_path / "src", arch, dtype)
    options = RunOptions(output_format=fmt)
    estimate = estimate_run(resolve_run(tmp_path / "src", recipe(scale_dtype), options),
                            probe=False).size
    result = quantize(tmp_path / "src", recipe(scale_dtype), tmp_path / "out", options)
    sizes = result.sizes
    stored = tensor_bytes(tmp_path / "out")
    assert sizes["stored_bytes"] == stored == estimate["tensor_bytes"]
    # every parameter counted once (tied embeddings too), quantized or kept
    assert sizes["total_weights"] == model.num_parameters() == estimate["total_weights"]
    assert sizes["bits_per_weight"] == pytest.approx(8 * stored / model.num_parameters(),
                                                     abs=1e-4)
    assert sizes["bits_per_weight"] == pytest.approx(estimate["bits_per_weight"], abs=1e-4)
    assert sizes["dense_bytes"] + sizes["quantized_bytes"] == stored
    assert sizes["quantized_bits_per_weight"] == pytest.approx(
        8 * sizes["quantized_bytes"] / sizes["quantized_weights"], abs=1e-4)
    assert sizes["quantized_bits_per_weight"] < sizes["bits_per_weight"]  # the float parts cost
    files = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    # the header is estimated: within 5 % on these tiny models (it weighs little on real ones)
    assert abs(estimate["file_bytes"] / files - 1) < 0.05
    if fmt != "mpq":  # mpq inspect reads native artifacts
        return
    inspected = run_cli("inspect", tmp_path / "out", "--json")
    assert inspected.exit_code == 0, inspected.output
    report = json.loads(inspected.stdout)["sizes"]
    for key in ("total_weights", "bits_per_weight", "quantized_bits_per_weight",
                "dense_bytes", "quantized_bytes"):
        assert report[key] == sizes[key], key


def test_bf16_float_parts_and_fp16_scales_shrink_the_artifact(tmp_path):
    save_source(tmp_path / "src", "llama", torch.float32)
    full = quantize(tmp_path / "src", recipe("fp32"), tmp_path / "fp32").sizes
    text = ("mpq_recipe: 1\nname: small\nstorage_dtype: bf16\nrules:\n  - targets: Linear\n"
            "    weights: {bits: 4, group_size: 32, scale_dtype: fp16}\n")
    small = quantize(tmp_path / "src", parse_recipe(text, "small.yaml"), tmp_path / "small").sizes
    assert small["dense_bytes"] * 2 == full["dense_bytes"]
    assert small["quantized_bits_per_weight"] == pytest.approx(
        full["quantized_bits_per_weight"] - 16 / 32, abs=1e-3)  # 16 fewer bits per 32 weights
    assert small["bits_per_weight"] < full["bits_per_weight"]


def test_the_cli_prints_the_whole_model_figure(tmp_path, calib_text):
    save_source(tmp_path / "src", "llama", torch.float32)
    result = run_cli("quantize", tmp_path / "src", "--recipe", "w4a16", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "bits/weight over all" in result.stdout and "quantized layers alone" in result.stdout
    dry = run_cli("quantize", tmp_path / "src", "--recipe", "w4a16", "-o", tmp_path / "dry",
                  "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "bits/weight" in dry.stdout
    shown = run_cli("inspect", tmp_path / "out")
    assert shown.exit_code == 0 and "bits/weight over all" in shown.stdout

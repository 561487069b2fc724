"""llama.cpp's activation rounding (mpq eval --numerics llama.cpp): q8_0 as the gguf package
rounds it, q8_K by its definition, hooks only while open, and the CLI option end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mpq
from mpq.analysis.llama_cpp_numerics import llama_cpp_activations, round_q8_0, round_q8_k
from mpq.errors import OptionError
from tests.helpers import run_cli, write_tokenizer
from tests.tiny_models import save_tiny_model

gguf = pytest.importorskip("gguf")

GGUF_RECIPE = """mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: ["re:.*mlp\\\\.down_proj$"]
    weights: {format: q4_k}
  - targets: [Linear]
    weights: {format: q4_0}
"""
INT8_RECIPE = """mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: [Linear]
    weights: {format: int, bits: 8, symmetric: true, granularity: channel}
"""


def test_q8_0_rounding_is_the_gguf_packages_bit_for_bit():
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :32] = 0  # an all-zero block
    x[1, 5] = 40.0  # an outlier
    ref = gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(round_q8_0(x).numpy(), ref.astype(np.float32))


def test_q8_k_rounding_keeps_the_extreme_and_stays_on_its_grid():
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    x[0, 300] = -9.0  # the block's extreme: exactly −127 steps
    y = round_q8_k(x)
    assert torch.allclose(y[0, 300], torch.tensor(-9.0))
    blocks, rounded = x.reshape(3, 2, 256), y.reshape(3, 2, 256)
    v = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    step = v.abs() / 127
    codes = rounded / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert bool(((rounded - blocks).abs() <= step / 2 + 1e-6).all())
    assert not torch.equal(y, x)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_cpp_numerics")
    save_tiny_model("llama_wide", root / "src")
    write_tokenizer(root / "src")
    for name, text in (("gguf", GGUF_RECIPE), ("int8", INT8_RECIPE)):
        (root / f"{name}.yaml").write_text(text)
        done = run_cli("quantize", root / "src", "-r", root / f"{name}.yaml", "-o", root / name)
        assert done.exit_code == 0, done.output
    data = root / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 30, encoding="utf-8")
    return root, data


def test_hooks_round_only_while_open(artifacts):
    root, _ = artifacts
    model = mpq.load(root / "gguf", dequantize=True)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
        with llama_cpp_activations(model) as hooked:
            rounded = model(ids).logits
        after = model(ids).logits
    assert hooked == 2 * 7  # the 7 linears of both blocks (the head stays float)
    assert torch.equal(before, after) and not torch.equal(before, rounded)
    assert float((before - rounded).abs().max()) < 0.1 * float(before.abs().max())


def test_eval_numerics_llama_cpp(artifacts):
    root, data = artifacts
    runs = {}
    for numerics in ("mpq", "llama.cpp"):
        done = run_cli("eval", root / "gguf", "--data", data, "--window", 64, "--numerics",
                       numerics, "--json")
        assert done.exit_code == 0, done.output
        runs[numerics] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["llama.cpp"]["protocol"]["numerics"] == "llama.cpp"
    assert runs["llama.cpp"]["ppl"] != runs["mpq"]["ppl"]
    assert abs(runs["llama.cpp"]["ppl"] / runs["mpq"]["ppl"] - 1) < 0.05
    human = run_cli("eval", root / "gguf", "--data", data, "--window", 64, "--numerics",
                    "llama.cpp")
    assert "llama.cpp's 8-bit activation rounding" in human.stdout


@pytest.mark.parametrize("which, message", [
    ("int8", "needs every quantized layer in a GGUF type; 14 are not: model.layers.0"),
    ("src", "needs an mpq artifact"),
])
def test_eval_numerics_llama_cpp_refuses_what_llama_cpp_cannot_run(artifacts, which, message):
    root, data = artifacts
    done = run_cli("eval", root / which, "--data", data, "--window", 64, "--numerics",
                   "llama.cpp")
    assert done.exit_code == 2, done.output
    assert message in done.output
    with pytest.raises(OptionError):
        with llama_cpp_activations(mpq.load(root / "gguf", dequantize=True).model):
            pass

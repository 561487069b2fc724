"""Interop on the real SmolLM2-135M: compressed-tensors artifacts written by mpq load with plain
transformers (compressed-tensors installed, no mpq import in the loading process) and score the
same perplexity as mpq.load of the native artifact."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import mpq
from mpq.checkpoint.convert import convert
from mpq.analysis.eval import load_eval_ids, perplexity
from mpq.calibration import CalibrationOptions
from mpq.engine.spec import RunOptions
from mpq.quantize import quantize

pytestmark = pytest.mark.slow

WINDOW, WINDOWS = 128, 2
# recipe → needs calibration
RECIPES = {"w4a16": False, "w4a16-asym": False, "w8a8-int8": True, "w8a8-fp8": False}

# Runs in a fresh interpreter: only transformers (+ compressed-tensors) and torch.
TRANSFORMERS_PPL = r"""
import json, math, sys
import torch, transformers
path, ids_file, window, windows, asym = sys.argv[1:6]
kwargs = {}
if asym == "1":  # packed zero points load through the dequantize path (upstream limitation)
    kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
ids = torch.load(ids_file)
window, windows = int(window), int(windows)
nll, count = 0.0, 0
with torch.no_grad():
    for i in range(windows):
        chunk = ids[i * window:(i + 1) * window].unsqueeze(0)
        logits = model(chunk).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
print(json.dumps({"ppl": math.exp(nll / count), "mpq_imported": "mpq" in sys.modules}))
"""


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_compressed_tensors_artifact_scores_like_the_native(recipe, smollm2_dir, corpora,
                                                             tmp_path):
    import torch
    from transformers import AutoTokenizer

    calibration = (CalibrationOptions(source=str(corpora / "enwiki_excerpt.train.txt"),
                                      num_samples=8, seq_len=128)
                   if RECIPES[recipe] else CalibrationOptions())
    quantize(smollm2_dir, recipe, tmp_path / "native", RunOptions(calibration=calibration))
    convert(tmp_path / "native", tmp_path / "ct", "compressed-tensors")
    ids = load_eval_ids(corpora / "enwiki_excerpt.test.txt",
                        AutoTokenizer.from_pretrained(smollm2_dir))
    native = perplexity(mpq.load(tmp_path / "native", dequantize=True), ids, window=WINDOW,
                        num_windows=WINDOWS).ppl
    torch.save(ids[:WINDOW * WINDOWS].clone(), tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", TRANSFORMERS_PPL, str(tmp_path / "ct"),
                          str(tmp_path / "ids.pt"), str(WINDOW), str(WINDOWS),
                          "1" if "asym" in recipe else "0"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["mpq_imported"]
    print(f"{recipe}: ppl mpq.load {native:.4f}, transformers {result['ppl']:.4f}")
    assert result["ppl"] == pytest.approx(native, rel=1e-3)

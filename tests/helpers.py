"""Helpers shared by several test modules (fixtures live in conftest.py)."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from click.testing import CliRunner

from mpq.calibration import CalibrationOptions, build_calibration_set
from mpq.cli.main import cli
from mpq.config.recipe import parse_recipe
from tests.tiny_models import model_from_config, tiny_config, tiny_model

REPO = Path(__file__).resolve().parent.parent  # the repository root


def byte_tokenizer():
    """A tokenizer over bytes (vocab 256) for the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i) if i >= 33 else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", eos_token="<1>")


def bpe_tokenizer():
    """A byte-level BPE tokenizer with the tiny models' vocabulary size (256): 248 byte symbols,
    five merges and three special tokens, a ChatML-like chat template, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())[:248]
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("t", "h"), ("th", "e"), ("a", "n"), ("i", "n"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                          "{% endfor %}")
    return fast


# the pieces spm_tokenizer adds to its symbols, best first: "er" before "th" makes "ther"
# "th" + "er" in this order, but "the" + "r" when merged left to right
SPM_PIECES = ["er", "\u2581t", "he", "\u2581th", "in", "\u2581the", "an", "on", "\u2581a", "re",
              "\u2581an", "\u2581and", "en", "at", "is", "\u2581s", "or", "th", "\u2581c",
              "\u2581cat", "the", "\u2581is", "\u2581in"]


def spm_tokenizer():
    """A SentencePiece-style BPE tokenizer as Gemma ships it in tokenizer.json (spaces as "▁"
    by a Replace normalizer, byte fallback to ``<0x00>`` … ``<0x7F>``, a BOS in front of every
    text): ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, the 128 ASCII byte tokens,
    "▁", a–z, ".", ",", then SPM_PIECES (184 ids), and two special turn markers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(128)]
               + ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [".", ","])
    vocab = {s: i for i, s in enumerate(symbols + SPM_PIECES)}
    # as transformers converts a SentencePiece BPE model: every split of a piece into two
    # vocabulary entries is a merge, ranked by the piece
    merges = [(piece[:k], piece[k:]) for piece in SPM_PIECES for k in range(1, len(piece))
              if piece[:k] in vocab and piece[k:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=["<start_of_turn>",
                                                              "<end_of_turn>"])
    fast.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['content'] }}"
                          "<end_of_turn>{% endfor %}")
    return fast


def gemma_dir(path, arch: str, **overrides):
    """A tiny ``arch`` model (tests.tiny_models, with ``overrides`` set on its config) and
    spm_tokenizer, saved at ``path``."""
    config = tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model_from_config(config).save_pretrained(path)
    spm_tokenizer().save_pretrained(path)
    return path


BOS_ID = 2  # the BOS of bos_tokenizer


def bos_tokenizer(appends_eos: bool = False):
    """byte_tokenizer's vocabulary (256), but it adds a BOS (id 2, ``<2>``) in front of every
    text through a template post-processor, as Llama's, Gemma's and Mistral's tokenizers do
    (``appends_eos``: it also ends every text with its EOS, id 1)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_tokenizer().backend_tokenizer
    single = "<2> $A" + (" <1>" if appends_eos else "")
    special = [("<2>", BOS_ID)] + ([("<1>", 1)] if appends_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=single + " $B",
                                                       special_tokens=special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", eos_token="<1>",
                                   bos_token="<2>")


def register_recording_quantizer(monkeypatch) -> dict:
    """Register 'recording': int RTN that keeps each call's input_absmax (call index → tensor)."""
    from mpq.numerics.base import NUMBER_FORMATS
    from mpq.quantizers.base import QUANTIZERS

    seen: dict = {}

    class Recording:
        name, needs = "recording", frozenset({"input_absmax"})

        def check(self, scheme):
            pass

        def quantize(self, weight, scheme, stats):
            seen[len(seen)] = stats["input_absmax"].clone()
            return NUMBER_FORMATS.get("int").quantize(weight, scheme.weights)

    monkeypatch.setitem(QUANTIZERS._entries, "recording", Recording())
    return seen


def folder_bytes(path):
    """Relative path → bytes of every file under ``path``."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def save_sharded_model(path, *, tied: bool = False, dtype=torch.float32) -> None:
    """A 4-layer Llama saved in several shards (with an index)."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=256, num_hidden_layers=4,
                                      max_position_embeddings=128, tie_word_embeddings=tied)
    model = model_from_config(config).to(dtype)
    model.save_pretrained(path, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()


def resume_recipe(extra: str = "", algorithm: str = "gptq", group: int = 32):
    """An int4 asym recipe for every Linear (``extra``: YAML lines such as KV or TRANSFORMS)."""
    text = ("mpq_recipe: 1\nname: resume-test\n" + extra +
            f"defaults:\n  algorithm: {algorithm}\nrules:\n  - targets: [Linear]\n"
            f"    weights: {{format: int, bits: 4, symmetric: false, granularity: group, "
            f"group_size: {group}}}\n")
    return parse_recipe(text, "resume-test.yaml")


KV = "kv_cache: {format: fp8_e4m3, granularity: head}\n"


TRANSFORMS = "transforms:\n  - {type: awq, grid: 4}\n"


def samples_of(calib_text):
    return build_calibration_set(CalibrationOptions(source=str(calib_text), num_samples=4, seq_len=64), byte_tokenizer()).samples


def logits_error(model, source, samples) -> float:
    with torch.no_grad():
        return sum(float((model(s).logits - source(s).logits).pow(2).mean()) for s in samples)


def outlier_model(arch: str, path):
    """A tiny model whose norms put a few loud channels into the linears' inputs (as in real LLMs)."""
    model = tiny_model(arch)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[3] = 30.0
                norm.weight[11] = -30.0
    model.save_pretrained(path)
    return model


def run_cli(*args):
    """``mpq ARGS...`` through click's runner (arguments turned into strings)."""
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


def eval_json(*args) -> dict:
    """The result record of a successful ``mpq eval ARGS... --json`` (its last stdout line)."""
    import json

    result = run_cli("eval", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


WORDS = "the cat sat on a mat while dogs ran over green hills near old towns".split()


def tiny_folder(root, arch: str = "llama", words: int = 4000):
    """``root``/src: a tiny ``arch`` model folder with the byte tokenizer; ``root``/calib.txt:
    ``words`` seeded words of WORDS.  Returns ``root``."""
    import random

    from tests.tiny_models import save_tiny_model

    save_tiny_model(arch, root / "src")
    byte_tokenizer().save_pretrained(root / "src")
    rng = random.Random(0)
    (root / "calib.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(words)))
    return root


def write_tokenizer(path):
    """Save the byte tokenizer into a model folder."""
    byte_tokenizer().save_pretrained(path)


def run_engine(model, recipe, samples, *, batch_tokens: int = 2048, **run_options):
    """Quantize ``model`` in place with ``recipe`` through the block engine (no files): the
    RunState's other fields from ``run_options`` (reuse, keep_dequantized, ...); returns it."""
    from mpq.config.run_log import RunLog
    from mpq.engine.block_transforms import TransformHook
    from mpq.engine.float_stream import float_stream_hooks
    from mpq.engine.kv_calibration import KVCalibrationHook
    from mpq.engine.lifecycle import RunState
    from mpq.engine.runner import run_blocks
    from mpq.engine.spec import needed_stats, plan_model

    layout, plan = plan_model(model, recipe)
    run = RunState(model=model, layout=layout, plan=plan, log=RunLog.for_plan(plan),
                   needs=needed_stats(plan), **run_options)
    float_before, float_after = float_stream_hooks(run.needs)
    run_blocks(run, samples, batch_tokens=batch_tokens,
               hooks=[*float_before, TransformHook(), *float_after, KVCalibrationHook()])
    return run


def disk_full_at_block(monkeypatch, block: int = 1) -> None:
    """Make saving work-directory block ``block`` fail as a full disk does: safetensors raises
    its own SafetensorError after part of the file was written (earlier blocks save normally)."""
    from safetensors import SafetensorError

    import mpq.engine.resume as resume

    save_file = resume.save_file

    def save_block_file(tensors, path, *args, **kwargs):
        if f"block-{block:05d}" in str(path):
            Path(path).write_bytes(b"\0" * 64)  # what got written before the disk filled
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume, "save_file", save_block_file)


STATIC_RECIPE = ("mpq_recipe: 1\nname: w8a8-static\ndefaults:\n  algorithm: rtn\n"
                 "kv_cache: {format: fp8_e4m3}\nrules:\n  - targets: [Linear]\n"
                 "    weights: {format: int, bits: 8, granularity: channel}\n"
                 "    input_activations: {format: int, bits: 8, dynamic: false}\n")
LETTERS = "".join(chr(97 + (i * 7) % 26) for i in range(6000))  # every letter, no byte < 33


def outlier_artifact(root: Path) -> tuple[Path, Path]:
    """(source folder, artifact) of a tiny Llama with the byte tokenizer whose token 0 (every
    byte below 33, e.g. a space) embeds as one-hot channel 0, so that the input norm of block 0
    makes it |8| on that channel; its head is zero, so greedy decoding always emits token 0.
    Quantized with :data:`STATIC_RECIPE` (static int8 inputs, FP8 KV cache) on 4 × 32 tokens
    of :data:`LETTERS`, which never hold token 0."""
    from mpq.engine.spec import RunOptions
    from mpq.quantize import quantize

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 0.0
        model.model.embed_tokens.weight[0, 0] = 1.0
        model.lm_head.weight.zero_()
    src, art = root / "src", root / "art"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    calib = root / "letters.txt"
    calib.write_text(LETTERS)
    quantize(src, parse_recipe(STATIC_RECIPE, "w8a8-static"), art,
             RunOptions(calibration=CalibrationOptions(source=str(calib), num_samples=4,
                                                       seq_len=32)))
    return src, art

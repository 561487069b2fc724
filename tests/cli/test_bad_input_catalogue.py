"""The catalogue of bad inputs: every case gives one clear line, a documented exit code, and
leaves nothing behind.

Each :class:`Case` builds a command line in its own folder, runs the ``mpq`` CLI in-process and
checks that

- the exit code is the expected :mod:`mpq.errors` class's ``exit_code``;
- stderr holds exactly one non-empty line, ``error: what (how to fix)``, naming what and where
  (the case's expected substrings);
- the case's folder (and the shared tiny model and artifact) is unchanged: no output folder, no
  hidden temporary sibling, an existing output untouched, inputs not modified.

docs/bad-inputs.md is generated from the real messages::

    python -m tests.cli.test_bad_input_catalogue > docs/bad-inputs.md

To add a case, append a :class:`Case` to ``CASES`` (and regenerate the doc; a test checks that
the doc's table lists exactly the ids of ``CASES``).
"""
from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner

from mpq.cli.main import cli
from mpq.errors import (ArtifactError, CalibrationError, EvalGateError, FormatError, ModelError,
                        MpqError, OptionError, OutputError, RecipeError, ResourceError,
                        ResumeError, SchemeError)
from tests.tiny_models import save_tiny_model
from tests.helpers import REPO, disk_full_at_block

DOC = REPO / "docs" / "bad-inputs.md"


@dataclass(frozen=True)
class Env:
    """Where a case runs: its own empty folder ``tmp``, and the shared read-only inputs."""

    tmp: Path  # the case's own folder (the output goes to tmp/out)
    src: Path  # a tiny Llama folder with a byte tokenizer
    art: Path  # that model quantized with w4a16 (native mpq artifact)
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def recipe(self, body: str, name: str = "r.yaml") -> Path:
        """A recipe file: ``mpq_recipe: 1`` followed by ``body``."""
        return self.write(name, "mpq_recipe: 1\n" + body)

    def model_copy(self, name: str = "bad") -> Path:
        return Path(shutil.copytree(self.src, self.tmp / name))

    def artifact_copy(self, name: str = "art") -> Path:
        return Path(shutil.copytree(self.art, self.tmp / name))

    def quantize(self, model, *extra, recipe="w4a16") -> list:
        return ["quantize", model, "-r", recipe, "-o", self.out, *extra]


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what is wrong, in words (docs/bad-inputs.md)
    build: Callable[[Env], list]  # the arguments after `mpq`, built in env.tmp
    error: type[MpqError]
    expect: tuple[str, ...]  # substrings of the message; {tmp}, {src}, {art} are filled in
    # names that may appear in tmp afterwards, each with the reason (documented behaviour)
    leaves: tuple[str, ...] = ()
    skip: Callable[[], str | None] | None = None  # a reason to skip on this machine, or None
    # a product bug this case shows (the test is a strict xfail until it is fixed)
    known_issue: str | None = None
    # inputs (under tmp) that the case itself changes while the command runs, exempt from the
    # unchanged-input check (say so in ``input``)
    rewrites: tuple[str, ...] = ()


# --- builders of damaged inputs -------------------------------------------------------------------

def _rewrite_tensors(path: Path, change: Callable[[dict], None]) -> None:
    """Load a safetensors file, let ``change`` edit the tensors, save it with the same header
    metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _poisoned(env: Env, value: float) -> Path:
    model = env.model_copy()

    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value

    _rewrite_tensors(model / "model.safetensors", poison)
    return model


def _gpt2(env: Env) -> Path:
    from tests.helpers import write_tokenizer

    save_tiny_model("gpt2", env.tmp / "gpt2")
    write_tokenizer(env.tmp / "gpt2")
    return env.tmp / "gpt2"


def _gptq_artifact(env: Env) -> Path:
    from mpq.engine.spec import RunOptions
    from mpq.quantize import quantize

    quantize(env.src, "w4a16", env.tmp / "gptq", RunOptions(output_format="gptq"))
    return env.tmp / "gptq"


def _llama_cpp_installed() -> str | None:
    import importlib.util

    return "llama_cpp is installed here" if importlib.util.find_spec("llama_cpp") else None


def _optimum_installed() -> str | None:
    import importlib.util

    return "optimum is installed here" if importlib.util.find_spec("optimum") else None


def _missing_tensor(env: Env) -> Path:
    model = env.model_copy()
    _rewrite_tensors(model / "model.safetensors",
                     lambda tensors: tensors.pop("model.layers.1.mlp.down_proj.weight"))
    return model


def _truncated(env: Env) -> Path:
    model = env.model_copy()
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return model


def _garbage_header(env: Env) -> Path:
    model = env.model_copy()
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"not json" * 2 + data[24:])
    return model


def _edited_config(env: Env, edit: Callable[[dict], None] | None = None, text: str | None = None
                   ) -> Path:
    model = env.model_copy()
    config = model / "config.json"
    if text is None:
        data = json.loads(config.read_text())
        edit(data)
        text = json.dumps(data)
    config.write_text(text)
    return model


def _artifact_version(env: Env, version: str) -> Path:
    art = env.artifact_copy()
    _rewrite_tensors_meta(art / "model.safetensors", {"mpq.format_version": version})
    return art


def _rewrite_tensors_meta(path: Path, changes: dict[str, str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), **changes}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(tensors, str(path), metadata=metadata)


def _artifact_without(env: Env, key: str) -> Path:
    art = env.artifact_copy()
    _rewrite_tensors(art / "model.safetensors", lambda tensors: tensors.pop(key))
    return art


def _artifact_reshaped(env: Env, key: str) -> Path:
    art = env.artifact_copy()

    def reshape(tensors):
        tensors[key] = tensors[key][:, :-1].contiguous()

    _rewrite_tensors(art / "model.safetensors", reshape)
    return art


def _calib(env: Env, name: str, text: str) -> Path:
    return env.write(name, text)


def _full_disk(env: Env) -> list:
    def write_safetensors(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    env.monkeypatch.setattr("mpq.checkpoint.native.write_safetensors", write_safetensors)
    return env.quantize(env.src)


def _offline(env: Env) -> list:
    env.monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return env.quantize(env.src, "--calib", "hf:wikitext:wikitext-2-raw-v1")


def _existing_output(env: Env) -> list:
    env.write("out/keep.txt", "user data")
    return env.quantize(env.src)


def _cuda_present() -> str | None:
    return "CUDA is available here" if torch.cuda.is_available() else None


def _eval_args(env: Env, model: Path, *extra) -> list:
    data = env.write("eval.txt", "the quick brown fox jumps over the lazy dog. " * 8)
    return ["eval", model, "--data", data, "--window", 32, *extra]


def _pickled_only(env: Env) -> Path:
    folder = env.tmp / "pickled"
    env.write("pickled/config.json", (env.src / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
    return folder


def _latin1(env: Env) -> Path:
    path = env.tmp / "latin1.txt"
    path.write_bytes("café au lait".encode("latin-1"))
    return path


def _artifact_missing_shard(env: Env) -> Path:
    art = env.artifact_copy()
    (art / "model.safetensors").unlink()
    return art


def _artifact_reshaped_1d(env: Env, key: str) -> Path:
    art = env.artifact_copy()

    def shrink(tensors):
        tensors[key] = tensors[key][:-1].contiguous()

    _rewrite_tensors(art / "model.safetensors", shrink)
    return art



def _other_runs_work_dir(env: Env) -> list:
    """A work directory left by a run with another recipe (resume must refuse it)."""
    from mpq.engine.resume import RUN_FILE, work_dir_for

    work = work_dir_for(env.out)
    work.mkdir()
    (work / RUN_FILE).write_text(json.dumps({"recipe": "0" * 64}))
    return env.quantize(env.src)


def _byte_flipped(env: Env) -> Path:
    art = env.artifact_copy()
    data = bytearray((art / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (art / "model.safetensors").write_bytes(bytes(data))
    return art


def _tampered_artifact(env: Env) -> list:
    return ["verify", _byte_flipped(env)]


def _artifact_json_edited(env: Env, name: str, change: Callable[[dict], None]) -> Path:
    """The artifact with one of its JSON files edited (as a user's hand or a script would)."""
    art = env.artifact_copy()
    data = json.loads((art / name).read_text())
    change(data)
    (art / name).write_text(json.dumps(data, indent=2))
    return art


def _artifact_index_added(env: Env) -> Path:
    """A shard index mpq did not write, pointing at a changed copy of the tensors."""
    art = env.artifact_copy()
    keys: list[str] = []

    def double_norm(tensors):
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
        keys.extend(tensors)

    shutil.copyfile(art / "model.safetensors", art / "model-00001-of-00001.safetensors")
    _rewrite_tensors(art / "model-00001-of-00001.safetensors", double_norm)
    (art / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {key: "model-00001-of-00001.safetensors" for key in keys}}))
    return art


def _artifact_file_added(env: Env, name: str, text: str) -> Path:
    art = env.artifact_copy()
    (art / name).write_text(text)
    return art


def _artifact_manifest_deleted(env: Env, unnamed: bool = False) -> Path:
    """The manifest deleted; ``unnamed``: its name dropped from config.json too (what an
    artifact written before manifests looks like)."""
    art = env.artifact_copy()
    (art / "mpq-manifest.json").unlink()
    if unnamed:
        config = json.loads((art / "config.json").read_text())
        del config["mpq"]["manifest"]
        (art / "config.json").write_text(json.dumps(config, indent=2))
    return art


def _no_memory(env: Env) -> list:
    env.monkeypatch.setattr("mpq.analysis.estimate.available_memory", lambda device="cpu": 1 << 20)
    return env.quantize(env.src)


def _output_is_file(env: Env) -> list:
    env.write("out", "x")
    return env.quantize(env.src, "--force")


MLP_UP = "model.layers.1.mlp.up_proj.weight"


def _workdir_disk_full(env: Env) -> list:
    """safetensors' save raises its own SafetensorError when the disk fills up while block 1 is
    written into the work directory (block 0 is finished and kept)."""
    disk_full_at_block(env.monkeypatch, 1)
    return env.quantize(env.src)


def _corrupt_tokenizer(env: Env) -> Path:
    model = env.model_copy()
    data = json.loads((model / "tokenizer.json").read_text())
    data["model"]["type"] = "NoSuchModel"  # valid JSON the tokenizers library cannot build
    (model / "tokenizer.json").write_text(json.dumps(data))
    return model


def _changed_tensor(env: Env, change: Callable[[dict], None]) -> Path:
    model = env.model_copy()
    _rewrite_tensors(model / "model.safetensors", change)
    return model


def _other_vocab(env: Env) -> Path:
    import transformers

    from tests.helpers import write_tokenizer
    from tests.tiny_models import model_from_config

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, num_hidden_layers=2)
    model_from_config(config).save_pretrained(env.tmp / "vocab128")
    write_tokenizer(env.tmp / "vocab128")
    return env.tmp / "vocab128"


def _nan_scale_artifact(env: Env) -> Path:
    art = env.artifact_copy()

    def poison(tensors):
        tensors["model.layers.0.mlp.down_proj.scale"][0, 0] = float("nan")

    _rewrite_tensors(art / "model.safetensors", poison)
    return art


def _locked_output(env: Env) -> list:
    """Another live run holds OUT's lock (an flock on .out.mpq-lock, pid inside)."""
    import fcntl

    handle = open(env.tmp / ".out.mpq-lock", "a+", encoding="utf-8")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("4242")  # the holder's pid, as a run writes it (fixed: a stable doc)
    handle.flush()
    env.monkeypatch.setattr(f"{__name__}._held_lock", handle, raising=False)  # closed afterwards
    return env.quantize(env.src)


def _index_outside(env: Env) -> Path:
    model = env.model_copy()
    shutil.copy(model / "model.safetensors", env.tmp / "outside.safetensors")
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in names}}))
    return model


def _changed_during_run(env: Env) -> list:
    """The model's weights are replaced (block 1 scaled) once block 0 is saved."""
    from mpq.engine.resume import Checkpoint

    model = env.model_copy()
    save_block = Checkpoint.save_block

    def replace_weights_after_block_0(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        if index == 0:
            def scale(tensors):
                tensors["model.layers.1.mlp.up_proj.weight"].mul_(1.5)
            _rewrite_tensors(model / "model.safetensors", scale)

    env.monkeypatch.setattr(Checkpoint, "save_block", replace_weights_after_block_0)
    return env.quantize(model)


def _tampered_work_dir(env: Env) -> list:
    """A run stopped after block 0, whose saved block file was then edited."""
    from mpq.engine.resume import Checkpoint, work_dir_for
    from mpq.quantize import quantize

    class Stop(Exception):
        pass

    def stop_after_block_0(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        raise Stop

    save_block = Checkpoint.save_block
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "save_block", stop_after_block_0)
        with pytest.raises(Stop):
            quantize(env.src, "w4a16", env.out)
    block = Checkpoint(work_dir_for(env.out), {}).block_file(0)
    data = bytearray(block.read_bytes())
    data[-3] ^= 0x01  # one bit of a saved tensor
    block.write_bytes(bytes(data))
    return env.quantize(env.src)


def _recipe_in_output(env: Env) -> list:
    recipe = env.recipe("rules:\n  - targets: Linear\n    weights: {group_size: 32}\n",
                        name="recipes/r.yaml")
    return ["quantize", env.src, "-r", recipe, "-o", recipe.parent, "--force"]


EMBEDDING_INT8 = ("  - targets: [Embedding]\n"
                  "    weights: {format: int, bits: 8, granularity: channel}\n")
BODY_INT4 = "  - targets: [Linear]\n    weights: {bits: 4, group_size: 32}\n"


def _embedding_recipe(env: Env, algorithm: str = "rtn") -> Path:
    """A recipe quantizing the input embedding int8 per row (with ``algorithm``) and the
    linears int4 RTN."""
    return env.recipe(f"rules:\n{EMBEDDING_INT8}    algorithm: {algorithm}\n"
                      f"{BODY_INT4}    algorithm: rtn\n")


def _embedding_artifact(env: Env) -> Path:
    """The tiny Llama quantized with its input embedding int8 per row (native format)."""
    from mpq.quantize import quantize

    quantize(env.src, str(_embedding_recipe(env)), env.tmp / "emb")
    return env.tmp / "emb"


def _compressed_tensors_model(env: Env) -> Path:
    """A compressed-tensors checkpoint as another tool writes it (no mpq record)."""
    from mpq.checkpoint.convert import convert

    convert(env.art, env.tmp / "ct", "compressed-tensors")
    config = json.loads((env.tmp / "ct" / "config.json").read_text())
    config.pop("mpq", None)
    (env.tmp / "ct" / "config.json").write_text(json.dumps(config))
    return env.tmp / "ct"


# --- the catalogue --------------------------------------------------------------------------------

R_UNKNOWN_KEY = "rules:\n  - targets: Linear\n    weights: {bitz: 4}\n"
R_WRONG_TYPE = "rules:\n  - targets: Linear\n    weights: {bits: four}\n"
R_KV_ONLY = "kv_cache: {}\nrules:\n  - {{targets: Linear, skip: true}}\n"  # .format(kv mapping)

def _olmo2(env: Env) -> Path:
    """A tiny OLMo 2 (post-norms only) in the case's folder."""
    save_tiny_model("olmo2", env.tmp / "olmo2")
    return env.tmp / "olmo2"


def _moe_model(env: Env) -> Path:
    """A tiny Qwen3-MoE (fused 3-D expert tensors) in the case's folder."""
    save_tiny_model("qwen3_moe", env.tmp / "moe")
    return env.tmp / "moe"


def _bos_model(env: Env) -> Path:
    """A tiny Llama whose tokenizer adds a BOS token (tests.helpers.bos_tokenizer)."""
    from tests.helpers import bos_tokenizer

    save_tiny_model("llama", env.tmp / "bos")
    bos_tokenizer().save_pretrained(env.tmp / "bos")
    return env.tmp / "bos"


def _huge_norm(env: Env) -> Path:
    """The tiny Llama with one norm weight of 70000, beyond fp16's largest value 65504."""
    model = env.model_copy()

    def enlarge(tensors):
        tensors["model.layers.1.post_attention_layernorm.weight"][5] = 70000.0

    _rewrite_tensors(model / "model.safetensors", enlarge)
    return model


def _bpe_model(env: Env, arch: str = "llama") -> Path:
    """A tiny model of ``arch`` with a byte-level BPE tokenizer (tests.helpers.bpe_tokenizer),
    which format 'gguf' can write."""
    from tests.helpers import bpe_tokenizer

    save_tiny_model(arch, env.tmp / arch)
    bpe_tokenizer().save_pretrained(env.tmp / arch)
    return env.tmp / arch


R_GGUF_Q4_0 = "rules:\n  - targets: Linear\n    weights: {format: q4_0}\n"


def _gemma_model(env: Env, arch: str = "gemma2", **overrides) -> Path:
    """A tiny Gemma-family model (its config with ``overrides``) with the SentencePiece-style
    tokenizer (tests.helpers.spm_tokenizer)."""
    from tests.helpers import gemma_dir

    return gemma_dir(env.tmp / arch, arch, **overrides)


def _no_byte_fallback(env: Env) -> Path:
    """The tiny Gemma 2 (written the way llama.cpp assumes) whose SentencePiece-style tokenizer
    has lost byte_fallback."""
    model = _gemma_model(env, query_pre_attn_scalar=16)
    path = model / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["model"]["byte_fallback"] = False
    path.write_text(json.dumps(data), encoding="utf-8")
    return model


def _static_artifact(env: Env) -> Path:
    """The tiny Llama quantized with static int8 input scales and an FP8 KV cache."""
    from mpq.calibration import CalibrationOptions
    from mpq.config.recipe import parse_recipe
    from mpq.engine.spec import RunOptions
    from mpq.quantize import quantize
    from tests.helpers import LETTERS, STATIC_RECIPE

    calib = env.write("letters.txt", LETTERS)
    quantize(env.src, parse_recipe(STATIC_RECIPE, "w8a8-static"), env.tmp / "static",
             RunOptions(calibration=CalibrationOptions(source=str(calib), num_samples=2,
                                                       seq_len=32)))
    return env.tmp / "static"


def _drift(env: Env, *extra) -> list:
    return ["drift", _static_artifact(env), "--data", env.write("t.txt", "ab " * 200),
            "--num-samples", "1", "--seq-len", "16", "--decode-tokens", "1", *extra]


CASES: list[Case] = [
    # the source model
    Case("model-missing", "model path does not exist",
         lambda e: e.quantize(e.tmp / "nope"), ModelError, ("{tmp}/nope", "does not exist")),
    Case("model-is-file", "model path is a file, not a folder",
         lambda e: e.quantize(e.write("model.safetensors", "x")), ModelError,
         ("{tmp}/model.safetensors", "not a directory")),
    Case("model-no-config", "folder without config.json",
         lambda e: e.quantize(e.write("empty/README.md", "hi").parent), ModelError,
         ("{tmp}/empty", "no config.json")),
    Case("model-config-not-json", "config.json is not valid JSON",
         lambda e: e.quantize(_edited_config(e, text="{model_type: llama")), ModelError,
         ("{tmp}/bad/config.json", "line 1")),
    Case("model-config-not-object", "config.json holds a JSON list",
         lambda e: e.quantize(_edited_config(e, text="[]")), ModelError,
         ("{tmp}/bad/config.json", "not an object")),
    Case("model-no-weights", "config.json but no *.safetensors",
         lambda e: e.quantize(e.write("noweights/config.json",
                                      (e.src / "config.json").read_text()).parent),
         ModelError, ("{tmp}/noweights", "no weight files")),
    Case("model-pickled-only", "only pytorch_model.bin (pickle), which mpq never loads",
         lambda e: e.quantize(_pickled_only(e)), ModelError,
         ("{tmp}/pickled", "pytorch_model.bin", "never unpickles")),
    Case("model-truncated-safetensors", "model.safetensors cut in half",
         lambda e: e.quantize(_truncated(e)), ModelError, ("{tmp}/bad", "corrupt")),
    Case("model-corrupt-header", "garbage bytes in the safetensors header",
         lambda e: e.quantize(_garbage_header(e)), ModelError, ("{tmp}/bad", "corrupt")),
    Case("model-nan-weights", "a NaN in a weight",
         lambda e: e.quantize(_poisoned(e, float("nan"))),
         ModelError, ("{tmp}/bad: tensor 'model.layers.1.mlp.up_proj.weight'", "NaN or Inf")),
    Case("model-inf-weights", "an Inf in a weight",
         lambda e: e.quantize(_poisoned(e, float("inf"))),
         ModelError, ("{tmp}/bad: tensor 'model.layers.1.mlp.up_proj.weight'", "NaN or Inf")),
    Case("model-missing-tensor", "a weight the architecture needs is not in the files "
         "(transformers would initialise it at random)",
         lambda e: e.quantize(_missing_tensor(e)), ModelError,
         ("{tmp}/bad", "missing from the weight files", "model.layers.1.mlp.down_proj.weight")),
    Case("model-extra-declared-layer", "config.json declares one more layer than the weights hold",
         lambda e: e.quantize(_edited_config(
             e, lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1))), ModelError,
         ("{tmp}/bad", "missing from the weight files", "model.layers.2.")),
    Case("model-is-an-artifact", "an mpq artifact passed as the model to quantize",
         lambda e: e.quantize(e.art), ModelError, ("{art}", "already-quantized checkpoint (mpq)")),
    Case("model-is-quantized", "a checkpoint with a quantization_config (e.g. GPTQ) as the model",
         lambda e: e.quantize(_edited_config(e, lambda c: c.update(
             quantization_config={"quant_method": "gptq", "bits": 4}))), ModelError,
         ("{tmp}/bad", "already-quantized checkpoint (gptq)")),
    Case("device-meta", "--device meta (or mps, xla: devices mpq does not run on)",
         lambda e: e.quantize(e.src, "--device", "meta"), ModelError,
         ("device 'meta' is not supported", "cpu or cuda")),
    Case("calib-longer-than-positions", "--seq-len beyond a learned position table (GPT-2's "
         "n_positions)", lambda e: e.quantize(_gpt2(e), "--calib", _calib(
             e, "c.txt", "hello world " * 2000), "--seq-len", 256, recipe="w4a16-gptq"),
         CalibrationError, ("--seq-len 256", "128 positions")),
    Case("model-unknown-arch", "config.json model_type unknown to transformers",
         lambda e: e.quantize(_edited_config(e, lambda c: c.update(model_type="no-such-arch"))),
         ModelError, ("{tmp}/bad/config.json", "model_type 'no-such-arch'")),
    Case("model-not-causal-lm", "a model_type transformers knows, but not as a causal LM (ViT)",
         lambda e: e.quantize(_edited_config(e, text=json.dumps(
             {"model_type": "vit", "architectures": ["ViTModel"]}))), ModelError,
         ("{tmp}/bad", "causal LM")),
    Case("device-cuda-unavailable", "--device cuda on a machine without CUDA",
         lambda e: e.quantize(e.src, "--device", "cuda"), ModelError,
         ("'cuda'", "CUDA is not available"), skip=_cuda_present),
    Case("device-unknown", "--device names no torch device",
         lambda e: e.quantize(e.src, "--device", "gpu0"), ModelError, ("gpu0", "cuda:N")),
    # the recipe
    Case("recipe-missing", "recipe file does not exist",
         lambda e: e.quantize(e.src, recipe=e.tmp / "missing.yaml"), RecipeError,
         ("{tmp}/missing.yaml", "does not exist")),
    Case("recipe-yaml-syntax", "recipe is not valid YAML",
         lambda e: e.quantize(e.src, recipe=e.recipe("rules: [\n  - {targets: Linear\n")),
         RecipeError, ("{tmp}/r.yaml:", "invalid YAML")),
    Case("recipe-unknown-key", "misspelt key in a rule's weights",
         lambda e: e.quantize(e.src, recipe=e.recipe(R_UNKNOWN_KEY)), RecipeError,
         ("{tmp}/r.yaml: rules[0].weights.bitz", "did you mean 'bits'")),
    Case("recipe-wrong-type", "bits: four (a string where an integer is needed)",
         lambda e: e.quantize(e.src, recipe=e.recipe(R_WRONG_TYPE)), RecipeError,
         ("{tmp}/r.yaml: rules[0].weights.bits", "expected an integer")),
    Case("recipe-bad-version", "mpq_recipe: 2",
         lambda e: e.quantize(e.src, recipe=e.write("r.yaml", "mpq_recipe: 2\nrules: []\n")),
         RecipeError, ("{tmp}/r.yaml: mpq_recipe", "version 2")),
    Case("recipe-bad-regex", "a target regex that does not compile",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "rules:\n  - targets: 're:.*mlp\\.(down'\n")), RecipeError,
         ("{tmp}/r.yaml: rules[0].targets", "invalid regex")),
    Case("recipe-backtracking-regex", "a target regex with catastrophic backtracking "
         "(Python's re would hang on every layer name)",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "rules:\n  - targets: 're:(.*.*)*xyz'\n  - targets: Linear\n")), RecipeError,
         ("{tmp}/r.yaml: rules[0] targets", "match no layer")),
    Case("recipe-rule-matches-nothing", "a rule whose targets match no layer",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "rules:\n  - targets: 're:.*mlp\\.down_projection'\n  - targets: Linear\n")),
         RecipeError, ("{tmp}/r.yaml: rules[0]", "match no layer")),
    Case("recipe-bits-out-of-range", "int bits: 9",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "rules:\n  - targets: Linear\n    weights: {bits: 9}\n")), RecipeError,
         ("{tmp}/r.yaml: rules[0].weights", "2..8")),
    Case("recipe-group-size-indivisible", "group_size 48 does not divide the input dimension 64",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "rules:\n  - targets: Linear\n    weights: {group_size: 48}\n")), RecipeError,
         ("{tmp}/r.yaml", "rules[0]", "48")),
    Case("recipe-unknown-preset", "-r names neither a file nor a preset",
         lambda e: e.quantize(e.src, recipe="w4a17"), RecipeError, ("'w4a17'", "did you mean")),
    Case("recipe-unknown-algorithm", "algorithm: gptqq",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "rules:\n  - targets: Linear\n    algorithm: gptqq\n")), RecipeError,
         ("{tmp}/r.yaml: rules[0].algorithm", "did you mean 'gptq'")),
    Case("recipe-unknown-transform", "transforms: [{type: smoothquant2}]",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "rules:\n  - targets: Linear\n    weights: {granularity: channel}\n"
             "transforms:\n  - {type: smoothquant2}\n")),
         RecipeError, ("{tmp}/r.yaml: transforms[0]", "smoothquant2")),
    # calibration data
    Case("calib-missing", "--calib file does not exist",
         lambda e: e.quantize(e.src, "--calib", e.tmp / "nope.txt"), CalibrationError,
         ("{tmp}/nope.txt", "does not exist")),
    Case("calib-empty", "--calib file is empty",
         lambda e: e.quantize(e.src, "--calib", _calib(e, "empty.txt", "")), CalibrationError,
         ("{tmp}/empty.txt", "no text")),
    Case("calib-too-short", "5 tokens of calibration text with --seq-len 512",
         lambda e: e.quantize(e.src, "--calib", _calib(e, "short.txt", "hello"), "--seq-len", 512),
         CalibrationError, ("{tmp}/short.txt", "seq_len=512")),
    Case("calib-jsonl-no-field", "jsonl records without the text field",
         lambda e: e.quantize(e.src, "--calib", _calib(e, "c.jsonl", '{"content": "hi"}\n')),
         CalibrationError, ("{tmp}/c.jsonl:1", "no field 'text'")),
    Case("calib-jsonl-invalid", "a jsonl line that is not JSON",
         lambda e: e.quantize(e.src, "--calib", _calib(e, "c.jsonl", '{"text": "a"}\n{oops\n')),
         CalibrationError, ("{tmp}/c.jsonl:2", "not valid JSON")),
    Case("calib-not-utf8", "calibration text that is not UTF-8",
         lambda e: e.quantize(e.src, "--calib", _latin1(e)), CalibrationError,
         ("{tmp}/latin1.txt", "byte offset 3")),
    Case("calib-unknown-suffix", "calibration file with an unknown suffix (.csv)",
         lambda e: e.quantize(e.src, "--calib", _calib(e, "c.csv", "text\nhello\n")),
         CalibrationError, ("{tmp}/c.csv", "'.csv'")),
    Case("calib-hub-offline", "hf:NAME dataset while HF_HUB_OFFLINE/HF_DATASETS_OFFLINE are set",
         _offline, CalibrationError, ("wikitext", "offline")),
    Case("calib-document-too-short", "--calib-mode document, every document under 16 tokens",
         lambda e: e.quantize(e.src, "--calib", _calib(e, "docs.txt", "a b\n\nc d\n"),
                              "--calib-mode", "document"), CalibrationError,
         ("{tmp}/docs.txt", "16 tokens")),
    Case("calib-required", "a GPTQ recipe without --calib",
         lambda e: e.quantize(e.src, recipe="w4a16-gptq"), CalibrationError,
         ("needs calibration", "--calib")),
    # the output
    Case("output-exists", "the output folder exists, no --force", _existing_output, OutputError,
         ("{tmp}/out", "--force")),
    Case("output-is-file", "the output is an existing file, with --force",
         _output_is_file,
         OutputError, ("{tmp}/out", "not a directory")),
    Case("output-parent-is-file", "the output's parent is a regular file (not writable)",
         lambda e: ["quantize", e.src, "-r", "w4a16", "-o", e.write("afile", "x") / "out"],
         OutputError, ("{tmp}/afile", "afile")),
    Case("output-is-the-model", "-o is the model folder itself, with --force",
         lambda e: ["quantize", e.src, "-r", "w4a16", "-o", e.src, "--force"], OutputError,
         ("{src}", "is the input", "would destroy it")),
    Case("output-contains-the-model", "-o is a folder holding the model, with --force",
         lambda e: ["quantize", e.src, "-r", "w4a16", "-o", e.src.parent, "--force"],
         OutputError, ("contains the input '{src}'",)),
    Case("output-inside-the-model", "-o lies inside the model folder",
         lambda e: ["quantize", e.model_copy("m"), "-r", "w4a16", "-o", e.tmp / "m" / "out"],
         OutputError, ("{tmp}/m/out", "lies inside the input folder")),
    Case("output-contains-the-calibration", "-o is the folder holding the calibration file, "
         "with --force",
         lambda e: ["quantize", e.src, "-r", "w4a16-gptq", "--calib",
                    e.write("data/calib.txt", "hello world " * 400), "-o", e.tmp / "data",
                    "--force"], OutputError, ("{tmp}/data", "contains the input")),
    Case("convert-output-is-the-artifact", "mpq convert with -o the source artifact, with --force",
         lambda e: ["convert", e.art, "-o", e.art, "--format", "compressed-tensors", "--force"],
         OutputError, ("{art}", "is the input")),
    Case("output-disk-full", "the disk fills up while the tensors are written (simulated ENOSPC)",
         _full_disk, OutputError, ("{tmp}/out", "free disk space"),
         leaves=("out.mpq-work",)),
    # the output format
    Case("format-unknown", "--format names no writer",
         lambda e: e.quantize(e.src, "--format", "onnx"), FormatError,
         ("'onnx'", "known: ")),
    Case("format-cannot-express", "--format gptq with an nf4 recipe",
         lambda e: e.quantize(e.src, "--format", "gptq", recipe="nf4"), FormatError,
         ("format 'gptq'", "nf4")),
    # artifacts (mpq inspect / eval / convert)
    Case("artifact-missing", "mpq inspect on a path that does not exist",
         lambda e: ["inspect", e.tmp / "nope"], ArtifactError, ("{tmp}/nope", "does not exist")),
    Case("artifact-not-mpq", "mpq inspect on a plain model folder",
         lambda e: ["inspect", e.src], ArtifactError, ("{src}", "not an mpq artifact")),
    Case("artifact-unknown-major-version", "format version 2.0 in the safetensors header",
         lambda e: ["inspect", _artifact_version(e, "2.0")], ArtifactError,
         ("{tmp}/art/model.safetensors", "'2.0'")),
    Case("artifact-missing-shard", "the artifact's model.safetensors was deleted",
         lambda e: ["inspect", _artifact_missing_shard(e)], ArtifactError,
         ("{tmp}/art", "model.safetensors")),
    Case("artifact-missing-tensor", "mpq convert --no-verify of an artifact lacking a layer's "
         "scale tensor (the reader's own check, past the hash check)",
         lambda e: ["convert", _artifact_without(e, "model.layers.0.mlp.up_proj.scale"),
                    "-o", e.out, "--format", "compressed-tensors", "--no-verify"],
         ArtifactError, ("{tmp}/art: missing tensor 'model.layers.0.mlp.up_proj.scale'",)),
    Case("artifact-shape-mismatch", "mpq eval of an artifact whose qweight lost a column",
         lambda e: _eval_args(e, _artifact_reshaped(e, "model.layers.0.self_attn.q_proj.qweight"),
                              "--no-verify"),
         ArtifactError, ("{tmp}/art: tensor 'model.layers.0.self_attn.q_proj.qweight'", "shape")),
    Case("artifact-tampered", "mpq verify of an artifact whose tensor file changed after writing",
         _tampered_artifact, ArtifactError, ("{tmp}/art", "model.safetensors: sha256")),
    Case("eval-gptq-without-optimum", "mpq eval of a GPTQ-format folder where transformers "
         "needs optimum, which is not installed",
         lambda e: _eval_args(e, _gptq_artifact(e)), ModelError,
         ("{tmp}/gptq", "requires optimum", "install the package it names"),
         skip=_optimum_installed),
    Case("artifact-tampered-eval", "mpq eval of an artifact with one flipped bit (mpq.load "
         "checks the recorded sha256 first)",
         lambda e: _eval_args(e, _byte_flipped(e)), ArtifactError,
         ("{tmp}/art: model.safetensors: sha256", "--no-verify")),
    Case("artifact-config-edited", "mpq verify of an artifact whose config.json was edited "
         "(rope_theta: the outputs change, the tensors do not)",
         lambda e: ["verify", _artifact_json_edited(e, "config.json", lambda c: c[
             "rope_parameters"].update(rope_theta=500.0))], ArtifactError,
         ("{tmp}/art", "first: config.json:", "recorded")),
    Case("artifact-config-edited-eval", "mpq eval of an artifact whose config.json was edited "
         "(rms_norm_eps; mpq.load checks every recorded file first)",
         lambda e: _eval_args(e, _artifact_json_edited(
             e, "config.json", lambda c: c.update(rms_norm_eps=0.5))), ArtifactError,
         ("{tmp}/art: config.json:", "recorded", "--no-verify")),
    Case("artifact-tokenizer-edited", "mpq verify of an artifact whose tokenizer.json maps a "
         "token to another id", lambda e: ["verify", _artifact_json_edited(
             e, "tokenizer.json", lambda t: t["model"]["vocab"].update({"A": 66}))],
         ArtifactError, ("{tmp}/art", "first: tokenizer.json:")),
    Case("artifact-generation-config-edited", "mpq eval of an artifact whose "
         "generation_config.json was edited",
         lambda e: _eval_args(e, _artifact_json_edited(
             e, "generation_config.json", lambda g: g.update(eos_token_id=7))), ArtifactError,
         ("{tmp}/art: generation_config.json:", "recorded")),
    Case("artifact-index-added", "mpq eval of an artifact given a model.safetensors.index.json "
         "that points at a changed copy of the tensors",
         lambda e: _eval_args(e, _artifact_index_added(e)), ArtifactError,
         ("{tmp}/art: unrecorded files", "model.safetensors.index.json",
          "a loader could read them")),
    Case("artifact-remote-code-added", "mpq verify of an artifact given a modeling_*.py "
         "(remote code) after it was written",
         lambda e: ["verify", _artifact_file_added(e, "modeling_llama.py", "import os\n")],
         ArtifactError, ("{tmp}/art", "unrecorded files: modeling_llama.py")),
    Case("artifact-added-tokens-added", "mpq eval of an artifact given an added_tokens.json",
         lambda e: _eval_args(e, _artifact_file_added(e, "added_tokens.json", '{"<x>": 7}')),
         ArtifactError, ("{tmp}/art: unrecorded files: added_tokens.json",)),
    Case("artifact-manifest-deleted", "mpq verify of an artifact whose mpq-manifest.json was "
         "deleted (config.json still names it)",
         lambda e: ["verify", _artifact_manifest_deleted(e)], ArtifactError,
         ("{tmp}/art", "mpq-manifest.json: missing")),
    Case("artifact-without-manifest", "mpq eval of an artifact with no manifest and none named "
         "in config.json (written before mpq recorded every file)",
         lambda e: _eval_args(e, _artifact_manifest_deleted(e, unnamed=True)), ArtifactError,
         ("{tmp}/art: manifest: config.json names no manifest", "mpq convert")),
    Case("convert-artifact-edited", "mpq convert of an artifact whose config.json was edited "
         "(convert checks its source, so the change is not laundered into fresh records)",
         lambda e: ["convert", _artifact_json_edited(
             e, "config.json", lambda c: c.update(hidden_act="relu")), "-o", e.out,
                    "--format", "compressed-tensors"], ArtifactError,
         ("{tmp}/art: config.json:", "recorded", "--no-verify")),
    # runs: resume, resources
    Case("resume-other-run", "a work directory beside the output left by a run with other inputs",
         _other_runs_work_dir, ResumeError, ("{tmp}/out.mpq-work", "recipe changed",
                                             "--no-resume")),
    Case("resume-nothing", "--resume but no work directory to resume from",
         lambda e: e.quantize(e.src, "--resume"), ResumeError, ("nothing to resume",)),
    Case("memory-insufficient", "the estimated peak memory exceeds the available memory",
         _no_memory, ResourceError, ("GiB of memory", "available", "--num-samples")),
    Case("artifact-dense-shape-mismatch", "mpq eval of an artifact with a wrong-size norm weight",
         lambda e: _eval_args(e, _artifact_reshaped_1d(e, "model.norm.weight"), "--no-verify"),
         ArtifactError, ("{tmp}/art", "model.norm.weight")),
    # what a plan leaves unquantized (mpq.models.coverage)
    Case("strict-moe-experts", "mpq quantize --strict of a Qwen3-MoE whose fused 3-D expert "
         "tensors a rule skips (most of its weight bytes would stay 16-bit)",
         lambda e: e.quantize(_moe_model(e), "--strict", recipe=e.recipe(
             "rules:\n  - targets: ['re:.*experts.*']\n    skip: true\n"
             "  - targets: [Linear]\n    weights: {bits: 4, group_size: 64}\n")), RecipeError,
         ("of the weight bytes would stay unquantized", "--strict", "skipped",
          "narrow the skip by rule 0")),
    Case("strict-max-unquantized", "mpq plan --max-unquantized 0.3 with a recipe that quantizes "
         "only the MLPs",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults: {algorithm: rtn}\nrules:\n  - targets: ['re:.*mlp.*']\n    weights: "
             "{format: int, bits: 8, symmetric: true, granularity: channel}\n"),
             "--max-unquantized", "0.3"], RecipeError,
         ("--max-unquantized 0.3", "no-rule", "add a rule that quantizes")),
    # issue 18: tracebacks that became one line, and situations fixed before without a case
    Case("workdir-disk-full", "the disk fills up while a finished block is saved in the work "
         "directory (safetensors raises its own error; simulated ENOSPC)",
         _workdir_disk_full, OutputError,
         ("{tmp}/out.mpq-work", "block 1", "No space left on device", "free disk space"),
         leaves=("out.mpq-work",)),
    Case("tokenizer-corrupt", "tokenizer.json is valid JSON the tokenizers library cannot build",
         lambda e: e.quantize(_corrupt_tokenizer(e), "--calib", _calib(
             e, "c.txt", "hello world " * 400), recipe="w4a16-gptq"), ModelError,
         ("{tmp}/bad/tokenizer.json", "not a valid tokenizer", "restore tokenizer.json")),
    Case("tokenizer-corrupt-no-calib", "a corrupt tokenizer.json in a run without calibration "
         "(no tokenizer needed, but the file would travel into the artifact)",
         lambda e: e.quantize(_corrupt_tokenizer(e)), ModelError,
         ("{tmp}/bad/tokenizer.json", "not a valid tokenizer", "restore tokenizer.json")),
    Case("weight-integer-dtype", "a Linear weight stored as int8 in the safetensors file",
         lambda e: e.quantize(_changed_tensor(e, lambda t: t.update(
             {MLP_UP: (t[MLP_UP] * 100).to(torch.int8)}))), ModelError,
         ("{tmp}/bad: tensor 'model.layers.1.mlp.up_proj.weight'", "stored as I8")),
    Case("eval-weight-integer-dtype", "mpq eval of a model folder with a weight stored as int32 "
         "(transformers would cast the codes to float)",
         lambda e: _eval_args(e, _changed_tensor(e, lambda t: t.update(
             {MLP_UP: (t[MLP_UP] * 100).to(torch.int32)}))), ModelError,
         ("{tmp}/bad: tensor 'model.layers.1.mlp.up_proj.weight'", "stored as I32")),
    Case("weight-wrong-shape", "a weight of another shape than config.json gives it "
         "(transposed)",
         lambda e: e.quantize(_changed_tensor(e, lambda t: t.update(
             {MLP_UP: t[MLP_UP].t().contiguous()}))), ModelError,
         ("{tmp}/bad: tensor 'model.layers.1.mlp.up_proj.weight'", "shape (64, 128)",
          "expects (128, 64)")),
    Case("model-unexpected-tensor", "the weight files hold a layer config.json does not declare "
         "(config.json edited to fewer layers)",
         lambda e: e.quantize(_edited_config(e, lambda c: c.update(num_hidden_layers=1))),
         ModelError, ("{tmp}/bad", "not part of config.json's architecture",
                      "model.layers.1.")),
    Case("model-foreign-tensor", "an extra tensor the architecture does not use",
         lambda e: e.quantize(_changed_tensor(e, lambda t: t.update(
             {"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}))), ModelError,
         ("{tmp}/bad", "model.layers.0.mlp.extra_proj.weight")),
    Case("model-index-outside", "model.safetensors.index.json names a shard outside the model "
         "folder (../outside.safetensors)",
         lambda e: e.quantize(_index_outside(e)), ModelError,
         ("{tmp}/bad/model.safetensors.index.json", "outside the model folder",
          "../outside.safetensors")),
    Case("model-changed-during-run", "model.safetensors is replaced while the run reads it "
         "(after block 0; the case itself rewrites its model copy, so that file is exempt from "
         "the unchanged-input check); the work directory is discarded",
         _changed_during_run, ModelError,
         ("{tmp}/bad", "changed while the run read them", "model.safetensors"),
         rewrites=("bad/model.safetensors",)),
    Case("model-is-compressed-tensors", "a compressed-tensors checkpoint (written by another "
         "tool) as the model to quantize",
         lambda e: e.quantize(_compressed_tensors_model(e)), ModelError,
         ("{tmp}/ct", "already-quantized checkpoint (compressed-tensors)")),
    Case("device-mps", "--device mps (Apple GPUs: mpq runs on cpu or cuda)",
         lambda e: e.quantize(e.src, "--device", "mps"), ModelError,
         ("device 'mps' is not supported", "cpu or cuda")),
    Case("device-xla", "--device xla (TPUs: mpq runs on cpu or cuda)",
         lambda e: e.quantize(e.src, "--device", "xla"), ModelError,
         ("device 'xla' is not supported", "cpu or cuda")),
    Case("output-locked", "another live run holds the lock of the same output",
         _locked_output, OutputError, ("another mpq run (pid 4242)", "is writing '{tmp}/out'")),
    Case("output-contains-the-recipe", "-o is the folder holding the recipe file, with --force",
         _recipe_in_output, OutputError,
         ("{tmp}/recipes", "contains the input '{tmp}/recipes/r.yaml'")),
    Case("convert-output-inside-artifact", "mpq convert with -o inside the source artifact",
         lambda e: ["convert", e.art, "-o", e.art / "ct", "--format", "compressed-tensors"],
         OutputError, ("{art}/ct", "lies inside the input folder '{art}'")),
    Case("resume-block-tampered", "the work directory of a stopped run whose saved block was "
         "edited afterwards", _tampered_work_dir, ResumeError,
         ("{tmp}/out.mpq-work", "block 0", "not the file that was saved", "--no-resume")),
    Case("eval-window-beyond-positions", "mpq eval --window beyond a learned position table "
         "(GPT-2's n_positions)",
         lambda e: ["eval", _gpt2(e), "--data", e.write("eval.txt", "hello world " * 100),
                    "--window", 256], OptionError,
         ("--window 256", "128 positions", "--window 128 or less")),
    Case("eval-reference-other-vocab", "mpq eval --reference with a model of another "
         "vocabulary size (text with token ids beyond it)",
         lambda e: ["eval", e.art, "--data", e.write("u.txt", "café crème brûlée " * 20),
                    "--window", 32, "--reference", _other_vocab(e)], ModelError,
         ("--reference '{tmp}/vocab128'", "128 tokens", "'{art}' one of 256")),
    Case("gate-nan-ppl", "mpq eval --max-ppl-delta on an artifact that evaluates to NaN (a NaN "
         "scale, --no-verify)",
         lambda e: _eval_args(e, _nan_scale_artifact(e), "--no-verify", "--reference", e.src,
                              "--max-ppl-delta", "1000%"), EvalGateError,
         ("gate failed: ppl nan", "not finite", "mpq verify")),
    Case("gate-nan-kl", "mpq eval --max-kl on an artifact that evaluates to NaN, with --json",
         lambda e: _eval_args(e, _nan_scale_artifact(e), "--no-verify", "--reference", e.src,
                              "--max-kl", 100, "--json"), EvalGateError,
         ("gate failed: mean KL nan is not finite",)),
    # fused mixture-of-experts experts (mpq.models.experts)
    Case("moe-partial-experts", "mpq plan of a Qwen3-MoE with a rule quantizing only experts 0-3 "
         "of each fused gate_up_proj (a fused parameter is quantized whole or kept whole)",
         lambda e: ["plan", _moe_model(e), "-r", e.recipe(
             "rules:\n  - targets: ['re:.*experts\\.gate_up_proj\\.[0-3]$']\n"
             "    weights: {bits: 4, group_size: 64}\n")], RecipeError,
         ("model.layers.0.mlp.experts.gate_up_proj would be partly quantized", "expert 4 kept",
          "give every expert of")),
    Case("moe-expert-activations", "mpq quantize of a Qwen3-MoE with w8a8-fp8 (input activation "
         "quantization on fused experts, which the loaded model cannot apply)",
         lambda e: e.quantize(_moe_model(e), recipe="w8a8-fp8"), RecipeError,
         ("input activation quantization of fused MoE experts is not supported",
          "without input_activations")),
    Case("moe-compressed-tensors", "mpq quantize --format compressed-tensors of a Qwen3-MoE whose "
         "fused 3-D experts the plan quantizes (compressed-tensors holds nn.Linear modules only)",
         lambda e: e.quantize(_moe_model(e), "--format", "compressed-tensors"), FormatError,
         ("32 fused MoE expert slices of model.layers.*.mlp.experts.gate_up_proj",
          "cannot decompress", "--format mpq")),
    Case("moe-experts-section-dense", "mpq plan of the dense tiny Llama with a recipe setting "
         "experts: {min_tokens: 8} (there are no fused MoE experts to apply it to)",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "experts: {min_tokens: 8}\nrules:\n  - targets: [Linear]\n"
             "    weights: {bits: 4, group_size: 32}\n")], RecipeError,
         ("has no fused mixture-of-experts experts", "remove the experts: section")),
    # what a model family cannot do (mpq.models.families)
    Case("family-smoothquant-post-norm", "SmoothQuant without pairs on OLMo 2, whose norms all "
         "follow their sublayers: no norm feeds a linear, so there is nothing to smooth",
         lambda e: e.quantize(_olmo2(e), "--calib", _calib(e, "c.txt", "a b c " * 200),
                              recipe=e.recipe("transforms:\n  - {type: smoothquant, alpha: 0.5}\n"
                                              "rules:\n  - targets: [Linear]\n"
                                              "    weights: {bits: 8, granularity: channel}\n")),
         ModelError,
         ("smoothquant has nothing to fold", "'olmo2'", "no norm feeds a linear",
          "pairs: true")),
    Case("family-ct-conv1d", "--format compressed-tensors for GPT-2, whose Conv1D layers "
         "compressed-tensors does not quantize (transformers would read them as float)",
         lambda e: e.quantize(_gpt2(e), "--format", "compressed-tensors"), FormatError,
         ("cannot express 8 layer(s)", "transformer.h.0.attn.c_attn: a Conv1D",
          "compressed-tensors does not quantize")),
    Case("bos-eval-forced-without-bos-token", "mpq eval --bos on a model whose tokenizer has no "
         "BOS token",
         lambda e: ["eval", e.art, "--data", e.write("eval.txt", "hello world " * 100), "--bos"],
         OptionError, ("--bos", "the tokenizer of '{art}' has no BOS token", "--no-bos")),
    Case("bos-eval-stride-over-text-window", "mpq eval --stride equal to --window on a model "
         "whose tokenizer adds BOS (a window holds window - 1 text tokens: a stride of window "
         "would skip one)",
         lambda e: ["eval", _bos_model(e), "--data", e.write("eval.txt", "hello world " * 100),
                    "--window", 64, "--stride", 64], CalibrationError,
         ("stride must be an integer in 1..window - 1 = 63", "holds a BOS", "got 64")),
    # int8/int4 KV caches (mpq.config.kv_cache)
    Case("kv-int-group-size", "kv_cache int4 per group of 6 channels on the tiny Llama, whose "
         "head_dim 16 is not a multiple of 6",
         lambda e: ["plan", e.src, "-r", e.recipe(R_KV_ONLY.format(
             "{format: int4, granularity: group, group_size: 6}"))], SchemeError,
         ("kv_cache: group_size 6 does not divide the model's head_dim 16",
          "pick a divisor")),
    Case("kv-int-tensor-granularity", "kv_cache int4 with granularity tensor (an fp8-only "
         "setting)",
         lambda e: ["plan", e.src, "-r", e.recipe(R_KV_ONLY.format(
             "{format: int4, granularity: tensor}"))], RecipeError,
         ("kv_cache: granularity 'tensor' does not apply to int4; it is for fp8_e4m3",
          "use one of head, group")),
    Case("kv-fp8-dynamic", "kv_cache fp8_e4m3 with dynamic: true (fp8 KV scales are static)",
         lambda e: ["plan", e.src, "-r", e.recipe(R_KV_ONLY.format(
             "{format: fp8_e4m3, dynamic: true}"))], RecipeError,
         ("fp8_e4m3 KV scales are static", "format: int8")),
    Case("kv-int-policy-disagrees", "kv_cache int8 beside precision_policy {kv_cache: bf16}",
         lambda e: ["plan", e.src, "-r", e.recipe(R_KV_ONLY.format("{format: int8}")
                                                  + "precision_policy: {kv_cache: bf16}\n")],
         RecipeError, ("precision_policy.kv_cache: 'bf16' disagrees with kv_cache.format 'int8'",
                       "drop precision_policy.kv_cache")),
    Case("kv-int-static-no-calib", "a static int8 KV cache (calibrated ranges) without --calib",
         lambda e: e.quantize(e.src, recipe=e.recipe(R_KV_ONLY.format("{format: int8}"))),
         CalibrationError, ("kv_cache quantization needs calibration data", "dynamic: true")),
    Case("kv-int-compressed-tensors", "--format compressed-tensors with a dynamic int8 KV cache "
         "(no compressed-tensors loader runs asymmetric int KV)",
         lambda e: e.quantize(e.src, "--format", "compressed-tensors", recipe=e.recipe(
             R_KV_ONLY.format("{format: int8, dynamic: true}"))), FormatError,
         ("kv_cache: int8 asymmetric KV cache", "native format (mpq) only")),
    # compact storage (mpq.checkpoint.storage)
    Case("recipe-storage-dtype-unknown", "recipe with storage_dtype: float16 (the names are "
         "source, fp32, bf16, fp16)",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "storage_dtype: float16\nrules:\n  - targets: [Linear]\n")), RecipeError,
         ("{tmp}/r.yaml: storage_dtype", "unknown storage dtype 'float16'", "fp16")),
    Case("storage-dtype-fp16-overflow", "storage_dtype: fp16 for a model with a norm weight of "
         "70000, beyond fp16's largest value (refused when the artifact is written; the work "
         "directory stays so that a rerun with bf16 resumes it)",
         lambda e: e.quantize(_huge_norm(e), recipe=e.recipe(
             "storage_dtype: fp16\nrules:\n  - targets: [Linear]\n"
             "    weights: {bits: 4, group_size: 32}\n")), RecipeError,
         ("storage_dtype fp16", "'model.layers.1.post_attention_layernorm.weight' holds 70000",
          "65504", "storage_dtype: bf16"),
         leaves=("out.mpq-work",)),
    # the input embedding as a quantization target (mpq.engine.spec.check_embedding_schemes)
    Case("embedding-gptq", "a recipe solving the input embedding with gptq (a table lookup has "
         "no activation statistics)",
         lambda e: e.quantize(e.src, recipe=_embedding_recipe(e, "gptq")), RecipeError,
         ("rules[0] (model.embed_tokens)", "algorithm 'gptq' needs activation statistics",
          "use algorithm: rtn")),
    Case("embedding-regex-only", "a rule whose only target is a regex for the input embedding "
         "(regexes never select it: its exact name or the class Embedding do)",
         lambda e: ["plan", e.src, "-r", e.recipe("rules:\n  - targets: ['re:model\\.embed.*']\n"
                                                  "    weights: {bits: 8, granularity: channel}\n"
                                                  + BODY_INT4)], RecipeError,
         ("rules[0] targets", "match no layer", "the class target Embedding")),
    Case("embedding-nf4", "nf4 weights for the input embedding (int per row or group, fp8_e4m3 "
         "per row only)",
         lambda e: ["plan", e.src, "-r", e.recipe("rules:\n  - targets: [Embedding]\n"
                                                  "    weights: {format: nf4}\n" + BODY_INT4)],
         RecipeError, ("nf4 weights per group are not supported for an input embedding",)),
    Case("embedding-compressed-tensors", "mpq quantize --format compressed-tensors with the "
         "input embedding quantized (mpq does not write it in that format)",
         lambda e: e.quantize(e.src, "--format", "compressed-tensors",
                              recipe=_embedding_recipe(e)), FormatError,
         ("model.embed_tokens: a quantized input embedding", "--format mpq")),
    Case("embedding-gptq-format", "mpq quantize --format gptq with the input embedding "
         "quantized (GPTQ v1 stores quantized Linear layers only)",
         lambda e: e.quantize(e.src, "--format", "gptq", recipe=_embedding_recipe(e)),
         FormatError, ("model.embed_tokens: a quantized input embedding",
                       "GPTQ v1 stores quantized Linear layers only")),
    Case("embedding-convert", "mpq convert --format compressed-tensors of an artifact whose "
         "input embedding is quantized",
         lambda e: ["convert", _embedding_artifact(e), "-o", e.out, "--format",
                    "compressed-tensors"], FormatError,
         ("model.embed_tokens: a quantized input embedding", "mpq does not write one")),
    # rtn scale_search and gptq error feedback (mpq.quantizers.rtn, mpq.quantizers.gptq)
    Case("rtn-scale-search-unknown", "rtn with scale_search: hessian (none, auto, mse or activations)",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults:\n  options: {scale_search: hessian}\n" + "rules:\n" + BODY_INT4)],
         RecipeError, ("rules[0] (model.layers.0.self_attn.q_proj)",
                       "rtn scale_search must be one of none, auto, mse, activations")),
    Case("rtn-scale-search-nf4", "rtn scale_search: activations with nf4 weights (the search "
         "is for int scales and the GGUF block types)",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults:\n  options: {scale_search: activations}\nrules:\n"
             "  - targets: [Linear]\n    weights: {format: nf4}\n")],
         RecipeError, ("rtn scale_search supports the int, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, "
                       "q5_k, q6_k, q3_k, iq4_nl formats only, not nf4",
                       "remove scale_search")),
    Case("rtn-scale-search-no-calib", "rtn scale_search: activations without --calib (the "
         "importance comes from calibration inputs)",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "defaults:\n  options: {scale_search: activations}\nrules:\n" + BODY_INT4)),
         CalibrationError, ("needs calibration statistics (input_sqmean)", "--calib")),
    Case("gptq-feedback-alpha-alone", "gptq feedback_alpha without error_feedback: true",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults:\n  algorithm: gptq\n  options: {feedback_alpha: 0.5}\nrules:\n"
             + BODY_INT4)],
         RecipeError, ("gptq feedback_alpha only applies with error_feedback: true",)),
    Case("gptq-feedback-alpha-negative", "gptq error_feedback with feedback_alpha: -1",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults:\n  algorithm: gptq\n  options: {error_feedback: true, "
             "feedback_alpha: -1.0}\nrules:\n" + BODY_INT4)],
         RecipeError, ("gptq feedback_alpha must be ≥ 0",)),
    Case("gptq-error-feedback-head", "gptq error_feedback for the output head (the float "
         "model's inputs are carried inside the decoder blocks only)",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults:\n  algorithm: gptq\n  options: {error_feedback: true}\nrules:\n"
             "  - targets: [lm_head]\n    weights: {bits: 4, group_size: 32}\n")],
         RecipeError, ("lm_head: error feedback needs the float model's inputs",
                       "give lm_head a rule without error_feedback")),
    Case("autoround-mxfp4", "algorithm autoround with mxfp4 weights (tuned rounding is "
         "implemented for the int grid only)",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "defaults: {algorithm: autoround}\nrules:\n  - targets: [Linear]\n"
             "    weights: {format: mxfp4}\n")), RecipeError,
         ("{tmp}/r.yaml: rules[0]", "autoround supports the int grid only, not mxfp4")),
    Case("autoround-head", "algorithm autoround for the output head (it tunes decoder blocks)",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "defaults: {algorithm: autoround}\nrules:\n  - targets: [lm_head]\n"
             "    weights: {bits: 4, group_size: 32}\n" + BODY_INT4)), RecipeError,
         ("{tmp}/r.yaml", "lm_head: autoround tunes decoder blocks", "algorithm: rtn or gptq")),
    Case("autoround-bad-effort", "autoround options: {effort: heavy}",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "defaults: {algorithm: autoround, options: {effort: heavy}}\nrules:\n"
             + BODY_INT4)), RecipeError,
         ("{tmp}/r.yaml: rules[0]", "effort must be one of light, default, best")),
    Case("autoround-no-calib", "algorithm autoround without --calib",
         lambda e: e.quantize(e.src, recipe=e.recipe(
             "defaults: {algorithm: autoround}\nrules:\n" + BODY_INT4)), CalibrationError,
         ("needs calibration statistics (block_output, float_block_output)", "--calib")),
    # GGUF
    Case("gguf-no-exact-type", "mpq quantize --format gguf with int4 sym g64 fp32-scale weights "
         "(GGUF's blocks are 32 wide with float16 steps)",
         lambda e: e.quantize(_bpe_model(e), "--format", "gguf"), FormatError,
         ("format 'gguf' cannot express",
          "model.layers.0.self_attn.q_proj: int4 sym g64 fp32 scales has no exact GGUF type")),
    Case("gguf-convert-no-exact-type", "mpq convert --format gguf of the w4a16 artifact (int4 "
         "g64, byte-level WordLevel tokenizer)",
         lambda e: ["convert", e.art, "-o", e.out, "--format", "gguf"], FormatError,
         ("a WordLevel tokenizer (format 'gguf' writes byte-level and SentencePiece-style BPE "
          "tokenizers only)",
          "model.layers.0.self_attn.q_proj: int4 sym g64 fp32 scales has no exact GGUF type")),
    Case("gguf-act-order", "--format gguf with int4 g32 fp16-scale GPTQ act-order without static "
         "groups (columns grouped out of order)",
         lambda e: e.quantize(_bpe_model(e), "--format", "gguf", recipe=e.recipe(
             "rules:\n  - targets: Linear\n    algorithm: gptq\n"
             "    options: {act_order: true}\n    weights: {format: int, bits: 4, "
             "group_size: 32, scale_dtype: fp16}\n")), FormatError,
         ("with act_order and no static_groups (GGUF blocks are consecutive columns)",)),
    Case("gguf-model-type", "--format gguf for GPT-2, a model type it has no llama.cpp record "
         "for", lambda e: e.quantize(_bpe_model(e, "gpt2"), "--format", "gguf",
                                     recipe=e.recipe(R_GGUF_Q4_0.replace(
                                         "Linear", "[Linear, Conv1D]"))),
         FormatError, ("model type 'gpt2' (format 'gguf' writes gemma, gemma2, llama, mistral, "
                      "qwen2, qwen3)",)),
    Case("gguf-q4-1-symmetric", "q4_1 weights with symmetric: true (q4_1 has a float16 min per "
         "block)", lambda e: e.quantize(_bpe_model(e), recipe=e.recipe(
             "rules:\n  - targets: Linear\n    weights: {format: q4_1, symmetric: true}\n")),
         RecipeError, ("q4_1 is asymmetric", "symmetric: false")),
    Case("gguf-k-quant-row-length", "q4_k weights on the tiny Llama, whose linears take 64 or "
         "128 inputs (K-quant super-blocks are 256 wide)",
         lambda e: e.quantize(_bpe_model(e), "--format", "gguf", recipe=e.recipe(
             "rules:\n  - targets: Linear\n    weights: {format: q4_k}\n")), RecipeError,
         ("{tmp}/r.yaml: model.layers.0.self_attn.q_proj (rules[0])",
          "group_size 256 does not divide the input dimension 64", "(and 13 more layers)",
          "q4_k needs a multiple of 256 inputs: give the rule fallback: {{format: q5_0}}")),
    Case("family-tuned-preset-rotation", "w4a16-tuned (QuaRot rotation) on OLMo 2, whose "
         "post-norms keep the residual stream from being rotated",
         lambda e: e.quantize(_olmo2(e), "--calib", _calib(e, "c.txt", "a b c " * 200),
                              recipe="w4a16-tuned"), ModelError,
         ("preset:w4a16-tuned: QuaRot rotation does not support model type 'olmo2'",
          "this preset rotates the model", "w4a16-gptq")),
    Case("target-unknown", "--target vlm (a misspelt serving engine)",
         lambda e: e.quantize(e.src, "--target", "vlm"), OptionError,
         ("unknown serving target 'vlm'", "did you mean 'vllm'")),
    Case("target-vllm-split-fused-group", "--target vllm with q_proj int8 per channel and "
         "k/v_proj int4 g64 (vLLM runs q/k/v as one GEMM with one scheme)",
         lambda e: e.quantize(e.src, "--target", "vllm", recipe=e.recipe(
             "rules:\n  - targets: ['re:.*q_proj']\n    weights: {format: int, bits: 8, "
             "granularity: channel}\n  - targets: Linear\n    weights: {format: int, "
             "bits: 4, group_size: 64}\n")), FormatError,
         ("--target vllm: 2 problem(s): fused group model.layers.0.self_attn.q_proj + "
          "model.layers.0.self_attn.k_proj + model.layers.0.self_attn.v_proj has 2 schemes",
          "give those layers a scheme vLLM runs")),
    Case("target-vllm-int3", "--target vllm with w3a16 (vLLM's int kernels take 4 or 8 bits)",
         lambda e: e.quantize(e.src, "--target", "vllm", recipe="w3a16"), FormatError,
         ("model.layers.0.self_attn.q_proj: 3-bit weights (kernels take 4 or 8)",)),
    # GGUF, Gemma family
    Case("gguf-gemma2-query-scale", "--format gguf for a Gemma 2 whose query_pre_attn_scalar "
         "(256) is not its head_dim (16), which llama.cpp's gemma2 graph assumes",
         lambda e: e.quantize(_gemma_model(e), "--format", "gguf", recipe=e.recipe(
             R_GGUF_Q4_0)), FormatError,
         ("format 'gguf' cannot express the model (1 problem(s))",
          "query_pre_attn_scalar 256 (llama.cpp's gemma2 scales queries by 1/sqrt(head_dim)",
          "write the native format (--format mpq)")),
    Case("gguf-gemma-untied-head", "--format gguf for a Gemma with its own output head "
         "(llama.cpp's gemma reads the head from the embedding)",
         lambda e: e.quantize(_gemma_model(e, "gemma", tie_word_embeddings=False), "--format",
                              "gguf", recipe=e.recipe(R_GGUF_Q4_0)), FormatError,
         ("tie_word_embeddings False (the model has its own output head; llama.cpp's gemma "
          "reads the output head from token_embd)",)),
    Case("gguf-gemma2-no-softcap", "--format gguf for a Gemma 2 without attention soft-capping "
         "(llama.cpp's gemma2 always soft-caps)",
         lambda e: e.quantize(_gemma_model(e, query_pre_attn_scalar=16,
                                           attn_logit_softcapping=None),
                              "--format", "gguf", recipe=e.recipe(R_GGUF_Q4_0)), FormatError,
         ("attn_logit_softcapping None (llama.cpp's gemma2 always soft-caps attention logits)",)),
    Case("gguf-spm-no-byte-fallback", "--format gguf with a '▁'-space BPE tokenizer without "
         "byte_fallback (neither byte-level nor SentencePiece-style)",
         lambda e: e.quantize(_no_byte_fallback(e), "--format", "gguf",
                              recipe=e.recipe(R_GGUF_Q4_0)), FormatError,
         ("a BPE tokenizer that is neither byte-level nor SentencePiece-style (it lacks "
          "byte_fallback;",)),
    # mpq drift
    Case("drift-no-static-scale", "mpq drift of the w4a16 artifact (weights only: no static "
         "activation or KV scale)", lambda e: ["drift", e.art, "--data", e.write("t.txt", "ab")],
         ArtifactError, ("{art}' has no static scale to check: it quantizes no input "
                         "activations; its KV cache is not quantized",
                         "`input_activations: {{dynamic: false}}`")),
    Case("drift-model-folder", "mpq drift of a model folder instead of an artifact",
         lambda e: ["drift", e.src, "--data", e.write("t.txt", "ab")], ArtifactError,
         ("is not an mpq artifact",)),
    Case("drift-missing-data", "mpq drift --data naming a file that does not exist",
         lambda e: ["drift", _static_artifact(e), "--data", e.tmp / "nope.txt"],
         CalibrationError, ("nope.txt",)),
    Case("drift-recalibrate-exists", "mpq drift --recalibrate OUT where OUT exists (no --force)",
         lambda e: (e.out.mkdir(), _drift(e, "--recalibrate", e.out))[1], OutputError,
         ("{tmp}/out' already exists", "--force")),
    Case("drift-recalibrate-inside", "mpq drift --recalibrate OUT inside the artifact folder",
         lambda e: _drift(e, "--recalibrate", e.tmp / "static" / "re"), OutputError,
         ("lies inside the input folder '{tmp}/static'",)),
    # mpq bench
    Case("bench-missing-path", "mpq bench of a path that does not exist",
         lambda e: ["bench", e.tmp / "nope"], ModelError, ("'{tmp}/nope' does not exist",)),
    Case("bench-not-gguf-file", "mpq bench of a file that is not a .gguf file",
         lambda e: ["bench", e.write("model.bin", "x")], ModelError,
         ("'{tmp}/model.bin' is a file but not a .gguf file",)),
    Case("bench-gguf-no-binding", "mpq bench of a .gguf file where llama.cpp's Python binding "
         "is not installed", lambda e: ["bench", e.write("m.gguf", "GGUF")], ModelError,
         ("llama.cpp's Python binding (llama_cpp) is not installed", "pip install "
          "llama-cpp-python"), skip=lambda: _llama_cpp_installed()),
    Case("bench-batch-not-integers", "mpq bench --batch 1,x",
         lambda e: ["bench", e.art, "--batch", "1,x"], OptionError,
         ("--batch '1,x' is not a comma-separated list of integers",)),
    Case("bench-batch-repeated", "mpq bench --batch 8,0,8 (a zero and a repeat)",
         lambda e: ["bench", e.art, "--batch", "8,0,8"], OptionError,
         ("batch sizes must be distinct integers ≥ 1",)),
    Case("bench-unknown-baseline", "mpq bench --baselines fp32,bf61",
         lambda e: ["bench", e.art, "--baselines", "fp32,bf61"], OptionError,
         ("unknown baseline 'bf61'", "did you mean 'bf16'?")),
    Case("bench-source-missing", "mpq bench --source of a folder that does not exist",
         lambda e: ["bench", e.art, "--source", e.tmp / "gone"], ModelError,
         ("source model '{tmp}/gone' (from --source) does not exist",)),
    Case("bench-prefill-too-long", "mpq bench --prefill-tokens beyond the model's positions",
         lambda e: ["bench", e.art, "--baselines", "none", "--prefill-tokens", "4096"],
         OptionError, ("has 128 positions; this run needs 4096",)),
    Case("gptq-gguf-act-order-dynamic", "gptq act_order onto a GGUF block type without "
         "static_groups (its blocks are consecutive columns)",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults:\n  algorithm: gptq\n  options: {act_order: true}\nrules:\n"
             "  - targets: [Linear]\n    weights: {format: q4_0}\n")],
         RecipeError, ("gptq act_order on q4_0 needs static_groups: true",
                       "add static_groups: true")),
    Case("eval-llama-cpp-numerics-not-gguf", "mpq eval --numerics llama.cpp of an artifact "
         "whose layers have no GGUF type",
         lambda e: ["eval", e.art, "--data", e.write("eval.txt", "hello world " * 100),
                    "--numerics", "llama.cpp"],
         OptionError, ("--numerics llama.cpp needs every quantized layer in a GGUF type",
                       "quantize with a GGUF recipe")),
    Case("eval-llama-cpp-numerics-plain-model", "mpq eval --numerics llama.cpp of a model "
         "folder mpq did not write",
         lambda e: ["eval", e.src, "--data", e.write("eval.txt", "hello world " * 100),
                    "--numerics", "llama.cpp"],
         OptionError, ("--numerics llama.cpp needs an mpq artifact",)),
    Case("full-range-asymmetric", "weights full_range: true with symmetric: false (an "
         "asymmetric grid has a zero point and no lone extra level)",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults: {algorithm: rtn}\nrules:\n  - targets: [Linear]\n    weights: {bits: 4, "
             "group_size: 32, symmetric: false, full_range: true}\n")],
         RecipeError, ("{tmp}/r.yaml: rules[0]", "full_range applies to symmetric scales only",
                       "remove full_range or symmetric: false")),
    Case("full-range-not-int", "weights full_range: true on nf4",
         lambda e: ["plan", e.src, "-r", e.recipe(
             "defaults: {algorithm: rtn}\nrules:\n  - targets: [Linear]\n    weights: "
             "{format: nf4, full_range: true}\n")],
         RecipeError, ("full_range applies to int only, not nf4", "remove full_range")),
]


# --- running a case -------------------------------------------------------------------------------

def build_shared(root: Path) -> tuple[Path, Path]:
    """The tiny Llama (with a byte tokenizer) and its w4a16 artifact, under ``root``."""
    from mpq.quantize import quantize
    from tests.helpers import byte_tokenizer

    src, art = root / "src", root / "w4"
    save_tiny_model("llama", src)
    byte_tokenizer().save_pretrained(src)
    quantize(src, "w4a16", art)
    return src, art


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under ``folders`` (hidden ones included) → sha256 of its bytes."""
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            state[str(path)] = ("dir" if path.is_dir() else
                                hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def run_case(case: Case, env: Env):
    """Build and run the case; return (result, message, args)."""
    args = [str(a) for a in case.build(env)]
    before = snapshot(env.tmp, env.src, env.art)
    result = CliRunner().invoke(cli, args, obj={})
    after = snapshot(env.tmp, env.src, env.art)
    allowed = {str(env.tmp / name) for name in (*case.leaves, *case.rewrites)}
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
               and not any(path == a or path.startswith(a + "/") for a in allowed)}
    return result, changed, args


def fill(text: str, env: Env) -> str:
    return text.format(tmp=env.tmp, src=env.src, art=env.art)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return build_shared(tmp_path_factory.mktemp("catalogue"))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, shared, tmp_path, monkeypatch, request):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    if case.known_issue:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.known_issue))
    env = Env(tmp=tmp_path, src=shared[0], art=shared[1], monkeypatch=monkeypatch)
    result, changed, _ = run_case(case, env)
    detail = f"exit {result.exit_code}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        detail += f"\nexception: {result.exception!r}"
    assert result.exit_code == case.error.exit_code, detail
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), detail
    line = lines[0]
    for expected in case.expect:
        assert fill(expected, env) in line, f"{fill(expected, env)!r} not in {line!r}"
    assert re.search(r"\(.+\)$", line), f"no '(how to fix)' hint: {line!r}"
    assert not list(tmp_path.rglob("*.mpq-tmp-*")) and not list(tmp_path.rglob("*.mpq-old-*"))
    assert not changed, f"files created, changed or removed: {sorted(changed)}"


def test_case_ids_are_unique_and_stable():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", i) for i in ids)
    assert len(CASES) >= 32


def doc_ids(text: str) -> list[str]:
    """The ids in the first column of the doc's table."""
    ids = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0].startswith("`"):
            ids.append(cells[0].strip("`"))
    return ids


def test_catalogue_doc_lists_every_case():
    ids = doc_ids(DOC.read_text(encoding="utf-8"))
    assert len(ids) == len(set(ids))
    assert set(ids) == {case.id for case in CASES}, \
        "regenerate it: python -m tests.cli.test_bad_input_catalogue > docs/bad-inputs.md"
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"lists the {len(CASES)} tested bad inputs" in readme


# --- docs/bad-inputs.md ---------------------------------------------------------------------------

def _shown(text: str, env: Env) -> str:
    """Paths of a message or command as a user would write them; digest prefixes (which follow
    the temporary folder's path recorded in the artifact) as ``<sha256>``."""
    text = text.replace(str(env.art), "tiny-w4").replace(str(env.src), "tiny-llama")
    text = text.replace(str(env.src.parent), "models")  # the folder holding both
    text = re.sub(r"\b[0-9a-f]{16}…", "<sha256>…", text)
    return text.replace(str(env.tmp) + "/", "").replace(str(env.tmp), ".")


def _cell(text: str, limit: int = 0) -> str:
    if limit and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def render_doc() -> str:
    import tempfile

    rows, issues = [], []
    with tempfile.TemporaryDirectory() as root:
        src, art = build_shared(Path(root))
        for index, case in enumerate(CASES):
            if case.skip and case.skip():
                raise SystemExit(f"{case.id}: {case.skip()}; generate the doc elsewhere")
            tmp = Path(root) / f"case{index}"
            tmp.mkdir()
            with pytest.MonkeyPatch.context() as monkeypatch:
                env = Env(tmp=tmp, src=src, art=art, monkeypatch=monkeypatch)
                result, changed, args = run_case(case, env)
            message = result.stderr.strip().removeprefix("error: ")
            if (result.exit_code != case.error.exit_code or changed) and not case.known_issue:
                raise SystemExit(f"{case.id}: exit {result.exit_code} ({result.stderr!r}), "
                                 f"changed {sorted(changed)}")
            command = "mpq " + " ".join(_shown(a, env) for a in args)
            rows.append(f"| `{case.id}` | {_cell(case.input)} | `{_cell(command)}` | "
                        f"{case.error.exit_code} | {_cell(_shown(message, env), 300)} |")
            if case.known_issue:
                issues.append(f"- `{case.id}`: {case.known_issue}.")
    rewriting = ", ".join(f"`{case.id}`" for case in CASES if case.rewrites) or "no cases"
    used = {case.error.exit_code: case.error for case in CASES}
    codes = [f"- {code} `{used[code].__name__}`: {' '.join(used[code].__doc__.split())}"
             for code in sorted(used)]
    return "\n".join([
        "# Bad inputs and their messages",
        "",
        f"Every row is a case of `tests/cli/test_bad_input_catalogue.py` ({len(CASES)} cases). "
        "Each prints exactly one line on stderr, `error: what (how to fix)`, exits with the "
        "code of its error class, and leaves no output folder, no temporary sibling and no "
        "changed input behind (the disk-full cases keep the resumable work directory "
        "`OUT.mpq-work`, so a rerun after freeing space continues from the finished blocks; "
        f"{rewriting} rewrite their own copy of an input while the command runs, so that file "
        "is exempt from the unchanged-input check).",
        "",
        "Exit codes of these cases (all of them: README, \"Exit codes\"):",
        "",
        *codes,
        "",
        "Paths are shown relative to the case's folder; `tiny-llama` is a 2-block random Llama "
        "folder and `tiny-w4` its `w4a16` artifact. Generated with "
        "`python -m tests.cli.test_bad_input_catalogue > docs/bad-inputs.md`.",
        "",
        "| id | input | command | exit | message |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *(["## Known issues", "",
           "These cases are strict xfails in the test until the product is fixed:", "",
           *issues, ""] if issues else []),
    ])


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    print(render_doc(), end="")

"""``--format gguf``: the written file read back by the ``gguf`` package (its reader and
dequantizers reproduce mpq's dequantized weights bit for bit, for every GGUF type mpq writes),
its metadata and tokenizer, transformers' GGUF loader running it like the native artifact, and
what the format refuses."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mpq.checkpoint.gguf_arch import permute_rows
from mpq.checkpoint.gguf_writer import GGUF_FILE
from mpq.checkpoint.native import open_artifact
from mpq.checkpoint.state import state_from_artifact
from mpq.errors import FormatError
from tests.helpers import bpe_tokenizer, run_cli
from tests.tiny_models import save_tiny_model

gguf = pytest.importorskip("gguf")

# every GGUF type mpq writes, one layer each; the tied embedding/head pair on q8_0
MIXED = """mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: ["re:.*q_proj"]
    weights: {format: q8_0}
  - targets: ["re:.*k_proj"]
    weights: {format: q4_0}
  - targets: ["re:.*v_proj"]
    weights: {format: q4_1}
  - targets: ["re:.*o_proj"]
    weights: {format: q5_0}
  - targets: ["re:.*gate_proj"]
    weights: {format: q5_1}
  - targets: ["re:.*up_proj"]
    weights: {format: int, bits: 4, symmetric: true, group_size: 32, scale_dtype: fp16}
  - targets: ["re:.*down_proj"]
    weights: {format: int, bits: 5, symmetric: true, group_size: 32, scale_dtype: fp16}
  - targets: [model.embed_tokens, lm_head]
    weights: {format: q8_0}
"""
TYPES = {"q_proj": "Q8_0", "k_proj": "Q4_0", "v_proj": "Q4_1", "o_proj": "Q5_0",
         "gate_proj": "Q5_1", "up_proj": "Q4_0", "down_proj": "Q5_0"}
# the K-quants on a model whose linears take multiples of 256 inputs: embedding q4_k, head q6_k
K_MIXED = """mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: ["re:.*q_proj"]
    weights: {format: q5_k}
  - targets: ["re:.*k_proj"]
    weights: {format: q3_k}
  - targets: ["re:.*(v_proj|down_proj)"]
    weights: {format: q6_k}
  - targets: ["re:.*(o_proj|gate_proj|up_proj)"]
    weights: {format: q4_k}
  - targets: [model.embed_tokens]
    weights: {format: q4_k}
  - targets: [lm_head]
    weights: {format: q6_k}
"""
K_TYPES = {"q_proj": "Q5_K", "k_proj": "Q3_K", "v_proj": "Q6_K", "o_proj": "Q4_K",
           "gate_proj": "Q4_K", "up_proj": "Q4_K", "down_proj": "Q6_K"}
# the same on qwen2 with k_proj on iq4_nl (q4_0 stays covered by up_proj's int4)
IQ_MIXED = MIXED.replace('["re:.*k_proj"]\n    weights: {format: q4_0}',
                         '["re:.*k_proj"]\n    weights: {format: iq4_nl}')
IQ_TYPES = {**TYPES, "k_proj": "IQ4_NL"}
# per model: (recipe, linear types, embedding type, head type, general.file_type)
WRITTEN = {"llama_tied": (MIXED, TYPES, "Q8_0", "Q8_0", "MOSTLY_Q8_0"),
           "qwen2": (IQ_MIXED, IQ_TYPES, "Q8_0", "Q8_0", "MOSTLY_Q8_0"),
           "llama_wide": (K_MIXED, K_TYPES, "Q4_K", "Q6_K", "MOSTLY_Q4_K_M")}


def model_dir(tmp_path, arch: str):
    path = tmp_path / f"src-{arch}"
    save_tiny_model(arch, path)
    bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(WRITTEN))
def written(request, tmp_path_factory):
    """(source, native artifact, gguf folder) of the mixed recipe, the gguf by ``mpq convert``."""
    tmp = tmp_path_factory.mktemp(f"gguf-{request.param}")
    src = model_dir(tmp, request.param)
    recipe = tmp / "mixed.yaml"
    recipe.write_text(WRITTEN[request.param][0])
    art, out = tmp / "native", tmp / "gguf"
    result = run_cli("quantize", src, "--recipe", recipe, "-o", art)
    assert result.exit_code == 0, result.output
    result = run_cli("convert", art, "-o", out, "--format", "gguf")
    assert result.exit_code == 0, result.output
    return request.param, src, art, out


def reader(out):
    return gguf.GGUFReader(str(out / GGUF_FILE))


def field(r, key):
    return r.fields[key].contents()


def test_every_quantized_layer_dequantizes_bit_for_bit(written):
    arch, _, art, out = written
    _, types, embedding, head, _ = WRITTEN[arch]
    state = state_from_artifact(art)
    tensors = {t.name: t for t in reader(out).tensors}
    config = state.config
    seen = set()
    for layer in state.plan.quantized():
        if state.plan.shared_with(layer.name) is not None:
            assert "output.weight" not in tensors  # the tied head reuses token_embd
            continue
        if layer.embedding or layer.name == "lm_head":
            name, kind = ("token_embd.weight", embedding) if layer.embedding else \
                ("output.weight", head)
        else:
            block = layer.name.split(".")[2]
            short = layer.name.rsplit(".", 1)[1]
            kind = types[short]
            name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                    "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                    "down_proj": "ffn_down"}[short]
            name = f"blk.{block}.{name}.weight"
        t = tensors[name]
        assert t.tensor_type.name == kind
        ours = state.qweights[layer.name].dequantize()
        if arch.startswith("llama") and layer.name.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if layer.name.endswith("q_proj")
                           else "num_key_value_heads"]
            ours = permute_rows(ours, heads)
        theirs = gguf.quants.dequantize(t.data, t.tensor_type)
        assert theirs.shape == tuple(ours.shape)
        assert theirs.tobytes() == ours.numpy().tobytes(), name
        seen.add(kind)
    assert seen == {*types.values(), embedding, head}
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"):
        assert tensors[name].tensor_type.name == "F32"


def test_metadata_and_tokenizer_read_back(written):
    arch, src, art, out = written
    r = reader(out)
    config = json.loads((src / "config.json").read_text())
    name = "llama" if arch.startswith("llama") else arch
    assert field(r, "general.architecture") == name
    assert field(r, f"{name}.block_count") == config["num_hidden_layers"]
    assert field(r, f"{name}.embedding_length") == config["hidden_size"]
    assert field(r, f"{name}.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(r, "general.file_type") == int(gguf.LlamaFileType[WRITTEN[arch][4]])
    tok = bpe_tokenizer()
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    reverse = {i: t for t, i in tok.get_vocab().items()}
    assert field(r, "tokenizer.ggml.tokens") == [reverse[i] for i in range(256)]
    types = field(r, "tokenizer.ggml.token_type")
    specials = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == specials
    assert field(r, "tokenizer.ggml.merges") == ["t h", "th e", "a n", "i n", "e r"]
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == tok.chat_template
    artifact = open_artifact(art)
    assert json.loads(field(r, "mpq.plan")) == json.loads(artifact.metadata["mpq.plan"])
    assert json.loads(field(r, "mpq.recipe")) == json.loads(artifact.metadata["mpq.recipe"])
    assert field(r, "mpq.format") == "gguf"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", GGUF_FILE, "mpq-manifest.json"]


def test_transformers_runs_the_gguf_like_the_native_artifact(written):
    """transformers' GGUF loader (which undoes llama's Q/K permutation) gives the logits of the
    native artifact loaded with mpq.load: names, layout and permutation are right."""
    from transformers import AutoModelForCausalLM

    from mpq.loader import load

    _, _, art, out = written
    ours = load(art, dequantize=True)
    theirs = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=GGUF_FILE,
                                                  dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())


IQ4_NL_GPTQ = """mpq_recipe: 1
defaults: {algorithm: rtn}
rules:
  - targets: [Embedding, lm_head]
    weights: {format: iq4_nl}
  - targets: [Linear]
    algorithm: gptq
    weights: {format: iq4_nl}
"""
# preset (or recipe text), model → GGUF types of (attn_q, attn_v, ffn_down of blocks 0 and 1, output, token_embd)
PRESET_TYPES = [
    ("gguf-q4_0-gptq", "llama", ("Q4_0", "Q4_0", "Q4_0", "Q4_0", "Q8_0", "Q8_0")),
    # 256 divides every input: llama.cpp's Q4_K_M mix (blocks 0 and 1 are "first eighth")
    ("gguf-q4_k_m-gptq", "llama_wide", ("Q4_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K")),
    # 64 inputs: every K-quant falls back (q4_k → q5_0, q6_k → q8_0)
    ("gguf-q4_k_m-gptq", "llama", ("Q5_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0")),
    # llama.cpp's Q3_K_M mix: q3_k, q5_k for the first v_proj and down_proj, q4_k further on
    ("gguf-q3_k_m-gptq", "llama_wide", ("Q3_K", "Q5_K", "Q5_K", "Q4_K", "Q6_K", "Q6_K")),
    # 64 inputs: q3_k → q4_0, q5_k → q5_1, q4_k → q5_0, q6_k → q8_0
    ("gguf-q3_k_m-gptq", "llama", ("Q4_0", "Q5_1", "Q5_1", "Q5_0", "Q8_0", "Q8_0")),
    # a recipe file: GPTQ onto iq4_nl, embedding and head by RTN
    (IQ4_NL_GPTQ, "llama", ("IQ4_NL",) * 6),
]


@pytest.mark.parametrize("preset, arch, types", PRESET_TYPES)
def test_quantize_writes_gguf_directly(tmp_path, preset, arch, types):
    """``mpq quantize --format gguf`` (GPTQ through the preset) writes the same kind of file;
    the untied model's head and embedding are tensors of their own, in the preset's types
    (K-quants where 256 divides the inputs, their fallbacks elsewhere)."""
    src = model_dir(tmp_path, arch)
    out = tmp_path / "out"
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the cat sat on the mat and ran in the sun"] * 300))
    if "\n" in preset:
        (tmp_path / "r.yaml").write_text(preset)
        preset = tmp_path / "r.yaml"
    result = run_cli("quantize", src, "--recipe", preset, "--calib", calib,
                     "--num-samples", "4", "--seq-len", "64", "-o", out, "--format", "gguf")
    assert result.exit_code == 0, result.output
    tensors = {t.name: t for t in reader(out).tensors}
    names = ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight",
             "blk.1.ffn_down.weight", "output.weight", "token_embd.weight")
    assert tuple(tensors[n].tensor_type.name for n in names) == types
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    if types[0] == "IQ4_NL":  # llama.cpp's view of the weights is close to the source's
        assert field(reader(out), "general.file_type") == int(gguf.LlamaFileType.MOSTLY_IQ4_NL)
        from safetensors.torch import load_file
        source = load_file(src / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
        t = tensors["blk.0.ffn_down.weight"]
        theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        assert float((theirs - source).norm() / source.norm()) < 0.15


@pytest.mark.parametrize("weights, expect", [
    ("{format: int, bits: 4, group_size: 64}", "int4 sym g64 fp32 scales has no exact GGUF type"),
    ("{format: int, bits: 4, group_size: 32}", "int4 sym g32 fp32 scales has no exact GGUF"),
    ("{format: nf4}", "nf4 g64 has no exact GGUF type"),
])
def test_schemes_without_an_exact_type_are_refused_before_work(tmp_path, weights, expect):
    src = model_dir(tmp_path, "llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"mpq_recipe: 1\ndefaults: {{algorithm: rtn}}\nrules:\n"
                      f"  - targets: [Linear]\n    weights: {weights}\n")
    out = tmp_path / "out"
    result = run_cli("quantize", src, "--recipe", recipe, "-o", out, "--format", "gguf")
    assert result.exit_code == FormatError.exit_code, result.output
    assert "model.layers.0.self_attn.q_proj: " + expect in result.output
    assert not out.exists()


def test_model_and_tokenizer_problems_are_refused(tmp_path):
    from tests.helpers import byte_tokenizer

    src = tmp_path / "gpt2"
    save_tiny_model("gpt2", src)
    bpe_tokenizer().save_pretrained(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mpq_recipe: 1\ndefaults: {algorithm: rtn}\nrules:\n"
                      "  - targets: [Linear, Conv1D]\n    weights: {format: q8_0}\n")
    result = run_cli("quantize", src, "--recipe", recipe, "-o", tmp_path / "o1",
                     "--format", "gguf")
    assert result.exit_code == FormatError.exit_code
    assert "model type 'gpt2'" in result.output
    word = tmp_path / "word"
    save_tiny_model("llama", word)
    byte_tokenizer().save_pretrained(word)
    result = run_cli("quantize", word, "--recipe", recipe, "-o", tmp_path / "o2",
                     "--format", "gguf")
    assert result.exit_code == FormatError.exit_code
    assert "a WordLevel tokenizer" in result.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_permute_rows_is_llama_cpps_interleaving():
    w = torch.arange(2 * 8).reshape(2 * 8, 1).float()  # 2 heads of head_dim 8
    out = permute_rows(w, 2)[:, 0].tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert np.array_equal(permute_rows(torch.arange(16.0), 2).numpy(), np.array(out))

"""The family matrix: every model family × the pipelines users run, on a tiny random model of
that family built with its real transformers class (issue 19's acceptance matrix).

Each cell either runs (``mpq quantize`` through the CLI) and passes a real check, or is refused
with an exit code and a message naming why.  Which cells are refused, and why, is not written
here: it follows from the family records (mpq.models.families), whose missing parts carry their
reasons, and from the layer classes the output format cannot store; the test checks the CLI
refuses with exactly that.

Checks of a cell that runs:
* quantized pipelines: the artifact loads with ``mpq.load`` and its logits on held-out tokens
  stay near the float model's: ‖L_q − L_f‖² / ‖L_0 − L_f‖² (L_0: the float model with every
  linear of its decoder blocks zeroed) below a per-pipeline bound far under 1, which an
  artifact of garbage weights fails;
* compressed-tensors: the folder loads with plain ``transformers.AutoModelForCausalLM`` and
  computes the logits ``mpq.load`` computes from the native artifact of the same recipe.

``python -m tests.test_family_matrix --table`` prints the matrix as markdown
(docs/family-matrix.md, which a test keeps equal to it).
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import mpq
from mpq.models.attention import attention_modules, discover_attention
from mpq.models.families import family_of
from mpq.models.layout import is_linear, layout_of
from tests.helpers import WORDS, run_cli, write_tokenizer
from tests.tiny_models import COMMON, MOE_ARCHITECTURES, model_from_config, tiny_config

# model type (the list, plus BLOOM) → tiny architecture in tests/tiny_models.py;
# the GENERIC types have no family record: they run on generic discovery
ROWS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
        "qwen3_moe": "qwen3_moe", "mixtral": "mixtral", "gemma": "gemma", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2", "granite": "granite",
        "gpt2": "gpt2", "opt": "opt", "falcon": "falcon", "gpt_neox": "gpt_neox",
        "bloom": "bloom", "starcoder2": None, "codegen": None}
GENERIC = {  # Starcoder2: Llama-like names; CodeGen: q/k/v fused in qkv_proj
    "starcoder2": lambda: transformers.Starcoder2Config(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        bos_token_id=0, eos_token_id=1, **COMMON),
    "codegen": lambda: transformers.CodeGenConfig(
        n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=256, n_positions=128,
        bos_token_id=0, eos_token_id=1),
}
# transformers 5.23 cannot build these models' compressed modules: FalconPreTrainedModel.
# _init_weights reads FalconLinear.weight, which compressed-tensors replaced by weight_packed.
# They load with CompressedTensorsConfig(run_compressed=False) (decompressed at load).
DECOMPRESS_AT_LOAD = {"falcon": "load with `quantization_config=CompressedTensorsConfig("
                                "run_compressed=False)`: Falcon's `_init_weights` reads "
                                "`FalconLinear.weight`, which the compressed module lacks"}
CALIB = ["--num-samples", "4", "--seq-len", "32"]
KV = "kv_cache: {format: fp8_e4m3, granularity: head}\n"
INT4 = "{format: int, bits: 4, symmetric: true, granularity: group, group_size: 64}"
INT8_TOKEN = "{format: int, bits: 8, dynamic: true, granularity: token}"
RECIPES = {
    "quarot-w4a8": ("mpq_recipe: 1\nname: quarot-w4a8\nrotation: {type: quarot}\n"
                    f"defaults:\n  algorithm: rtn\n  input_activations: {INT8_TOKEN}\n"
                    f"rules:\n  - targets: [Linear, Conv1D]\n    weights: {INT4}\n"),
    "kv-fp8": ("mpq_recipe: 1\nname: kv-fp8\n" + KV + "defaults:\n  algorithm: rtn\n"
               "rules:\n  - targets: [Linear, Conv1D]\n"
               "    weights: {format: int, bits: 8, symmetric: true, granularity: channel}\n"),
}


ACTIVATION_RECIPES = ("w8a8-int8", "quarot-w4a8")  # these quantize every input activation


@dataclass(frozen=True)
class Column:
    """One pipeline: a preset or one of RECIPES, whether it needs calibration, the family part
    it needs (mpq.models.family.PARTS; None: any model), the bound on the logits' relative
    squared error, and the output format."""

    title: str
    recipe: str
    calib: bool
    part: str | None
    bound: float
    output_format: str = "mpq"


# bounds on relative_error (1.0: block linears that compute nothing); the tiny models give
# about 0.02-0.15 at 4 bits, 0.0005 at 8 bits, 0.002 for the FP8 KV cache
COLUMNS = (
    Column("rtn w4a16", "w4a16", False, None, 0.3),
    Column("w4a16-gptq", "w4a16-gptq", True, None, 0.3),
    Column("w4a16-awq", "w4a16-awq", True, "scale_groups", 0.3),
    Column("w8a8-int8", "w8a8-int8", True, "scale_groups", 0.02),
    Column("QuaRot W4A8", "quarot-w4a8", True, "rotation", 0.3),
    Column("KV-cache FP8", "kv-fp8", True, "attention", 0.02),
    Column("compressed-tensors", "w4a16", False, None, 0.0, "compressed-tensors"),
)


def expected_refusal(model_type: str, column: Column) -> tuple[int, str] | None:
    """The exit code and what the refusal of this cell must say (None: the cell runs), from
    the family record (and, for the output format, the model's layer classes)."""
    config = config_of(model_type)
    family = family_of(config)
    if column.output_format == "compressed-tensors" and has_conv1d(model_type):
        return 9, "a Conv1D (GPT-2's transposed linear), which compressed-tensors does not quantize"
    if ROWS.get(model_type) in MOE_ARCHITECTURES:  # fused experts (mpq.models.experts)
        if column.output_format == "compressed-tensors":
            return 9, ("transformers holds these experts as 3-D parameters its "
                       "compressed-tensors loader cannot decompress")
        if column.recipe in ACTIVATION_RECIPES:
            return 3, "input activation quantization of fused MoE experts is not supported"
    if column.part is None:
        return None
    if family is None:
        if column.part == "attention" and not attention_discovered(model_type):
            return 4, "kv_cache: no attention module with k_proj/v_proj and a KV cache argument"
        return {"scale_groups": (4, f"no scale-folding data for model_type '{model_type}'"),
                "rotation": (4, "no family record names its norms and residual-stream "
                                 "readers/writers")}.get(column.part)
    why = family.why_not(column.part)
    if why is not None:
        return 4, why
    return None


@functools.lru_cache(maxsize=None)
def has_conv1d(model_type: str) -> bool:
    model = transformers.AutoModelForCausalLM.from_config(config_of(model_type))
    return any(isinstance(m, Conv1D) for m in model.modules())


@functools.lru_cache(maxsize=None)
def attention_discovered(model_type: str) -> bool:
    model = transformers.AutoModelForCausalLM.from_config(config_of(model_type))
    return bool(discover_attention(model.get_submodule(layout_of(model).blocks_path)[0]))


def config_of(model_type: str) -> transformers.PretrainedConfig:
    if model_type in GENERIC:
        return GENERIC[model_type]()
    return tiny_config(ROWS[model_type])


def cell_text(model_type: str, column: Column, reasons: dict[str, int]) -> str:
    """✅, or "refused (exit N) [k]" with reason k numbered in ``reasons`` (filled here)."""
    refusal = expected_refusal(model_type, column)
    if refusal is None:
        if column.output_format == "compressed-tensors" and model_type in DECOMPRESS_AT_LOAD:
            return f"✅ [{reasons.setdefault(DECOMPRESS_AT_LOAD[model_type], len(reasons) + 1)}]"
        return "✅"
    code, why = refusal
    return f"refused (exit {code}) [{reasons.setdefault(why, len(reasons) + 1)}]"


def table() -> str:
    """The matrix as markdown."""
    reasons: dict[str, int] = {}
    rows = []
    for model_type in ROWS:
        family = family_of(config_of(model_type))
        name = family.name if family is not None else "none: generic discovery"
        cells = [cell_text(model_type, column, reasons) for column in COLUMNS]
        rows.append(f"| {model_type} | {name} | " + " | ".join(cells) + " |")
    lines = ["# Model families × pipelines",
             "",
             "Generated by `python -m tests.test_family_matrix --table > docs/family-matrix.md` "
             "from the family records (mpq/models/families.py). tests/test_family_matrix.py runs "
             "every cell through `mpq quantize` on a tiny random model of the family, built with "
             "its real transformers class: a ✅ cell quantizes, loads with `mpq.load` and keeps "
             "the logits near the float model's (compressed-tensors: plain transformers loads "
             "the folder and computes the logits `mpq.load` computes from the native artifact); "
             "a refused cell exits with the code shown and a message naming the reason.",
             "",
             "| model type | family | " + " | ".join(c.title for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS), *rows, "", "Reasons and notes:", ""]
    lines += [f"{number}. {why}" for why, number in reasons.items()]
    lines += ["", "Pipelines: `rtn w4a16`, `w4a16-gptq`, `w4a16-awq`, `w8a8-int8` are the presets; "
              "QuaRot W4A8 is QuaRot (R1, R2, online R4) with int4 g64 RTN weights and int8 "
              "per-token activations; KV-cache FP8 is fp8_e4m3 per-head KV scales with int8 "
              "weights; compressed-tensors is the w4a16 preset written with "
              "`--format compressed-tensors`.",
              "",
              "Mixture-of-experts rows (qwen3_moe, mixtral): every fused 3-D expert is "
              "quantized per expert (mpq.models.experts: GPTQ from its routed tokens, RTN "
              "fallback for starved experts); the router stays in the source dtype; AWQ and "
              "SmoothQuant transform the attention only; only the native format holds the "
              "experts.",
              "",
              "starcoder2 and codegen have no family record: their blocks (and Starcoder2's "
              "KV-cache attention) are found by generic discovery, which `mpq plan` reports and "
              "`mpq quantize` warns about."]
    return "\n".join(lines) + "\n"


# --- the cells --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("family-matrix")
    (path / "calib.txt").write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(3000)))
    return path


@pytest.fixture(scope="module")
def source(workdir):
    """model type → a saved tiny model folder (with the byte tokenizer), built once."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            path = workdir / model_type
            model_from_config(config_of(model_type)).save_pretrained(path)
            write_tokenizer(path)
            built[model_type] = path
        return built[model_type]

    return get


@pytest.fixture(scope="module")
def reference(source):
    """model type → the float model's logits on HELD_OUT, and those of the same model with
    every linear inside its decoder blocks zeroed (what quantization error is measured
    against), computed once."""
    done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(model_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        if model_type not in done:
            model = transformers.AutoModelForCausalLM.from_pretrained(source(model_type)).eval()
            floats = logits(model)
            blocks = model.get_submodule(layout_of(model).blocks_path)
            with torch.no_grad():
                for module in blocks.modules():
                    if is_linear(module):
                        module.weight.zero_()
            done[model_type] = floats, logits(model)
        return done[model_type]

    return get


# MPQ_MATRIX_ERRORS=FILE: also write each cell's relative error there (to review the bounds)
REPORT = open(os.environ["MPQ_MATRIX_ERRORS"], "a") if os.environ.get("MPQ_MATRIX_ERRORS") else None
HELD_OUT = torch.randint(2, 256, (2, 24), generator=torch.Generator().manual_seed(11))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(HELD_OUT).logits.float()


def relative_error(quantized: torch.Tensor, floats: torch.Tensor, zeroed: torch.Tensor) -> float:
    """‖L_q − L_f‖² / ‖L_0 − L_f‖²: the logits' error relative to that of a model whose block
    linears compute nothing (1.0); an artifact with unquantized garbage weights is near or
    above 1."""
    return float((quantized - floats).square().sum() / (zeroed - floats).square().sum())


def quantize_cli(src: Path, column: Column, out: Path, workdir: Path, output_format: str):
    recipe = column.recipe
    if recipe in RECIPES:
        recipe_path = workdir / f"{recipe}.yaml"
        recipe_path.write_text(RECIPES[recipe])
        recipe = recipe_path
    calib = ["--calib", workdir / "calib.txt", *CALIB] if column.calib else []
    return run_cli("quantize", src, "-r", recipe, "-o", out, "--format", output_format, *calib)


@pytest.mark.parametrize("column", COLUMNS, ids=[c.recipe + ("-ct" if c.output_format != "mpq"
                                                               else "") for c in COLUMNS])
@pytest.mark.parametrize("model_type", list(ROWS))
def test_cell(model_type, column, source, reference, workdir, tmp_path):
    src = source(model_type)
    out = tmp_path / "out"
    result = quantize_cli(src, column, out, workdir, column.output_format)
    refusal = expected_refusal(model_type, column)
    if refusal is not None:
        message = " ".join(result.output.split())
        assert result.exit_code == refusal[0], result.output
        assert refusal[1] in message, message
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    if column.output_format == "compressed-tensors":
        native = tmp_path / "native"
        assert quantize_cli(src, column, native, workdir, "mpq").exit_code == 0
        kwargs = ({"quantization_config": transformers.CompressedTensorsConfig(
            run_compressed=False)} if model_type in DECOMPRESS_AT_LOAD else {})
        plain = transformers.AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()
        torch.testing.assert_close(logits(plain), logits(mpq.load(native, dequantize=True)),
                                   rtol=1e-5, atol=1e-5)
        return
    model = mpq.load(out)
    loaded = logits(model)
    error = relative_error(loaded, *reference(model_type))
    if REPORT is not None:
        REPORT.write(f"{model_type}\t{column.title}\t{error:.4f}\n")
    assert 0 < error < column.bound, error
    if column.part == "attention":  # every block's cache has scales, and they act
        check_kv_cache(src, out, loaded)
    if column.part == "scale_groups":  # the transform folded scales in every block
        applied = model.mpq_artifact.log.transforms[0]
        assert len(applied) == model.config.num_hidden_layers
        assert all(record["groups"] for record in applied), applied


def check_kv_cache(src: Path, out: Path, loaded: torch.Tensor) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    layout = layout_of(model)
    stored = set(load_file(out / "model.safetensors"))
    for index, block in enumerate(model.get_submodule(layout.blocks_path)):
        (local, _), = attention_modules(model, block)
        for name in ("k_scale", "v_scale"):
            assert f"{layout.blocks_path}.{index}.{local}.{name}" in stored
    plain = mpq.load(out)
    for module in plain.modules():  # no activation quantization here: only the KV taps
        module._forward_pre_hooks.clear()
    assert not torch.equal(logits(plain), loaded)


def test_the_doc_is_the_matrix():
    doc = Path(__file__).resolve().parent.parent / "docs" / "family-matrix.md"
    assert doc.read_text() == table(), ("regenerate: python -m tests.test_family_matrix "
                                        "--table > docs/family-matrix.md")


if __name__ == "__main__" and "--table" in sys.argv:
    sys.stdout.write(table())

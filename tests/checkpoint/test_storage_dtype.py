"""storage_dtype: the artifact keeps its float tensors in the source's dtype or the recipe's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import mpq
from mpq.checkpoint.convert import convert
from mpq.checkpoint.native import open_artifact
from mpq.checkpoint.storage import source_storage_dtype, stored_dense
from mpq.config.recipe import parse_recipe
from mpq.engine.spec import RunOptions
from mpq.errors import FormatError, RecipeError
from mpq.models.source import source_weight_map
from mpq.quantize import quantize
from tests.helpers import byte_tokenizer
from tests.tiny_models import tiny_model

TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_source(path, dtype: torch.dtype, arch: str = "llama"):
    model = tiny_model(arch).to(dtype)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model


def recipe(extra: str = "", weights: str = "{format: int, bits: 4, group_size: 32}"):
    return parse_recipe(f"mpq_recipe: 1\nname: storage-test\n{extra}defaults:\n  algorithm: rtn\n"
                        f"rules:\n  - targets: [Linear]\n    weights: {weights}\n",
                        "storage-test.yaml")


def stored_dtypes(folder) -> dict[str, torch.dtype]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name).dtype for name in handle.keys()})
    return out


def float_parts(dtypes: dict[str, torch.dtype]) -> set[torch.dtype]:
    """Dtypes of the kept tensors (embedding, norms, head): every name not of a quantized
    layer's encoding."""
    return {dtype for name, dtype in dtypes.items()
            if not name.endswith((".qweight", ".scale", ".zero"))}


@pytest.mark.parametrize("source", ["bf16", "fp16"])
@pytest.mark.parametrize("stream", [True, False])
def test_float_parts_keep_the_source_dtype_whatever_the_run_computed_in(source, stream,
                                                                        tmp_path):
    save_source(tmp_path / "src", TORCH[source])
    quantize(tmp_path / "src", recipe(), tmp_path / "out",
             RunOptions(dtype=torch.float32, stream=stream))
    dtypes = stored_dtypes(tmp_path / "out")
    assert float_parts(dtypes) == {TORCH[source]}
    assert {d for n, d in dtypes.items() if n.endswith(".scale")} == {torch.float32}
    artifact = open_artifact(tmp_path / "out")
    assert artifact.plan.storage_dtype == source
    # the run computed in fp32: loaders compute in it too, upcasting the stored tensors
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    model = mpq.load(tmp_path / "out")
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert mpq.load(tmp_path / "out", dtype=TORCH[source]).model.norm.weight.dtype \
        == TORCH[source]


def test_streamed_and_whole_runs_write_the_same_bf16_artifact(tmp_path):
    save_source(tmp_path / "src", torch.bfloat16, "qwen2")  # biases stay float too
    for stream in (True, False):
        quantize(tmp_path / "src", recipe(), tmp_path / f"out{stream}",
                 RunOptions(dtype=torch.float32, stream=stream))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "outTrue" / name).read_bytes() == \
            (tmp_path / "outFalse" / name).read_bytes()


def test_storage_dtype_overrides_the_source(tmp_path):
    save_source(tmp_path / "src", torch.bfloat16)
    quantize(tmp_path / "src", recipe("storage_dtype: fp32\n"), tmp_path / "fp32")
    assert float_parts(stored_dtypes(tmp_path / "fp32")) == {torch.float32}
    assert open_artifact(tmp_path / "fp32").plan.storage_dtype is None  # fp32: not recorded
    save_source(tmp_path / "src32", torch.float32)
    quantize(tmp_path / "src32", recipe("storage_dtype: bf16\n"), tmp_path / "bf16")
    assert float_parts(stored_dtypes(tmp_path / "bf16")) == {torch.bfloat16}
    plan = json.loads(open_artifact(tmp_path / "bf16").metadata["mpq.plan"])
    assert plan["storage_dtype"] == "bf16"


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_every_writer_and_convert_store_the_float_parts_in_the_storage_dtype(fmt, tmp_path):
    save_source(tmp_path / "src", torch.bfloat16)
    weights = "{format: int, bits: 4, group_size: 32, scale_dtype: %s}" % (
        "bf16" if fmt == "compressed-tensors" else "fp16")
    quantize(tmp_path / "src", recipe(weights=weights), tmp_path / "direct",
             RunOptions(output_format=fmt, dtype=torch.float32))
    quantize(tmp_path / "src", recipe(weights=weights), tmp_path / "native",
             RunOptions(dtype=torch.float32))
    convert(tmp_path / "native", tmp_path / "converted", fmt)
    for folder in ("direct", "converted"):
        dtypes = stored_dtypes(tmp_path / folder)
        assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
        assert dtypes["model.norm.weight"] == torch.bfloat16
        assert dtypes["lm_head.weight"] == torch.bfloat16
    assert (tmp_path / "direct" / "model.safetensors").read_bytes() == \
        (tmp_path / "converted" / "model.safetensors").read_bytes()


def test_fp16_overflow_is_refused_and_nothing_is_written(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = 70000.0
    model.save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    with pytest.raises(RecipeError, match=r"storage_dtype fp16: tensor "
                       r"'model\.layers\.1\.post_attention_layernorm\.weight' holds 70000"):
        quantize(tmp_path / "src", recipe("storage_dtype: fp16\n"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # bf16 holds it: the rerun writes the artifact
    quantize(tmp_path / "src", recipe("storage_dtype: bf16\n"), tmp_path / "out")
    assert float_parts(stored_dtypes(tmp_path / "out")) == {torch.bfloat16}


def test_stored_dense_leaves_integers_and_fp8_alone_and_refuses_overflow():
    ids = torch.arange(4)
    assert stored_dense("ids", ids, "fp16") is ids
    fp8 = torch.ones(2, dtype=torch.float8_e4m3fn)
    assert stored_dense("x", fp8, "bf16") is fp8
    assert stored_dense("x", torch.tensor([1.5, -2.0]), "fp16").dtype == torch.float16
    assert stored_dense("x", torch.tensor([1.0]), None).dtype == torch.float32
    with pytest.raises(RecipeError, match="65504"):
        stored_dense("x", torch.tensor([1.0, -1e5]), "fp16")


def test_source_dtype_comes_from_the_stored_tensors_over_config_json(tmp_path):
    save_source(tmp_path / "src", torch.bfloat16)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    lying = {**config, "dtype": "float32", "torch_dtype": "float32"}
    weight_map = source_weight_map(tmp_path / "src")
    assert source_storage_dtype(tmp_path / "src", weight_map, lying) == "bf16"
    assert source_storage_dtype(tmp_path / "src", {}, {"torch_dtype": "float16"}) == "fp16"
    assert source_storage_dtype(tmp_path / "src", {}, {}) == "fp32"


@pytest.mark.parametrize("value", ["int8", "float16", 16])
def test_bad_storage_dtype_is_a_recipe_error(value):
    with pytest.raises(RecipeError, match="storage_dtype"):
        recipe(f"storage_dtype: {value}\n")


def test_mpq_plan_shows_the_resolved_storage_dtype(tmp_path):
    from tests.helpers import run_cli

    save_source(tmp_path / "src", torch.bfloat16)
    shown = run_cli("plan", tmp_path / "src", "-r", "w4a16")
    assert shown.exit_code == 0, shown.output
    assert "stored in bf16" in shown.stdout
    data = run_cli("plan", tmp_path / "src", "-r", "w4a16", "--json")
    assert json.loads(data.stdout)["storage_dtype"] == "bf16"


@pytest.mark.parametrize("fmt, source, scale_dtype, warned", [
    ("gptq", torch.float32, "fp32", True), ("gptq", torch.float32, "bf16", True),
    ("gptq", torch.bfloat16, "fp16", False),
    ("compressed-tensors", torch.bfloat16, "fp32", True),
    ("compressed-tensors", torch.bfloat16, "fp16", True),
    ("compressed-tensors", torch.bfloat16, "bf16", False),
    ("compressed-tensors", torch.float32, "fp32", False),
    ("compressed-tensors", torch.float32, "fp16", False)])
def test_writers_warn_when_they_would_round_the_scales(fmt, source, scale_dtype, warned,
                                                       tmp_path):
    from mpq.engine.spec import resolve_run

    save_source(tmp_path / "src", source)
    weights = "{format: int, bits: 4, group_size: 32, scale_dtype: %s}" % scale_dtype
    spec = resolve_run(tmp_path / "src", recipe(weights=weights), RunOptions(output_format=fmt))
    rounding = [w for w in spec.warnings if w.startswith("scales:")]
    assert bool(rounding) == warned, spec.warnings
    if warned:
        assert "scale_dtype: " + ("fp16" if fmt == "gptq" else "bf16") in rounding[0]
        with pytest.raises(FormatError, match="--strict"):
            resolve_run(tmp_path / "src", recipe(weights=weights),
                        RunOptions(output_format=fmt, strict=True))

"""The family records (mpq.models.families): the registry's rules, and every record checked on a
tiny model of each model type it covers.

Exactness is checked where the parts are used: scale groups fold with random positive scales
without changing the logits (tests/transforms/test_scale_fold.py, on every tiny model whose
family has scale groups), rotation keeps the float logits (tests/rotation/test_quarot.py, every
family with rotation), the KV tap sees what the cache stores (tests/quantizers/test_kv_cache.py,
every family with attention).  Here: the paths exist and are what they claim to be, and the
records agree with the generic discoveries the code used before them.
"""
from __future__ import annotations

import pytest
import torch
import transformers

from mpq.analysis.ranges import MLP_DOWN_NAMES
from mpq.engine.collect import input_groups
from mpq.engine.runner import capture_block_inputs
from mpq.models.attention import attention_modules, discover_attention
from mpq.models.families import FAMILIES, family_of
from mpq.models.family import Attention, Family, FamilyRegistry, Requires, Rotation, ScaleGroup
from mpq.models.layout import discover_blocks_path, is_linear, layout_of, weight_of
from mpq.registry import RegistryError
from tests.tiny_models import (ARCHITECTURES, COMMON, MOE_ARCHITECTURES, RECORD_ARCHITECTURES,
                               model_from_config, tiny_config, tiny_model)

# model_type → a tiny architecture of that type (the first one listed)
TINY_FOR_TYPE: dict[str, str] = {}
for _arch in ARCHITECTURES + RECORD_ARCHITECTURES + MOE_ARCHITECTURES:
    TINY_FOR_TYPE.setdefault(tiny_config(_arch).model_type, _arch)
MODEL_TYPES = tuple(FAMILIES.model_types())


_NONE = (("attention", "a"), ("scale_groups", "s"), ("rotation", "r"))


def _record(name="fam", **fields) -> Family:
    """A record; the optional parts it does not give are refused with a placeholder reason."""
    unsupported = tuple((part, why) for part, why in _NONE if not fields.get(part))
    return Family(**{"name": name, "model_types": (name,), "blocks": "layers",
                     "norm": "rmsnorm", "unsupported": unsupported, **fields})


def _first_block(model):
    return model.get_submodule(family_of(model).blocks)[0]


def _linear(block, path):
    module = block.get_submodule(path)
    assert is_linear(module), f"{path} is {type(module).__name__}, not a linear"
    return module


# --- the registry ---------------------------------------------------------------------------

def test_registry_refuses_duplicates_and_lists_known_names():
    registry = FamilyRegistry()
    first = registry.register(_record("a", model_types=("a", "a2")))
    assert registry.get("a") is first and registry.for_model_type("a2") is first
    assert registry.for_model_type("zzz") is None
    with pytest.raises(RegistryError, match="registered twice"):
        registry.register(_record("a", model_types=("other",)))
    with pytest.raises(RegistryError, match="'a2' is claimed by family 'a' and by family 'b'"):
        registry.register(_record("b", model_types=("b", "a2")))
    assert "b" not in registry and registry.for_model_type("b") is None  # nothing half-added
    with pytest.raises(RegistryError, match="unknown model family 'c'") as info:
        registry.get("c")
    assert info.value.hint == "known: a"
    registry.register(_record("b"))
    assert [f.name for f in registry] == ["a", "b"]  # registration order
    assert list(registry.model_types()) == ["a", "a2", "b"]


def test_a_record_that_contradicts_itself_is_refused():
    with pytest.raises(ValueError, match="norm"):
        _record(norm="batchnorm")
    with pytest.raises(ValueError, match="no model type"):
        _record(model_types=())
    with pytest.raises(ValueError, match="prev_kind 'layernorm'"):
        _record(scale_groups=(ScaleGroup("ln", ("fc",), "layernorm"),))
    with pytest.raises(ValueError, match="rotation needs"):
        _record(rotation=Rotation(readers=(), writers=(), final_norm="norm"))
    with pytest.raises(ValueError, match="not inside attention"):
        Attention(path="attn", q_proj="attn.q", k_proj="attn.k", v_proj="v", o_proj="attn.o")
    with pytest.raises(ValueError, match="either q_proj, k_proj and v_proj or one fused"):
        Attention(path="attn", q_proj="attn.q", qkv_proj="attn.qkv", o_proj="attn.o")
    with pytest.raises(ValueError, match="either q_proj, k_proj and v_proj or one fused"):
        Attention(path="attn", q_proj="attn.q", k_proj="attn.k", o_proj="attn.o")
    fused = Attention(path="attn", qkv_proj="attn.qkv", o_proj="attn.o")
    assert fused.projections == ("attn.qkv", "attn.o") and fused.scores == ("attn.qkv",)
    with pytest.raises(ValueError, match="has no rotation and no reason why"):
        _record(unsupported=_NONE[:2])
    with pytest.raises(ValueError, match="has scale_groups and a reason"):
        _record(scale_groups=(ScaleGroup("ln", ("fc",), "rmsnorm"),), unsupported=_NONE)
    with pytest.raises(ValueError, match="unsupported names \\['kv'\\]"):
        _record(unsupported=_NONE + (("kv", "?"),))


@pytest.mark.parametrize("family", list(FAMILIES), ids=lambda f: f.name)
def test_every_family_has_each_part_or_says_why_not(family):
    """The issue's list of families is covered, and every part a record lacks has a reason."""
    for part in ("attention", "scale_groups", "rotation"):
        assert bool(getattr(family, part)) != bool(family.why_not(part)), part
        assert family.why_not(part) is None or len(family.why_not(part)) > 20


def test_the_families_users_quantize_have_records():
    wanted = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2",
              "gemma3_text", "phi3", "olmo2", "granite", "gpt2", "opt", "falcon", "gpt_neox"}
    assert wanted <= set(MODEL_TYPES)


def test_requires_reads_the_config_with_a_default():
    pre_ln = Requires("do_layer_norm_before", (True,), True)
    assert pre_ln.holds(tiny_config("opt")) and pre_ln.holds(object())
    config = tiny_config("opt")
    config.do_layer_norm_before = False
    assert not pre_ln.holds(config)


def test_every_model_type_has_a_tiny_model():
    assert set(MODEL_TYPES) <= set(TINY_FOR_TYPE), "add a tiny config to tests/tiny_models.py"


# --- each record on its tiny models ---------------------------------------------------------

@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_block_path_is_what_discovery_finds(model_type):
    model = tiny_model(TINY_FOR_TYPE[model_type])
    family = family_of(model)
    assert isinstance(model.get_submodule(family.blocks), torch.nn.ModuleList)
    assert discover_blocks_path(model) == family.blocks


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_path_of_the_record_exists(model_type):
    model = tiny_model(TINY_FOR_TYPE[model_type])
    family, block = family_of(model), _first_block(model)
    norm_class = "RMSNorm" if family.norm.startswith("rmsnorm") else "LayerNorm"
    for group in family.scale_groups:
        prev = block.get_submodule(group.prev)
        if group.prev_kind == "linear":
            _linear(block, group.prev)
        else:
            assert type(prev).__name__.endswith(norm_class), (group.prev, type(prev).__name__)
        assert len({weight_of(_linear(block, p)).shape[1] for p in group.linears}) == 1
    if family.mlp_down is not None:
        _linear(block, family.mlp_down)
    if family.attention is not None:
        for path in family.attention.projections:
            _linear(block, path)
    if family.rotation is not None:
        for norm, readers in family.rotation.readers:
            assert type(block.get_submodule(norm)).__name__.endswith(norm_class)
            for path in readers:
                _linear(block, path)
        for path in family.rotation.writers:
            _linear(block, path)
        assert type(model.get_submodule(family.rotation.final_norm)).__name__.endswith(norm_class)
    for group in family.fused:
        for path in group:
            _linear(block, path)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_attention_record_agrees_with_generic_discovery(model_type):
    """The record names the module the old guess (k_proj + v_proj + a cache argument) found;
    with q/k/v fused into one linear the guess finds nothing and the record names the module
    holding the fused projection."""
    model = tiny_model(TINY_FOR_TYPE[model_type])
    block = _first_block(model)
    guessed = discover_attention(block)
    recorded = attention_modules(model, block)
    attention = family_of(model).attention
    assert bool(recorded) == (attention is not None)
    if attention is not None and attention.fused:
        assert guessed == [] and recorded == [(attention.path, block.get_submodule(attention.path))]
        assert block.get_submodule(attention.qkv_proj) in list(recorded[0][1].modules())
    else:
        assert [(n, id(m)) for n, m in recorded] == [(n, id(m)) for n, m in guessed]


def test_a_record_whose_attention_does_not_fit_the_block_is_an_error():
    from mpq.errors import ModelError

    llama = tiny_config("llama")
    with pytest.raises(ModelError, match="has no attention module 'self_attn'") as info:
        attention_modules(llama, tiny_model("gpt2").transformer.h[0])
    assert "family 'llama'" in info.value.hint
    block = torch.nn.Module()
    block.self_attn = torch.nn.Linear(4, 4)
    with pytest.raises(ModelError, match="'self_attn' \\(Linear\\) takes no KV-cache argument"):
        attention_modules(llama, block)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_mlp_down_agrees_with_the_name_heuristic(model_type):
    """Range profiling's name heuristic (for types without a record) picks the record's
    mlp_down and nothing else in a block."""
    model = tiny_model(TINY_FOR_TYPE[model_type])
    block = _first_block(model)
    by_name = {name for name, module in block.named_modules() if is_linear(module)
               and (name.rsplit(".", 1)[-1] in MLP_DOWN_NAMES or name.endswith("mlp.c_proj"))}
    family = family_of(model)
    assert by_name == ({family.mlp_down} if family.mlp_down else set())


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if FAMILIES.for_model_type(t).fused])
def test_fused_layers_read_one_input(model_type):
    """A serving engine can run a fused group as one GEMM only if its linears read the same
    tensor: each group lies inside one of the block's shared-input groups."""
    model = tiny_model(TINY_FOR_TYPE[model_type])
    family, block = family_of(model), _first_block(model)
    names = {name: name for name, module in block.named_modules() if is_linear(module)}
    with torch.no_grad():
        inputs = capture_block_inputs(model, layout_of(model), [torch.randint(0, 256, (1, 8))])
        shared = [set(group) for group in input_groups(block, names, inputs[0])]
    for group in family.fused:
        assert any(set(group) <= members for members in shared), (group, shared)


# --- a model type without a record ----------------------------------------------------------

def test_a_model_type_without_a_record_falls_back_to_generic_discovery():
    """Blocks, the KV-cache attention and range profiling's MLP down projection are found by
    discovery; scale folding and rotation refuse it with the missing mapping named."""
    from mpq.analysis.ranges import RangeProfiler
    from mpq.errors import ModelError
    from mpq.rotation.quarot import check_supported
    from mpq.transforms.scale_fold import scale_groups

    config = transformers.Starcoder2Config(hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           bos_token_id=0, eos_token_id=1, **COMMON)
    model = model_from_config(config)
    assert family_of(model) is None, "starcoder2 has a record now: pick a type without one"
    layout = layout_of(model)
    assert (layout.blocks_path, layout.num_blocks) == ("model.layers", 2)
    block = model.model.layers[0]
    (name, module), = attention_modules(model, block)
    assert name == "self_attn" and module is block.self_attn
    profiler = RangeProfiler(model)
    profiler.run([torch.randint(0, 256, (1, 8))])
    assert {name for kind, name in profiler.stats if kind == "mlp_intermediate"} == {
        "model.layers.0.mlp.c_proj", "model.layers.1.mlp.c_proj"}
    assert {name for kind, name in profiler.stats if kind == "kv_key"} == {
        "model.layers.0.self_attn", "model.layers.1.self_attn"}
    with pytest.raises(ModelError, match="no scale-folding data for model_type 'starcoder2'"):
        scale_groups(model, block)
    with pytest.raises(ModelError, match="QuaRot rotation does not support model type "
                                         "'starcoder2'"):
        check_supported(model)

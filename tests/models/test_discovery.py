"""The architecture report (mpq.models.discovery): each part from the family record, from
generic discovery, or unavailable with its reason; printed by ``mpq plan``, warned about by
``mpq quantize`` when the model runs on generic discovery."""
from __future__ import annotations

import json

import pytest
import transformers

from mpq.config.recipe import load_recipe
from mpq.engine.spec import plan_model
from mpq.models.discovery import DISCOVERED, NO_RECORD, RECORD, UNAVAILABLE, architecture_report
from mpq.models.families import family_of
from tests.helpers import run_cli, write_tokenizer
from tests.tiny_models import (ARCHITECTURES, COMMON, MOE_ARCHITECTURES, RECORD_ARCHITECTURES,
                               model_from_config, tiny_model)


def _starcoder2():
    config = transformers.Starcoder2Config(hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, num_key_value_heads=2,
                                           bos_token_id=0, eos_token_id=1, **COMMON)
    return model_from_config(config)


def _report(model, recipe="w4a16"):
    layout, plan = plan_model(model, load_recipe(recipe))
    return architecture_report(model, layout, plan)


def _parts(report):
    return {part.name: part for part in report.parts}


def test_a_model_without_a_record_says_what_was_discovered():
    model = _starcoder2()
    assert family_of(model) is None, "starcoder2 has a record now: pick a type without one"
    report = _report(model)
    parts = _parts(report)
    assert report.family is None
    assert [p.name for p in report.discovered()] == ["blocks", "KV-cache attention"]
    assert parts["blocks"].detail.startswith("model.layers (2,")
    assert parts["KV-cache attention"].detail == "self_attn"
    for name in ("scale groups", "rotation", "fused groups"):
        assert (parts[name].source, parts[name].detail) == (UNAVAILABLE, NO_RECORD)
    assert "has no family record; generic discovery found blocks" in report.headline()


@pytest.mark.parametrize("arch", ARCHITECTURES + RECORD_ARCHITECTURES + MOE_ARCHITECTURES)
def test_a_recorded_family_discovers_nothing_and_names_every_gap(arch):
    report = _report(tiny_model(arch))
    family = family_of(tiny_model(arch))
    assert report.family == family.name and not report.discovered()
    for part in report.parts:
        assert part.source in (RECORD, UNAVAILABLE) and part.detail
    parts = _parts(report)
    if family.rotation is None:
        assert parts["rotation"].detail == family.why_not("rotation")
    if family.attention is None:
        assert parts["KV-cache attention"].detail == family.why_not("attention")


def test_the_scale_groups_part_names_the_linears_no_group_reaches():
    parts = _parts(_report(tiny_model("olmo2"), "w4a16-awq"))
    detail = parts["scale groups"].detail
    # OLMo 2 has post-norms only; v_proj → o_proj is dropped under grouped-query attention
    assert detail.startswith("mlp.up_proj → mlp.down_proj (inputs not scaled: ")
    assert "self_attn.q_proj" in detail and "mlp.down_proj," not in detail
    llama = _parts(_report(tiny_model("llama")))["scale groups"].detail
    assert "input_layernorm → self_attn.q_proj" in llama


def test_plan_prints_the_report_and_quantize_warns_on_generic_discovery(tmp_path):
    _starcoder2().save_pretrained(tmp_path / "src")
    write_tokenizer(tmp_path / "src")
    shown = run_cli("plan", tmp_path / "src", "-r", "w4a16")
    assert shown.exit_code == 0, shown.output
    assert "  blocks: discovered: model.layers" in shown.output
    data = json.loads(run_cli("plan", tmp_path / "src", "-r", "w4a16", "--json").output)
    assert data["architecture"]["family"] is None
    assert data["architecture"]["parts"][1] == {"part": "KV-cache attention",
                                               "source": DISCOVERED, "detail": "self_attn"}
    done = run_cli("quantize", tmp_path / "src", "-r", "w4a16", "-o", tmp_path / "out")
    assert done.exit_code == 0, done.output
    assert "warning: architecture: model type 'starcoder2' has no family record" in \
        " ".join(done.output.split())
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    recorded = run_cli("quantize", tmp_path / "llama", "-r", "w4a16", "-o", tmp_path / "out2")
    assert recorded.exit_code == 0 and "no family record" not in recorded.output

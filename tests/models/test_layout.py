"""Architecture facts: the family records agree with generic discovery; layer shapes are
[out, in]."""
from __future__ import annotations

import pytest

from mpq.models.families import family_of
from mpq.models.layout import describe_layers, discover_blocks_path, layout_of, weight_of
from tests.tiny_models import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_discovery_agrees_with_the_records(arch):
    model = tiny_model(arch)
    assert discover_blocks_path(model) == family_of(model).blocks
    layout = layout_of(model)
    assert layout.num_blocks == 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layers_have_out_in_shapes_and_the_head_is_protected(arch):
    model = tiny_model(arch)
    layout = layout_of(model)
    layers, others = describe_layers(model, layout)
    by_name = {l.name: l for l in layers}
    assert by_name[layout.head_name].protected and by_name[layout.head_name].block is None
    for layer in layers:
        module = model.get_submodule(layer.name)
        assert tuple(weight_of(module).shape) == layer.shape
        if not layer.protected:
            assert layer.block in (0, 1)
    assert any("Embedding" in cls for cls in others.values())


def test_gpt2_conv1d_is_transposed():
    model = tiny_model("gpt2")
    layers, _ = describe_layers(model, layout_of(model))
    c_attn = next(l for l in layers if l.name.endswith("0.attn.c_attn"))
    assert c_attn.class_name == "Conv1D" and c_attn.shape == (192, 64)

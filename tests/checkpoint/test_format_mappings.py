"""Each number format's checkpoint records against the writers that read them: where a format is
expressible, the bytes its object counts (``stored_bytes``, what the estimate and mixed precision
use) are the bytes the writer produces; where not, the writer refuses the layer with the record's
reason."""
from __future__ import annotations

import pytest
import torch

from mpq.checkpoint import compressed_tensors, gptq_v1
from mpq.config.plan import LayerPlan, Plan
from mpq.config.scheme import LayerScheme
from mpq.numerics.args import ActivationArgs, WeightArgs
from mpq.numerics.format import NUMBER_FORMATS, format_names
from mpq.numerics.mappings import CompressedTensorsMapping, GptqV1Mapping, NotExpressible
from tests.numerics.test_formats import CASES, SHAPES, _id, fitting

INPUTS = ActivationArgs(format="int", bits=8)


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _plan(scheme: LayerScheme, shape) -> Plan:
    layer = LayerPlan(name="model.layers.0.mlp.up_proj", class_name="Linear", shape=shape,
                      block=0, scheme=scheme, rule=0, reason="rule 0")
    return Plan(recipe_name="test", layers=[layer], precision_policy={})


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_compressed_tensors_bytes_are_what_the_writer_stores(case, shape):
    name, args = case
    fmt = NUMBER_FORMATS.get(name)
    mapping = fmt.compressed_tensors
    shape = fitting(name, shape)
    qw = fmt.quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), args)
    for inputs in (None, INPUTS):
        scheme = LayerScheme(weights=args, input_activations=inputs)
        layer = _plan(scheme, shape).layers[0]
        why = compressed_tensors.why_unsupported(layer)
        if isinstance(mapping, NotExpressible):
            assert why == mapping.reason
            continue
        if why is not None:  # e.g. asymmetric per-tensor int, microscaled with inputs
            continue
        for dtype in (torch.float32, torch.bfloat16):
            tensors = compressed_tensors.layer_tensors(qw, scheme, dtype)
            expected = fmt.stored_bytes(args, shape, "compressed-tensors",
                                        dtype_bytes=dtype.itemsize,
                                        quantized_inputs=inputs is not None)
            assert _bytes(tensors) == expected
        assert compressed_tensors.layer_format(scheme) == mapping.layer_format(inputs is not None)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_gptq_v1_bytes_are_what_the_writer_stores(case, shape):
    name, args = case
    fmt = NUMBER_FORMATS.get(name)
    shape = fitting(name, shape)
    problems = gptq_v1.GPTQ_V1.unsupported(_plan(LayerScheme(weights=args), shape))
    if isinstance(fmt.gptq_v1, NotExpressible):
        assert problems == [f"model.layers.0.mlp.up_proj: {fmt.gptq_v1.reason}"]
        return
    assert isinstance(fmt.gptq_v1, GptqV1Mapping)
    if problems or not args.symmetric:  # unsupported widths; a zero point of 0 is refused
        return
    qw = fmt.quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(0)), args)
    tensors, _ = gptq_v1.layer_tensors("p", qw)
    assert _bytes(tensors) == fmt.stored_bytes(args, shape, "gptq")


def test_the_writers_name_no_number_format():
    """Only the records decide: every format without a compressed-tensors mapping is refused."""
    expressible = format_names(lambda f: isinstance(f.compressed_tensors,
                                                    CompressedTensorsMapping))
    assert {"int", "fp8_e4m3", "mxfp4", "mxfp8", "nvfp4"} <= set(expressible)
    assert "nf4" not in expressible and "fp8_e5m2" not in expressible
    assert format_names(lambda f: isinstance(f.gptq_v1, GptqV1Mapping)) == ["int"]
    args = WeightArgs(format="nf4", bits=4, group_size=64)
    assert compressed_tensors.COMPRESSED_TENSORS.unsupported(
        _plan(LayerScheme(weights=args), (8, 128))) == [
        "model.layers.0.mlp.up_proj: nf4 weights have no compressed-tensors format mpq writes"]

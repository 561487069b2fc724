"""The number-format objects as pure tensor functions, for every registered format: their facts,
validation and defaults agree with WeightArgs, and describe / native_bytes / ideal_bits agree with
what encode actually writes, for several shapes.  A new format is covered by registering it."""
from __future__ import annotations

from dataclasses import asdict, fields

import pytest
import torch

from mpq.errors import ArtifactError, SchemeError
from mpq.numerics.args import GRANULARITIES, WeightArgs
from mpq.numerics.format import NUMBER_FORMATS, NumberFormat, format_names
from mpq.numerics.mappings import (CompressedTensorsMapping, GptqV1Mapping, NotExpressible)

NAMES = format_names()
SHAPES = [(8, 256), (40, 128), (130, 384)]  # N not a multiple of 32 or 128: padding, tiles


def default_args(name: str) -> WeightArgs:
    """What ``weights: {format: NAME}`` alone gives over the recipe defaults."""
    fmt = NUMBER_FORMATS.get(name)
    merged = {**asdict(WeightArgs()), "format": name}
    merged.update(fmt.implied_weights(merged))
    if merged["granularity"] != "group":
        merged["group_size"] = None
    return WeightArgs(**merged)


def variants(name: str) -> list[WeightArgs]:
    """The default args plus every granularity and symmetry the format takes."""
    fmt = NUMBER_FORMATS.get(name)
    base = default_args(name)
    out = [base]
    if fmt.block is None:
        for granularity in fmt.granularities:
            size = 64 if granularity == "group" else None
            for symmetric in (True,) if fmt.symmetric_only else (True, False):
                args = WeightArgs(**{**asdict(base), "granularity": granularity,
                                     "group_size": size, "symmetric": symmetric})
                if args not in out:
                    out.append(args)
    if fmt.double_quant:
        out.append(WeightArgs(**{**asdict(base), "double_quant": True}))
    if fmt.full_range:
        out.append(WeightArgs(**{**asdict(base), "symmetric": True, "full_range": True}))
    return out


CASES = [(name, args) for name in NAMES for args in variants(name)]


def _id(case) -> str:
    return f"{case[0]}:{case[1].describe()}:{case[1].symmetric}"


def fitting(name: str, shape: tuple[int, int]) -> tuple[int, int]:
    """``shape``, or (N, 2 · block) where the format's fixed block does not divide its K
    (GGUF's K-quants: 256)."""
    block = NUMBER_FORMATS.get(name).block
    return (shape[0], 2 * block) if block is not None and shape[1] % block else shape


def _weight(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_every_format_once_in_order():
    assert NAMES[:7] == ["int", "fp8_e4m3", "fp8_e5m2", "nf4", "mxfp4", "mxfp8", "nvfp4"]
    assert sorted(NAMES) == list(NUMBER_FORMATS)
    for name in NAMES:
        fmt = NUMBER_FORMATS.get(name)
        assert isinstance(fmt, NumberFormat) and fmt.name == name


@pytest.mark.parametrize("name", NAMES)
def test_facts_are_consistent(name):
    fmt = NUMBER_FORMATS.get(name)
    assert set(fmt.granularities) <= set(GRANULARITIES) and fmt.granularities
    if fmt.block is not None:
        # a fixed block fixes the symmetry too (symmetric, or a block min as GGUF's _1 types)
        assert fmt.bits is not None and fmt.granularities == ("group",)
        assert "symmetric" in fmt.implied_weights({})
    assert isinstance(fmt.compressed_tensors, (CompressedTensorsMapping, NotExpressible))
    assert isinstance(fmt.gptq_v1, (GptqV1Mapping, NotExpressible))
    for mapping in (fmt.compressed_tensors, fmt.gptq_v1):
        if isinstance(mapping, NotExpressible):
            assert mapping.reason.startswith(name)
    grid = fmt.gptq_columns
    if grid is not None:
        assert isinstance(grid.act_order, bool) and isinstance(grid.clip_search, bool)
        for method in ("check", "set_group", "column", "params"):
            assert callable(getattr(grid, method))


@pytest.mark.parametrize("name", NAMES)
def test_format_alone_is_a_complete_weights_entry(name):
    args = default_args(name)
    assert args.format == name
    assert NUMBER_FORMATS.get(name).describe(args) == args.describe()
    assert args.describe().startswith(NUMBER_FORMATS.get(name).bits_label(args.bits))


@pytest.mark.parametrize("name", NAMES)
def test_validation_delegates_to_the_format(name):
    fmt = NUMBER_FORMATS.get(name)
    base = asdict(default_args(name))
    if fmt.bits is not None:
        wrong = 3 if fmt.bits != 3 else 4
        with pytest.raises(SchemeError, match=f"{name} has {fmt.bits} bits, got {wrong}"):
            WeightArgs(**{**base, "bits": wrong})
    if fmt.symmetric_only:
        with pytest.raises(SchemeError, match="symmetric only"):
            WeightArgs(**{**base, "symmetric": False})
    if fmt.block is not None:
        with pytest.raises(SchemeError, match=f"uses blocks of {fmt.block}"):
            WeightArgs(**{**base, "group_size": fmt.block * 2})
    if "block" not in fmt.granularities:
        with pytest.raises(SchemeError, match="granularity 'block'"):
            WeightArgs(**{**base, "granularity": "block", "group_size": None})
    if not fmt.double_quant:
        with pytest.raises(SchemeError, match="double_quant applies to"):
            WeightArgs(**{**base, "double_quant": True})


def test_unknown_format_lists_the_registered_ones_in_order():
    with pytest.raises(SchemeError) as exc:
        WeightArgs(format="int3")
    assert exc.value.hint == f"use one of {', '.join(NAMES)}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_sizes_agree_with_what_encode_writes(case, shape):
    name, args = case
    fmt = NUMBER_FORMATS.get(name)
    shape = fitting(name, shape)
    qw = fmt.quantize(_weight(shape), args)
    assert qw.shape == shape and qw.args == args
    tensors = fmt.encode(qw)
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    assert fmt.native_bytes(args, shape) == written
    assert fmt.stored_bytes(args, shape, "mpq") == written
    ideal = fmt.ideal_bits(args, shape) * shape[0] * shape[1] / 8
    assert ideal - 1e-6 <= written <= ideal + 4 * (shape[0] + 8)  # word padding only
    back = fmt.decode(tensors, args, shape, "p.")
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(back.dequantize(dtype), fmt.dequantize(qw, dtype))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_decode_names_a_missing_tensor(case):
    name, args = case
    fmt = NUMBER_FORMATS.get(name)
    tensors = fmt.encode(fmt.quantize(_weight((8, 256)), args))
    for key in tensors:
        partial = {k: v for k, v in tensors.items() if k != key}
        with pytest.raises(ArtifactError, match=f"missing tensor 'layer.{key}'"):
            fmt.decode(partial, args, (8, 256), "layer.")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_rtn_keeps_zeros_and_signs(case):
    """Every grid that says it holds 0 does: zero weights stay exactly zero and no weight
    changes sign (GGUF's _1 types offset their levels by a float min, so 0 is not on them)."""
    name, args = case
    fmt = NUMBER_FORMATS.get(name)
    if not fmt.holds_zero:
        pytest.skip(f"{name} has no exact zero")
    w = _weight((16, 256), seed=1)
    w[:, :64] = 0
    w[3] = 0
    deq = fmt.quantize(w, args).dequantize()
    assert bool(torch.isfinite(deq).all())
    assert torch.equal(deq[w == 0], torch.zeros(int((w == 0).sum())))
    assert bool((deq * w >= 0).all())


def test_every_weight_field_is_checked_by_the_formats():
    # a format object sees the whole WeightArgs: no field the formats do not know about
    assert [f.name for f in fields(WeightArgs)] == ["format", "bits", "symmetric", "granularity",
                                                   "group_size", "double_quant", "scale_dtype",
                                                   "full_range"]

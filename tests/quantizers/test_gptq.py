"""The ``gptq`` quantizer: registration, option checking, and the QuantizedWeight it assembles."""
from __future__ import annotations

import pytest
import torch

import mpq.quantizers  # noqa: F401
from mpq.errors import SchemeError
from mpq.quantizers.base import QUANTIZERS
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve
from mpq.numerics.args import WeightArgs
from mpq.config.scheme import LayerScheme

GPTQ = QUANTIZERS.get("gptq")
INT4_G32 = WeightArgs(bits=4, group_size=32)
INT4_ASYM_G32 = WeightArgs(bits=4, symmetric=False, group_size=32)
INT3_ASYM_CH = WeightArgs(bits=3, symmetric=False, granularity="channel", group_size=None)
FP8_CH = WeightArgs(format="fp8_e4m3", bits=8, granularity="channel", group_size=None)
NF4 = WeightArgs(format="nf4", bits=4, group_size=64)


def scheme(args: WeightArgs = INT4_G32, **options) -> LayerScheme:
    return LayerScheme("gptq", args, tuple(sorted(options.items())))


def calib(n: int = 16, k: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    col_scale = 1 + torch.randperm(k, generator=g).float() / k
    x = (torch.randn(4 * k, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g)
                                                / k**.5)) * col_scale
    return torch.randn(n, k, generator=g), 2 / x.shape[0] * x.T @ x


def test_registered():
    assert GPTQ.name == "gptq" and GPTQ.needs == frozenset({"hessian"})


def test_check_accepts_valid_options():
    GPTQ.check(scheme())
    GPTQ.check(scheme(damp=0, block_size=64, act_order=True, static_groups=True, max_damp=2))
    GPTQ.check(scheme(FP8_CH, damp=0.1))
    GPTQ.check(scheme(NF4, block_size=32))
    assert GPTQOptions.from_scheme(scheme(damp=1)).damp == 1.0


@pytest.mark.parametrize("options,match", [
    ({"dampp": 0.1}, "unknown gptq option 'dampp'"),
    ({"damp": "0.1"}, "damp must be a number"),
    ({"damp": True}, "damp must be a number"),
    ({"damp": float("nan")}, "finite"),
    ({"damp": -0.1}, "damp must be ≥ 0"),
    ({"block_size": 1.5}, "block_size must be an integer"),
    ({"block_size": 0}, "block_size must be ≥ 1"),
    ({"act_order": 1}, "act_order must be true or false"),
    ({"static_groups": "yes"}, "static_groups must be true or false"),
    ({"damp": 0.5, "max_damp": 0.1}, "max_damp"),
])
def test_check_rejects_bad_options(options, match):
    with pytest.raises(SchemeError, match=match) as exc:
        GPTQ.check(scheme(**options))
    if "dampp" in options:
        assert exc.value.hint == "did you mean 'damp'?"


@pytest.mark.parametrize("args,options,match", [
    (NF4, {"act_order": True}, "act_order"),
    (FP8_CH, {"act_order": True}, "act_order"),
    (WeightArgs(format="nf4", bits=4, group_size=64, double_quant=True), {}, "double_quant"),
    (INT3_ASYM_CH, {"static_groups": True}, "static_groups"),
    (WeightArgs(format="mxfp4", bits=4, group_size=32), {}, "does not support the mxfp4 format"),
    (WeightArgs(format="mxfp8", bits=8, group_size=32), {}, "does not support the mxfp8 format"),
    (WeightArgs(format="nvfp4", bits=4, group_size=16), {}, "does not support the nvfp4 format"),
    (WeightArgs(format="fp8_e4m3", bits=8, granularity="block", group_size=None), {},
     "granularity 'block'"),
])
def test_check_rejects_unsupported_combinations(args, options, match):
    with pytest.raises(SchemeError, match=match) as exc:
        GPTQ.check(scheme(args, **options))
    assert exc.value.hint


@pytest.mark.parametrize("args,options", [
    (INT4_G32, {}),
    (INT4_ASYM_G32, {"act_order": True}),
    (INT4_ASYM_G32, {"act_order": True, "static_groups": True}),
    (INT3_ASYM_CH, {"act_order": True, "block_size": 16}),
    (FP8_CH, {}),
    (NF4, {}),
], ids=["int4", "int4-act", "int4-act-static", "int3-ch-act", "fp8", "nf4"])
def test_quantize_dequantizes_to_the_solve(args, options):
    w, h = calib()
    before = h.clone()
    qw = GPTQ.quantize(w.to(torch.bfloat16), scheme(args, **options), {"hessian": h})
    assert torch.equal(h, before)
    res = gptq_solve(w.to(torch.bfloat16).float(), h, args, GPTQOptions(**options))
    assert qw.args == args and qw.shape == (16, 128)
    assert torch.equal(qw.dequantize(), res.q)  # bit-exact: the codes are the solve's
    act = options.get("act_order", False)
    assert (qw.g_idx is not None) == (act and args.granularity == "group")
    assert set(qw.info) == {"gptq_loss", "damp", "damp_retries", "act_order"}
    assert qw.info["act_order"] is act and qw.info["damp"] == 0.01
    assert qw.info["damp_retries"] == 0 and qw.info["gptq_loss"] == pytest.approx(res.loss)
    assert isinstance(qw.info["gptq_loss"], float)


def test_quantize_reports_damping_retries():
    w, h = calib(k=64)
    shift = torch.linalg.eigvalsh(h)[0] + 0.02 * h.diagonal().mean()  # λ_min → −0.02·mean diag
    h = h - shift * torch.eye(64)
    qw = GPTQ.quantize(w, scheme(damp=0.01), {"hessian": h})
    assert qw.info["damp"] > 0.01 and qw.info["damp_retries"] >= 1


def test_quantize_errors():
    w, h = calib()
    with pytest.raises(SchemeError, match="hessian"):
        GPTQ.quantize(w, scheme(), {})
    with pytest.raises(SchemeError, match="Hessian shape"):
        GPTQ.quantize(w, scheme(), {"hessian": h[:64, :64]})
    with pytest.raises(SchemeError, match="NaN"):
        GPTQ.quantize(w * float("nan"), scheme(), {"hessian": h})

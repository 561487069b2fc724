"""The autoround quantizer's pieces on tensors: the tuned int grid, its options, plan-time checks
and the signed-gradient loop."""
from __future__ import annotations

import math

import pytest
import torch

from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError
from mpq.numerics.activations import ActivationArgs
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS
from mpq.quantizers.autoround import AUTOROUND, is_block_level
from mpq.quantizers.autoround_grid import TunedIntWeight
from mpq.quantizers.autoround_options import AutoRoundOptions
from mpq.quantizers.autoround_solve import IndexSampler, sign_descent

ARGS = [WeightArgs(bits=4, symmetric=True, granularity="group", group_size=16),
        WeightArgs(bits=3, symmetric=False, granularity="group", group_size=16),
        WeightArgs(bits=2, symmetric=False, granularity="channel", group_size=None),
        WeightArgs(bits=4, symmetric=True, granularity="tensor", group_size=None),
        WeightArgs(bits=4, symmetric=True, granularity="group", group_size=16,
                   scale_dtype="fp16")]


def scheme(options: dict | None = None, **weights) -> LayerScheme:
    args = WeightArgs(**{"bits": 4, "group_size": 16, **weights})
    return LayerScheme(algorithm="autoround", weights=args,
                       options=tuple(sorted((options or {}).items())))


@pytest.mark.parametrize("args", ARGS, ids=lambda a: f"{a.bits}{a.symmetric}{a.granularity}"
                         f"{a.scale_dtype}")
def test_untuned_export_is_round_to_nearest_bit_for_bit(args):
    w = torch.randn(24, 64) * torch.rand(24, 1)
    rtn = NUMBER_FORMATS.get("int").quantize(w, args)
    tuned = TunedIntWeight(w, args).export()
    assert torch.equal(tuned.codes, rtn.codes) and torch.equal(tuned.scale, rtn.scale)
    assert (tuned.zero is None) == (rtn.zero is None)
    if rtn.zero is not None:
        assert torch.equal(tuned.zero, rtn.zero)


@pytest.mark.parametrize("args", ARGS[:3], ids=["sym-g", "asym-g", "asym-channel"])
def test_forward_weight_is_the_exported_weight(args):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    tuned = TunedIntWeight(w, args)
    with torch.no_grad():
        tuned.v.uniform_(-0.7, 0.7)
        for factor in tuned.clipping:
            factor.uniform_(0.3, 1.2)
    tuned.project()
    assert float(tuned.v.detach().abs().max()) <= 0.5
    assert all(0.5 <= float(f.detach().min()) and float(f.detach().max()) <= 1.0
               for f in tuned.clipping)
    exported = tuned.export().dequantize(torch.float32)
    assert torch.allclose(tuned.dequantized().detach(), exported, atol=1e-6)
    assert not torch.equal(exported, NUMBER_FORMATS.get("int").quantize(w, args).dequantize())


def test_gradients_reach_offsets_and_clipping_factors():
    tuned = TunedIntWeight(torch.randn(8, 32), WeightArgs(bits=3, symmetric=False, group_size=16))
    tuned.dequantized().pow(2).sum().backward()
    assert tuned.v.grad is not None and tuned.v.grad.abs().sum() > 0
    assert len(tuned.clipping) == 2 and all(f.grad.abs().sum() > 0 for f in tuned.clipping)
    assert TunedIntWeight(torch.randn(8, 32), ARGS[0], clip=False).clipping == []


def test_effort_settings_and_overrides():
    light = AutoRoundOptions.from_scheme(scheme({"effort": "light"}))
    assert (light.iters, light.batch_size, light.lr, light.minmax_lr) == (30, 1, 1e-2, 1e-2)
    default = AutoRoundOptions.from_scheme(scheme())
    assert default.effort == "default" and default.lr == pytest.approx(1 / 200)
    best3 = AutoRoundOptions.from_scheme(scheme({"effort": "best"}, bits=3))
    assert (best3.iters, best3.batch_size, best3.lr) == (1000, 8, pytest.approx(2 / 1000))
    best4 = AutoRoundOptions.from_scheme(scheme({"effort": "best"}))
    assert best4.lr == pytest.approx(1 / 1000)
    mine = AutoRoundOptions.from_scheme(scheme({"effort": "light", "iters": 10, "minmax_lr": 0.1,
                                                "clip": False, "seed": 3}))
    assert (mine.iters, mine.lr, mine.minmax_lr, mine.clip, mine.seed) == (10, 1e-2, 0.1,
                                                                           False, 3)


@pytest.mark.parametrize("options, message", [
    ({"iter": 5}, "unknown autoround option 'iter'"),
    ({"effort": "heavy"}, "effort must be one of light, default, best"),
    ({"iters": -1}, "iters must be an integer ≥ 0"),
    ({"batch_size": 0}, "batch_size must be an integer ≥ 1"),
    ({"iters": True}, "iters must be an integer"),
    ({"lr": 0}, "lr must be a positive number"),
    ({"minmax_lr": float("nan")}, "minmax_lr must be a positive number"),
    ({"clip": "yes"}, "clip must be true or false"),
    ({"error_feedback": 1}, "error_feedback must be true or false"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(SchemeError, match=message):
        AUTOROUND.check(scheme(options))


@pytest.mark.parametrize("weights", [
    {"format": "mxfp4", "bits": 4, "group_size": 32},
    {"format": "nvfp4", "bits": 4, "group_size": 16},
    {"format": "nf4", "bits": 4, "group_size": 64},
    {"format": "fp8_e4m3", "bits": 8, "granularity": "channel", "group_size": None},
], ids=["mxfp4", "nvfp4", "nf4", "fp8"])
def test_other_grids_are_refused_not_rounded_in_silence(weights):
    with pytest.raises(SchemeError, match="autoround supports the int grid only, not "
                       + weights["format"]):
        AUTOROUND.check(scheme(**weights))


def test_input_activations_and_single_layers_are_refused():
    acts = LayerScheme(algorithm="autoround", weights=WeightArgs(bits=8, granularity="channel",
                                                                 group_size=None),
                       input_activations=ActivationArgs(bits=8))
    with pytest.raises(SchemeError, match="weights only"):
        AUTOROUND.check(acts)
    with pytest.raises(SchemeError, match="tunes whole decoder blocks"):
        AUTOROUND.quantize(torch.randn(4, 16), scheme(), {})
    assert is_block_level("autoround") and not is_block_level("gptq")


def test_sampler_covers_every_sample_before_repeating():
    sampler = IndexSampler(10, 4, torch.Generator().manual_seed(0))
    first = sampler.next() + sampler.next()
    assert len(set(first)) == 8
    assert len(sampler.next()) == 4


def _layer_problem(seed: int):
    """A one-linear 'block': x [64, 32] → x Wᵀ; targets with the float weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, generator=gen)
    xs = [torch.randn(8, 32, generator=gen) * torch.linspace(0.1, 3, 32) for _ in range(6)]
    return w, xs, [x @ w.t() for x in xs]


def _descent(iters: int, seed: int = 0):
    w, xs, ys = _layer_problem(0)
    tuned = TunedIntWeight(w, WeightArgs(bits=3, symmetric=True, group_size=16))

    def step_loss(indices):
        loss = sum((xs[i] @ tuned.dequantized().t() - ys[i]).pow(2).mean() for i in indices)
        loss.backward()
        return float(loss.detach())

    opts = AutoRoundOptions.from_scheme(scheme({"iters": iters, "batch_size": 6, "lr": 0.02},
                                               bits=3))
    result = sign_descent([tuned], step_loss, len(xs), opts.batch_size, opts, seed=seed)
    error = sum(float((x @ tuned.export().dequantize().t() - y).pow(2).mean())
                for x, y in zip(xs, ys))
    return result, error, tuned.export()


def test_sign_descent_lowers_the_error_and_is_deterministic():
    rtn_result, rtn_error, rtn = _descent(0)
    assert rtn_result.iters == 0 and math.isnan(rtn_result.init_loss)
    result, error, qw = _descent(60)
    assert error < 0.9 * rtn_error
    assert result.best_loss <= result.init_loss and 0 <= result.best_iter < 60
    again = _descent(60)[2]
    assert torch.equal(again.codes, qw.codes) and torch.equal(again.scale, qw.scale)
    assert not torch.equal(qw.codes, rtn.codes)

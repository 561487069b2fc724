"""GPTQ's error_feedback option (GPTAQ): the solve against the float model's inputs, its option
checks, and a smaller output error than plain GPTQ through the engine on tiny models."""
from __future__ import annotations

import copy

import pytest
import torch

from mpq.config.recipe import parse_recipe
from mpq.config.scheme import LayerScheme
from mpq.errors import SchemeError
from mpq.numerics.args import WeightArgs
from mpq.quantizers.base import QUANTIZERS, scheme_needs
from mpq.quantizers.gptq_options import GPTQOptions
from mpq.quantizers.gptq_solve import gptq_solve
from tests.helpers import logits_error, run_engine, samples_of
from tests.tiny_models import tiny_model

ARGS = WeightArgs(bits=3, group_size=32)


def _problem(seed: int = 0, n: int = 24, k: int = 96, t: int = 1024):
    """W, X (the quantized model's inputs), X̃ = X (I + M) (the float model's: a drift that a
    layer can undo) and H, D as the statistics compute them."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(t, k, generator=gen) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen))
    x_float = x @ (torch.eye(k) + 0.05 * torch.randn(k, k, generator=gen))
    h = (2.0 / t) * x.t() @ x
    d = (2.0 / t) * (x_float - x).t() @ x
    return w, x, x_float, h, d


def _output_error(w, x, x_float, q):
    return float((x_float @ w.t() - x @ q.t()).square().mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_a_zero_cross_term_is_plain_gptq(act_order):
    w, _, _, h, d = _problem()
    plain = gptq_solve(w, h, ARGS, GPTQOptions(act_order=act_order))
    fed = gptq_solve(w, h, ARGS, GPTQOptions(act_order=act_order, error_feedback=True),
                     cross=torch.zeros_like(d))
    assert torch.equal(plain.codes, fed.codes) and torch.equal(plain.scale, fed.scale)
    assert fed.feedback_shift == 0.0 and plain.feedback_shift is None


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_error_feedback_lowers_the_error_against_the_float_output(act_order, seed):
    w, x, x_float, h, d = _problem(seed)
    opts = dict(act_order=act_order, static_groups=act_order)
    plain = _output_error(w, x, x_float, gptq_solve(w, h, ARGS, GPTQOptions(**opts)).q)
    errors = [_output_error(w, x, x_float, gptq_solve(
        w, h, ARGS, GPTQOptions(**opts, error_feedback=True, feedback_alpha=alpha), cross=d).q)
        for alpha in (0.25, 1.0)]
    assert errors[0] < plain and errors[1] < 0.9 * plain


def test_cross_term_of_the_wrong_shape_is_a_scheme_error():
    w, _, _, h, _ = _problem()
    with pytest.raises(SchemeError, match="float_cross shape"):
        gptq_solve(w, h, ARGS, GPTQOptions(error_feedback=True), cross=torch.zeros(3, 3))


@pytest.mark.parametrize("options, message", [
    ((("feedback_alpha", 0.5),), "only applies with error_feedback: true"),
    ((("error_feedback", True), ("feedback_alpha", -1.0)), "feedback_alpha must be ≥ 0"),
    ((("error_feedback", "yes"),), "error_feedback must be true or false"),
])
def test_bad_feedback_options(options, message):
    with pytest.raises(SchemeError, match=message):
        QUANTIZERS.get("gptq").check(LayerScheme("gptq", ARGS, options))


def test_error_feedback_needs_the_cross_statistic():
    gptq = QUANTIZERS.get("gptq")
    assert scheme_needs(gptq, LayerScheme("gptq", ARGS)) == {"hessian"}
    assert scheme_needs(gptq, LayerScheme("gptq", ARGS, (("error_feedback", True),))) == {
        "hessian", "float_cross"}


def _recipe(options: str):
    return parse_recipe("mpq_recipe: 1\ndefaults:\n  algorithm: gptq\n  options: {" + options
                        + "}\nrules:\n  - targets: [Linear, Conv1D]\n"
                        "    weights: {bits: 3, group_size: 16}\n", "ef.yaml")


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_error_feedback_lowers_the_output_error_against_the_float_model(arch, calib_text):
    samples = samples_of(calib_text)
    source = tiny_model(arch)
    errors = {}
    for name, options in (("plain", ""), ("feedback", "error_feedback: true")):
        model = copy.deepcopy(source)
        run = run_engine(model, _recipe(options), samples)
        errors[name] = logits_error(model, source, samples)
        if name == "feedback":
            shifts = [r["feedback_shift"] for r in run.log.layers.values() if "feedback_shift" in r]
            assert len(shifts) == len(run.plan.quantized()) and max(shifts) > 0
            assert run.reference_inputs == {}  # dropped after each block
    assert errors["feedback"] < 0.9 * errors["plain"]

"""Layer sensitivity: the damage of quantizing one layer alone, per candidate scheme, and its cost.

For every quantizable layer inside the decoder blocks (the Linear layers that every candidate
recipe — and the base recipe, when one is given — quantizes) and every candidate (a preset name
or a recipe file; its resolved scheme for that layer), the layer's weight is rounded to nearest
on the candidate's grid (RTN, whatever the candidate's algorithm) and its *damage* is measured as
the mean per-token KL divergence KL(p_orig ‖ p_quant) of the next-token distribution over the
calibration tokens, in nats.  Two measures:

- ``kl`` (exact): the model's original outputs of every decoder block are recorded in one pass;
  for a layer of block b the blocks before b replay their recorded outputs (their ``forward`` is
  shadowed), so only blocks b..end and the head run; the original log-probabilities are computed
  once per sample.  One evaluation per (layer, candidate): too slow for every layer of a real
  model (SmolLM2-135M: 210 layers × 3 candidates, each running ~half the model and its 49152-way
  head), it validates the proxy and serves small models.
- ``fisher`` (the default, a proxy): KL(p ‖ p_θ+Δ) ≈ ½ Δᵀ F Δ with F the Fisher information of
  the model's own predictive distribution; its diagonal is estimated by backpropagating
  Σ_t log p(y_t) with labels y_t *sampled* (seeded) from the model's distribution at every
  position (the true Fisher, not the "empirical" one of the data labels).  Positions are
  conditionally independent given the input, so E[(∂/∂w Σ_t log p(y_t))²] = Σ_t F_t,ww: one
  backward per sample gives an unbiased estimate of the per-token Fisher summed over its positions.
  Squared gradients of every targeted weight are accumulated in fp32 on CPU and divided by the
  number of tokens; then damage = ½ Σ_i F_ii ΔW_i² for any candidate costs one rounding per
  layer.  Rounding errors of different weights are nearly uncorrelated, which is what the
  diagonal needs.  ``benchmarks/sensitivity_agreement.py`` measures its rank agreement with ``kl``.

With a base recipe that quantizes the input embedding or the output head, those are measured too
(mpq.analysis.edge_candidates).  With a base recipe that rotates (QuaRot), the model is rotated
first, as the base will rotate it, so the damage is that of the rotated weights.  The result,
with each candidate's bits and bytes, is a
:class:`mpq.analysis.sensitivity_table.SensitivityTable`.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpq.analysis.candidates import Candidate, check_names, expand, load_candidates, on_base
from mpq.analysis.edge_candidates import edge_layers, float_error, replay_start, storage_dtype_of
from mpq.analysis.sensitivity_table import SensitivityTable, TargetLayer, build_table
from mpq.errors import CalibrationError, RecipeError
from mpq.config.recipe import Recipe
from mpq.config.scheme import LayerScheme

MEASURES = ("fisher", "kl")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# --- candidates and layers ------------------------------------------------------------------------

def target_layers(model: nn.Module, candidates: Sequence[Candidate],
                  base: Recipe | None = None, *, storage: str = "fp32") -> list[TargetLayer]:
    """The decoder-block layers that every candidate (and ``base``, when given) quantizes, with
    each candidate's scheme for them (under ``base``'s algorithm: candidates.on_base), then the input embedding / output head when ``base``
    quantizes them (mpq.analysis.edge_candidates; ``storage``: the dtype ``base`` keeps float
    tensors in).  RecipeError when there is no block layer."""
    from mpq.engine.spec import plan_model

    plans = {}
    for candidate in candidates:
        _, plans[candidate.name] = plan_model(model, candidate.recipe)
    base_plan = plan_model(model, base)[1] if base is not None else None
    first = plans[candidates[0].name]
    out = []
    for layer in first.layers:
        if layer.block is None:
            continue
        if layer.expert is not None and first.get(layer.name).scheme is not None:
            raise RecipeError(f"{layer.name}: mpq sensitivity cannot measure fused MoE experts "
                              "yet (each expert sees only its routed tokens)",
                              hint="give the candidates a rule that skips them first, e.g. "
                                   "targets: ['re:.*mlp\\.experts\\..*'] with skip: true")
        if base_plan is not None and base_plan.get(layer.name).scheme is None:
            continue
        schemes = {c.name: plans[c.name].get(layer.name).scheme for c in candidates}
        if any(s is None for s in schemes.values()):
            continue
        if base_plan is not None:  # the candidates' grids under the base's algorithm
            base_scheme = base_plan.get(layer.name).scheme
            schemes = {c: on_base(s, base_scheme, f"candidate '{c}' on {layer.name}")
                       for c, s in schemes.items()}
        out.append(TargetLayer(layer.name, tuple(layer.shape), layer.block, schemes))
    if not out:
        raise RecipeError("no decoder-block layer is quantized by every candidate"
                          + (" and the base recipe" if base is not None else ""),
                          hint="check the candidates with `mpq plan MODEL -r CANDIDATE`")
    if base_plan is not None:
        out.extend(edge_layers(model, candidates, plans, base_plan, storage))
    return out


# --- measuring -------------------------------------------------------------------------------------

def _weight_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    from transformers.pytorch_utils import Conv1D

    return tensor.t() if isinstance(module, Conv1D) else tensor


def rtn_error(weight: torch.Tensor, scheme: LayerScheme) -> torch.Tensor:
    """Ŵ − W for ``weight`` [out, in] rounded to nearest on ``scheme``'s grid (fp32)."""
    from mpq.quantizers.base import QUANTIZERS

    rtn = LayerScheme(algorithm="rtn", weights=scheme.weights)
    w = weight.detach().float()
    return QUANTIZERS.get("rtn").quantize(w, rtn, {}).dequantize(torch.float32) - w


def _input_ids(sample: torch.Tensor) -> torch.Tensor:
    return sample if sample.dim() == 2 else sample.unsqueeze(0)


def fisher_diagonal(model: nn.Module, names: Sequence[str], samples: Sequence[torch.Tensor], *,
                    seed: int = 0, progress: Progress = _no_progress) -> dict[str, torch.Tensor]:
    """Per-token diagonal Fisher [out, in] (fp32, CPU) of every layer in ``names``, with labels
    sampled from the model's own next-token distribution (see the module docstring)."""
    modules = {name: model.get_submodule(name) for name in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {name: module.weight for name, module in modules.items()}
    for w in weights.values():
        w.requires_grad_(True)
    acc = {name: torch.zeros_like(w, dtype=torch.float32, device="cpu")
           for name, w in weights.items()}
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        with torch.enable_grad():
            for i, sample in enumerate(samples):
                ids = _input_ids(sample)
                logits = model(input_ids=ids).logits[0].float()
                logp = F.log_softmax(logits, dim=-1)
                with torch.no_grad():
                    labels = torch.multinomial(logp.exp().cpu(), 1, generator=generator)
                loss = logp.gather(1, labels.to(logp.device)).sum()
                loss.backward()
                for name, w in weights.items():
                    acc[name].add_(w.grad.detach().float().cpu().square())
                    w.grad = None
                tokens += ids.shape[1]
                del logits, logp, loss
                progress("fisher", i + 1, len(samples))
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    return {name: _weight_out_in(modules[name], a).div_(max(tokens, 1))
            for name, a in acc.items()}


def fisher_damage(fisher: torch.Tensor, error: torch.Tensor) -> float:
    """½ Σ F_ii ΔW_i²: the predicted per-token KL of the weight perturbation ``error``."""
    return 0.5 * float((fisher * error.square()).sum(dtype=torch.float64))


class ExactKL:
    """Exact KL of perturbing one layer: records every block's original output per sample and
    the original log-probabilities; :meth:`kl` runs only the blocks from the layer's on."""

    def __init__(self, model: nn.Module, samples: Sequence[torch.Tensor]):
        from mpq.models.layout import blocks_of, layout_of

        self.model = model
        self.blocks = blocks_of(model, layout_of(model))
        self.samples = [_input_ids(s) for s in samples]
        self.outputs: list[list[Any]] = [[] for _ in self.blocks]
        self.reference: list[torch.Tensor] = []
        handles = [block.register_forward_hook(self._recorder(i))
                   for i, block in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                for ids in self.samples:
                    self.reference.append(self._logprobs(ids))
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, index: int):
        def hook(module, args, output):
            self.outputs[index].append(_detached(output))
        return hook

    def _logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)

    @torch.no_grad()
    def kl(self, block: int, weights: dict[nn.Module, torch.Tensor] | None = None) -> float:
        """Mean per-token KL(p_orig ‖ p) with the given modules' weights replaced (Parameter
        layout, i.e. as stored in the module); blocks before ``block`` replay their outputs."""
        originals = {}
        for module, w in (weights or {}).items():
            originals[module] = module.weight.data
            module.weight.data = w.to(module.weight.dtype)
        current = [0]
        replayed = self.blocks[:block]
        for i, b in enumerate(replayed):
            b.forward = (lambda *a, _i=block - 1, **k: self.outputs[_i][current[0]])
        try:
            total, count = 0.0, 0
            for s, ids in enumerate(self.samples):
                current[0] = s
                logq = self._logprobs(ids)
                logp = self.reference[s]
                total += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
                count += logp.shape[0]
            return total / max(count, 1)
        finally:
            for b in replayed:
                del b.forward
            for module, data in originals.items():
                module.weight.data = data


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    if isinstance(output, tuple):
        return tuple(_detached(o) for o in output)
    return output


def measure_damage(model: nn.Module, layers: Sequence[TargetLayer], samples: Sequence[torch.Tensor],
                   measure: str = "fisher", *, seed: int = 0,
                   progress: Progress = _no_progress) -> dict[str, dict[str, float]]:
    """layer name → candidate → damage (mean per-token KL, nats) of quantizing that layer alone
    with RTN on the candidate's grid."""
    from mpq.models.layout import weight_of

    def error(layer: TargetLayer, weight: torch.Tensor, scheme: LayerScheme | None):
        return (float_error(weight, layer.storage) if scheme is None
                else rtn_error(weight, scheme))

    if measure not in MEASURES:
        from mpq.errors import did_you_mean
        raise RecipeError(f"unknown sensitivity measure '{measure}'",
                          hint=did_you_mean(measure, MEASURES) or f"use {' or '.join(MEASURES)}")
    if not samples:
        raise CalibrationError("no calibration samples to measure sensitivity on",
                               hint="pass --calib with some text")
    out: dict[str, dict[str, float]] = {}
    total = sum(len(layer.schemes) for layer in layers)
    done = 0
    if measure == "fisher":
        fisher = fisher_diagonal(model, [l.name for l in layers], samples, seed=seed,
                                 progress=progress)
        for layer in layers:
            weight = weight_of(model.get_submodule(layer.name))
            out[layer.name] = {c: fisher_damage(fisher[layer.name], error(layer, weight, scheme))
                               for c, scheme in layer.schemes.items()}
            del fisher[layer.name]
            done += len(layer.schemes)
            progress("damage", done, total)
        return out
    replay = ExactKL(model, samples)
    for layer in layers:
        module = model.get_submodule(layer.name)
        weight = weight_of(module)
        out[layer.name] = {}
        start = (layer.block if layer.block is not None
                 else replay_start(layer, len(replay.blocks)))
        for c, scheme in layer.schemes.items():
            quantized = _weight_out_in(module, weight.detach().float()
                                       + error(layer, weight, scheme))
            out[layer.name][c] = replay.kl(start, {module: quantized})
            done += 1
            progress("kl", done, total)
    return out


def sensitivity(model_path: str | Path, candidates: str | Sequence[str], calibration, *,
                measure: str = "fisher", base: Recipe | str | None = None,
                progress: Progress = _no_progress, model: nn.Module | None = None,
                layer_filter: Callable[[str], bool] | None = None) -> SensitivityTable:
    """The sensitivity table of the model folder ``model_path`` (fp32) for ``candidates``
    measured on ``calibration`` (mpq.quantize.CalibrationOptions; its source is required).
    ``base``: only the layers this recipe quantizes, and the input embedding / output head when
    it quantizes them (mpq.analysis.edge_candidates); when it rotates, the model (a given
    ``model`` in place) is rotated first and the table records the rotation.  ``layer_filter``:
    a subset of layers."""
    from mpq.calibration import build_calibration_set
    from mpq.models.source import check_model_dir, fingerprint, load_model, load_tokenizer
    from mpq.engine.spec import as_recipe

    started = time.perf_counter()
    if measure not in MEASURES:
        measure_damage(None, [], [], measure)  # raises the RecipeError
    check_names(candidates)
    base_recipe = as_recipe(base) if base is not None else None
    source_dir = check_model_dir(model_path)
    if calibration is None or calibration.source is None:
        raise CalibrationError("sensitivity needs calibration data",
                               hint="pass --calib FILE (e.g. a .txt corpus)")
    if model is None:
        model = load_model(source_dir, dtype=torch.float32)
    cands = load_candidates(expand(candidates, model))
    storage = storage_dtype_of(source_dir, base_recipe) if base_recipe is not None else "fp32"
    layers = target_layers(model, cands, base_recipe, storage=storage)
    if layer_filter is not None:
        layers = [layer for layer in layers if layer_filter(layer.name)]
    rotation = base_recipe.rotation if base_recipe is not None else None
    if rotation is not None:
        rotate_for_measuring(model, layers, rotation, base_recipe.source)
    calib = build_calibration_set(calibration, load_tokenizer(source_dir))
    damage = measure_damage(model, layers, calib.samples, measure, seed=calibration.seed,
                            progress=progress)
    table = build_table(str(model_path), layers, damage, measure=measure,
                        candidates=[c.name for c in cands], calibration=calib.provenance,
                        model_sha256=fingerprint(source_dir)["sha256"],
                        seconds=time.perf_counter() - started)
    return replace(table, rotation=rotation.to_dict()) if rotation is not None else table


def rotate_for_measuring(model: nn.Module, layers: Sequence[TargetLayer], rotation,
                         where: str) -> None:
    """Rotate ``model`` in place as the base recipe's ``rotation:`` will (mpq.rotation.quarot),
    so each layer's damage is that of its rotated weight, the one the base quantizes.  The
    input embedding / output head cannot be items then (the rotation unties them, and their
    pairing is decided on the tied model): RecipeError."""
    from mpq.models.layout import layout_of
    from mpq.rotation.quarot import apply_quarot

    edges = [layer.name for layer in layers if layer.block is None]
    if edges:
        raise RecipeError(f"{where}: sensitivity under a rotation cannot measure the input "
                          f"embedding or output head yet ({', '.join(edges)} quantized by the "
                          "base recipe)", hint="keep them float in the base recipe, as the "
                                               "QuaRot presets do, or remove rotation:")
    apply_quarot(model, layout_of(model), rotation)


# --- agreement -------------------------------------------------------------------------------------

def ranks(values: Sequence[float]) -> torch.Tensor:
    """Ranks 0..n-1 (average ranks for ties) as float64."""
    x = torch.as_tensor(list(values), dtype=torch.float64)
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    for value in torch.unique(x):  # ties: the mean of their ranks
        tied = x == value
        if int(tied.sum()) > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


def pick_spread(names: Iterable[str], count: int) -> list[str]:
    """About ``count`` layer names spread over depths and kinds: block i contributes the kind
    i mod (kinds), cycling through the blocks until ``count`` are picked."""
    from collections import defaultdict

    by_block: dict[int, list[str]] = defaultdict(list)
    for name in names:
        parts = name.split(".")
        block = next((int(p) for p in parts if p.isdigit()), -1)
        by_block[block].append(name)
    blocks = sorted(by_block)
    picked: list[str] = []
    round_ = 0
    while len(picked) < count and any(len(by_block[b]) > round_ for b in blocks):
        for i, b in enumerate(blocks):
            options = by_block[b]
            if not options:
                continue
            name = options[(i + round_ * 3) % len(options)]
            if name not in picked:
                picked.append(name)
            if len(picked) >= count:
                break
        round_ += 1
    return picked

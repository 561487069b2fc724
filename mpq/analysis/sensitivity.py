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

Bytes are those of the native format (:meth:`mpq.config.scheme.LayerScheme.stored_bytes`); bits per weight
are the unpadded encoding's (the number format's ``ideal_bits``: codes + scales + zeros).
The table (:class:`SensitivityTable`) is JSON (``mpq sensitivity -o``) that ``mpq quantize
--sensitivity`` reads back.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpq.analysis.candidates import Candidate, check_names, expand, load_candidates, on_base
from mpq.errors import CalibrationError, RecipeError
from mpq.config.recipe import Recipe
from mpq.config.scheme import LayerScheme

TABLE_VERSION = 1
MEASURES = ("fisher", "kl")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# --- candidates and layers ------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetLayer:
    """A knapsack item: a decoder-block layer, or an edge tensor (the input embedding, the output
    head or a tied pair of both: mpq.analysis.edge_candidates) with ``block`` None, its ``role``,
    the head it is ``tied_with`` and the ``storage`` dtype of its ``float`` candidate (None)."""

    name: str
    shape: tuple[int, int]
    block: int | None
    schemes: dict[str, LayerScheme | None]  # candidate name → scheme for this layer
    role: str | None = None
    tied_with: str | None = None
    storage: str = "fp32"


def target_layers(model: nn.Module, candidates: Sequence[Candidate],
                  base: Recipe | None = None, *, storage: str = "fp32") -> list[TargetLayer]:
    """The decoder-block layers that every candidate (and ``base``, when given) quantizes, with
    each candidate's scheme for them (under ``base``'s algorithm: candidates.on_base), then the input embedding / output head when ``base``
    quantizes them (mpq.analysis.edge_candidates; ``storage``: the dtype ``base`` keeps float
    tensors in).  RecipeError when there is no block layer."""
    from mpq.analysis.edge_candidates import edge_layers
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


def layer_cost(scheme: LayerScheme, shape: tuple[int, int], output_format: str = "mpq"
               ) -> tuple[float, int]:
    """(bits per weight of the unpadded encoding, stored bytes in ``output_format``)."""
    return scheme.ideal_bits(shape), scheme.stored_bytes(shape, output_format)


def target_cost(layer: TargetLayer, candidate: str, output_format: str = "mpq"
                ) -> tuple[float, int]:
    """:func:`layer_cost` of ``layer`` under ``candidate`` (a float edge candidate: its dtype's)."""
    from mpq.analysis.edge_candidates import float_cost

    scheme = layer.schemes[candidate]
    if scheme is None:
        return float_cost(layer.shape, layer.storage)
    return layer_cost(scheme, layer.shape, output_format)


# --- the table --------------------------------------------------------------------------------------

@dataclass
class LayerRow:
    """One item of the table: a block layer, or an edge tensor (``block`` None, ``role`` and
    ``tied_with`` as in :class:`TargetLayer`; its ``float`` candidate has no scheme)."""

    name: str
    shape: tuple[int, int]
    block: int | None
    damage: dict[str, float]
    bits: dict[str, float]
    bytes: dict[str, int]
    schemes: dict[str, dict[str, Any] | None]
    role: str | None = None
    tied_with: str | None = None

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def depth(self) -> float:
        """Position in the model: the block, the embedding before block 0, the head last."""
        if self.block is not None:
            return float(self.block)
        return math.inf if self.role == "head" else -1.0

    @property
    def names(self) -> list[str]:
        """The modules this row decides (a tied pair: both)."""
        return [self.name] + ([self.tied_with] if self.tied_with else [])

    def options(self, candidates: Sequence[str]) -> list[str]:
        """The ``candidates`` this row has, and its float candidate when it has one."""
        from mpq.analysis.edge_candidates import FLOAT

        out = [c for c in candidates if c in self.damage]
        return out + [FLOAT] if FLOAT in self.damage and FLOAT not in out else out

    def scheme(self, candidate: str) -> LayerScheme | None:
        data = self.schemes[candidate]
        return LayerScheme.from_dict(data) if data is not None else None

    def cost_bytes(self, candidate: str, output_format: str = "mpq") -> int:
        """Stored bytes under ``candidate`` in ``output_format``."""
        scheme = self.scheme(candidate)
        if scheme is None:
            return self.bytes[candidate]
        return layer_cost(scheme, self.shape, output_format)[1]

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "shape": list(self.shape), "block": self.block,
               "damage": self.damage, "bits": self.bits, "bytes": self.bytes,
               "schemes": self.schemes}
        if self.role is not None:
            out["role"] = self.role
        if self.tied_with is not None:
            out["tied_with"] = self.tied_with
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerRow":
        block = data["block"]
        return cls(name=data["name"], shape=tuple(data["shape"]),
                   block=int(block) if block is not None else None,
                   damage={k: float(v) for k, v in data["damage"].items()},
                   bits={k: float(v) for k, v in data["bits"].items()},
                   bytes={k: int(v) for k, v in data["bytes"].items()},
                   schemes=dict(data["schemes"]), role=data.get("role"),
                   tied_with=data.get("tied_with"))


@dataclass
class SensitivityTable:
    """Per layer and candidate: damage (mean per-token KL in nats, measured or predicted), bits
    per weight and bytes.  ``candidates`` in the order given."""

    model: str
    measure: str
    candidates: list[str]
    layers: list[LayerRow]
    calibration: dict[str, Any] | None = None
    model_sha256: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def cheapest(self) -> str:
        """The candidate every row has with the fewest total bytes."""
        common = [c for c in self.candidates if all(c in row.bytes for row in self.layers)]
        return min(common or self.candidates,
                   key=lambda c: sum(row.bytes.get(c, 0) for row in self.layers))

    def ranked(self, candidate: str | None = None) -> list[LayerRow]:
        """Layers by decreasing damage under ``candidate`` (default: the cheapest)."""
        candidate = candidate or self.cheapest()
        return sorted(self.layers, key=lambda row: -row.damage.get(candidate, 0.0))

    def costed_for(self, layers: Sequence[TargetLayer]) -> "SensitivityTable":
        """This table with the schemes, bits and bytes of ``layers`` (resolved against the base
        recipe of the run at hand: its algorithm, scale dtype, storage dtype) and the measured
        damage, so a table measured under one base serves another (the damage is RTN's on the
        same grid either way).  Rows of other layers are kept as they are."""
        by_name = {layer.name: layer for layer in layers}
        rows = []
        for row in self.layers:
            layer = by_name.get(row.name)
            if layer is None:
                rows.append(row)
                continue
            kept = [c for c in layer.schemes if c in row.damage]
            costs = {c: target_cost(layer, c) for c in kept}
            rows.append(LayerRow(name=row.name, shape=row.shape, block=row.block,
                                 damage={c: row.damage[c] for c in kept},
                                 bits={c: v[0] for c, v in costs.items()},
                                 bytes={c: v[1] for c, v in costs.items()},
                                 schemes={c: layer.schemes[c].to_dict()
                                          if layer.schemes[c] is not None else None
                                          for c in kept},
                                 role=layer.role, tied_with=layer.tied_with))
        return replace(self, layers=rows)

    def measured_candidates(self) -> list[str]:
        """The candidates as named on the command line (without the edges' float one)."""
        from mpq.analysis.edge_candidates import FLOAT

        return [c for c in self.candidates if c != FLOAT]

    def row(self, name: str) -> LayerRow:
        return next(row for row in self.layers if row.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"mpq_sensitivity": TABLE_VERSION, "model": self.model,
                "model_sha256": self.model_sha256, "measure": self.measure,
                "damage_unit": "mean per-token KL(p_orig || p_quant), nats",
                "candidates": list(self.candidates), "calibration": self.calibration,
                "seconds": round(self.seconds, 3), **self.extra,
                "layers": [row.to_dict() for row in self.layers]}

    def save(self, path: str | Path) -> None:
        from mpq.errors import OutputError

        try:
            Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write the sensitivity table {path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<table>") -> "SensitivityTable":
        if not isinstance(data, dict) or data.get("mpq_sensitivity") != TABLE_VERSION:
            raise RecipeError(f"{source} is not an mpq sensitivity table (version {TABLE_VERSION})",
                              hint="write one with `mpq sensitivity MODEL --calib ... -o FILE`")
        try:
            known = {"mpq_sensitivity", "model", "model_sha256", "measure", "damage_unit",
                     "candidates", "calibration", "seconds", "layers"}
            return cls(model=data["model"], measure=data["measure"],
                       candidates=list(data["candidates"]),
                       layers=[LayerRow.from_dict(row) for row in data["layers"]],
                       calibration=data.get("calibration"), model_sha256=data.get("model_sha256"),
                       seconds=float(data.get("seconds", 0.0)),
                       extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"{source}: malformed sensitivity table ({type(exc).__name__}: "
                              f"{exc})", hint="re-run mpq sensitivity -o FILE") from None

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecipeError(f"cannot read the sensitivity table {path}: {exc}",
                              hint="pass a file written by `mpq sensitivity -o FILE`") from None
        return cls.from_dict(data, str(path))


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
    from mpq.analysis.edge_candidates import float_error, replay_start
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


def build_table(model_path: str, layers: Sequence[TargetLayer],
                damage: dict[str, dict[str, float]], *, measure: str,
                candidates: Sequence[str], calibration: dict | None = None,
                model_sha256: str | None = None, seconds: float = 0.0) -> SensitivityTable:
    from mpq.analysis.edge_candidates import FLOAT

    rows = []
    for layer in layers:
        costs = {c: target_cost(layer, c) for c in layer.schemes}
        rows.append(LayerRow(name=layer.name, shape=layer.shape, block=layer.block,
                             damage=damage[layer.name], bits={c: v[0] for c, v in costs.items()},
                             bytes={c: v[1] for c, v in costs.items()},
                             schemes={c: s.to_dict() if s is not None else None
                                      for c, s in layer.schemes.items()},
                             role=layer.role, tied_with=layer.tied_with))
    candidates = list(candidates)
    if any(FLOAT in layer.schemes for layer in layers) and FLOAT not in candidates:
        candidates.append(FLOAT)
    return SensitivityTable(model=str(model_path), measure=measure, candidates=list(candidates),
                            layers=rows, calibration=calibration, model_sha256=model_sha256,
                            seconds=seconds)


def sensitivity(model_path: str | Path, candidates: str | Sequence[str], calibration, *,
                measure: str = "fisher", base: Recipe | str | None = None,
                progress: Progress = _no_progress, model: nn.Module | None = None,
                layer_filter: Callable[[str], bool] | None = None) -> SensitivityTable:
    """The sensitivity table of the model folder ``model_path`` (fp32) for ``candidates``
    measured on ``calibration`` (mpq.quantize.CalibrationOptions; its source is required).
    ``base``: only the layers this recipe quantizes, and the input embedding / output head when
    it quantizes them (mpq.analysis.edge_candidates).  ``layer_filter``: a subset of layers."""
    from mpq.analysis.edge_candidates import storage_dtype_of
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
    calib = build_calibration_set(calibration, load_tokenizer(source_dir))
    damage = measure_damage(model, layers, calib.samples, measure, seed=calibration.seed,
                            progress=progress)
    return build_table(str(model_path), layers, damage, measure=measure,
                       candidates=[c.name for c in cands], calibration=calib.provenance,
                       model_sha256=fingerprint(source_dir)["sha256"],
                       seconds=time.perf_counter() - started)


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

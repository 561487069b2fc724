"""Precision validation: judge observed activation ranges (:mod:`mpq.analysis.ranges`) against a
precision policy (:class:`mpq.config.recipe.PrecisionPolicy`).

Each op kind is governed by one policy part (:data:`mpq.analysis.ranges.KINDS`): residual stream →
``residual``, norm inputs/outputs → ``norms``, attention logits → ``softmax``, linear
inputs/outputs and MLP intermediates → ``activations``, cached K/V → ``kv_cache`` (when the
artifact carries calibrated ``k_scale``/``v_scale``, FP8 is scaled: the representable range is
448 × scale, and values beyond it are clipped: a warning, not an overflow, when more than
:data:`KV_CLIP_TOLERANCE` (10 %) beyond it; an int8/int4 cache quantizes to its own ranges,
calibrated or per token, and cannot overflow).  ``rope`` is not
checked: its tables are cos/sin in [-1, 1].

Verdicts per op:

- ``unsafe``: the policy dtype overflows (abs-max > the dtype's max: fp16 65504, bf16 ≈ 3.39e38,
  fp8_e4m3 448, fp8_e5m2 57344), or the op produced Inf/NaN even in fp32;
- ``warning``: FP16 would overflow here although the policy dtype is wider; more than
  :data:`UNDERFLOW_WARNING` (1 %) of the op's nonzero values lie below FP16's smallest normal
  2^-14 (they lose precision as subnormals, and below 2^-24 flush to zero); a scaled FP8 KV cache
  would clip; with ``norms: fp16``, a norm input above √65504 ≈ 256 (its square overflows unless
  the variance is accumulated in fp32);
- ``ok`` otherwise.

The model always runs in fp32, so the ranges are those of the exact computation.  The model's
own checkpoint dtype is reported (``model_dtype``), not checked: a float16 checkpoint with FP16
overflows gets a note that loading it with ``dtype="auto"`` would overflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from mpq.errors import CalibrationError, PrecisionPolicyError, RecipeError, did_you_mean
from mpq.analysis.ranges import (BF16_MAX, DTYPE_MAX, FP8_E4M3_MAX, FP16_MAX, FP16_MIN_NORMAL,
                        FP16_MIN_SUBNORMAL, KINDS, RangeProfiler, RangeStats)
from mpq.config.recipe import FLOAT_DTYPES, KV_CACHE_DTYPES, KV_INT_DTYPES, PrecisionPolicy

UNDERFLOW_WARNING = 0.01  # fraction of nonzero values below FP16's smallest normal
FP16_SQUARE_MAX = FP16_MAX ** 0.5  # ≈ 255.9: a norm's x² overflows fp16 above it
KV_CLIP_TOLERANCE = 0.10  # a scaled FP8 cache warns when |x| > 448 × scale × (1 + this)
LEVELS = ("ok", "warning", "unsafe")
POLICY_PARTS = tuple(f.name for f in fields(PrecisionPolicy))
NOT_CHECKED = {"rope": "cos/sin tables lie in [-1, 1]; no range to check"}


def parse_policy_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["residual=fp16", "all=bf16"]`` → {part: dtype}; ``all`` sets every part (applied
    first, so later parts override it).  RecipeError with a did-you-mean for a bad part or
    dtype."""
    out: dict[str, str] = {}
    everything = None
    for item in items:
        part, sep, dtype = (s.strip() for s in item.partition("="))
        if not sep or not part or not dtype:
            raise RecipeError(f"--policy '{item}' is not PART=DTYPE",
                              hint="e.g. --policy residual=fp16 or --policy all=fp16")
        if part != "all" and part not in POLICY_PARTS:
            close = did_you_mean(part, POLICY_PARTS + ("all",))
            raise RecipeError(f"--policy: unknown precision_policy part '{part}'",
                              hint=f"{close + ' ' if close else ''}parts: "
                                   f"{', '.join(POLICY_PARTS)}, all")
        choices = KV_CACHE_DTYPES if part == "kv_cache" else FLOAT_DTYPES
        if dtype not in choices:
            close = did_you_mean(dtype, choices)
            raise RecipeError(f"--policy: unknown dtype '{dtype}' for {part}",
                              hint=f"{close + ' ' if close else ''}use one of {', '.join(choices)}")
        if part == "all":
            everything = dtype
        else:
            out[part] = dtype
    if everything is not None:
        out = {**{p: everything for p in POLICY_PARTS}, **out}
    return out


@dataclass
class OpVerdict:
    name: str
    kind: str
    part: str
    dtype: str
    stats: RangeStats
    verdict: str = "ok"
    issues: list[str] = field(default_factory=list)
    limit: float = math.inf       # the largest representable |x| under the policy
    kv_scale: float | None = None

    @property
    def ratio(self) -> float:
        return self.stats.absmax / self.limit if self.limit else math.inf

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "part": self.part, "dtype": self.dtype,
               "verdict": self.verdict, "issues": list(self.issues), **self.stats.to_dict()}
        if self.kv_scale is not None:
            out["kv_scale"] = self.kv_scale
            out["scaled_limit"] = self.limit
        return out


def judge(name: str, kind: str, stats: RangeStats, policy: dict[str, str],
          kv_scale: float | None = None) -> OpVerdict:
    """The verdict on one op under ``policy`` (see the module docstring)."""
    part = KINDS[kind][0]
    dtype = policy[part]
    op = OpVerdict(name, kind, part, dtype, stats)
    levels = []
    absmax = stats.absmax
    if part == "kv_cache" and dtype in KV_INT_DTYPES:
        op.dtype = f"{dtype} (own ranges)"  # asymmetric int grids clip, they do not overflow
        if stats.nonfinite:
            levels.append("unsafe")
            op.issues.append(f"{stats.nonfinite} non-finite values even in fp32")
    elif part == "kv_cache" and kv_scale is not None and dtype.startswith("fp8"):
        op.kv_scale = kv_scale
        op.dtype = f"{dtype} (scaled)"
        op.limit = FP8_E4M3_MAX * kv_scale
        if absmax > op.limit * (1 + KV_CLIP_TOLERANCE):
            levels.append("warning")
            op.issues.append(f"|x| {absmax:.4g} > 448 × scale {kv_scale:.4g} = {op.limit:.4g}: "
                             "the scaled fp8 cache clips here")
    else:
        op.limit = DTYPE_MAX[dtype]
        if stats.nonfinite:
            levels.append("unsafe")
            op.issues.append(f"{stats.nonfinite} non-finite values even in fp32")
        elif absmax > op.limit:
            levels.append("unsafe")
            op.issues.append(f"|x| {absmax:.4g} overflows {dtype} (max {op.limit:.6g})")
    if kind == "norm_input" and dtype == "fp16" and FP16_SQUARE_MAX < absmax <= op.limit:
        levels.append("warning")
        op.issues.append(f"x² overflows fp16 for |x| {absmax:.4g} > {FP16_SQUARE_MAX:.4g}: the "
                         "norm must accumulate its variance in fp32 (transformers' RMSNorm does)")
    if absmax > FP16_MAX and dtype != "fp16":
        levels.append("warning")
        op.issues.append(f"fp16 would overflow: |x| {absmax:.4g} > {FP16_MAX:g}")
    if stats.underflow_fraction > UNDERFLOW_WARNING:
        levels.append("warning")
        op.issues.append(f"fp16 would underflow: {100 * stats.underflow_fraction:.2f}% of nonzero "
                         f"values below 2^-14 ({100 * stats.flush_fraction:.2f}% below 2^-24, "
                         "flushed to zero)")
    op.verdict = max(levels, key=LEVELS.index, default="ok")
    return op


@dataclass
class ValidationReport:
    model: str
    source_kind: str               # "artifact" | "model"
    model_dtype: str | None
    policy: dict[str, str]
    policy_source: str
    calibration: dict[str, Any]
    ops: list[OpVerdict]

    @property
    def verdict(self) -> str:
        return max((op.verdict for op in self.ops), key=LEVELS.index, default="ok")

    @property
    def safe(self) -> bool:
        return self.verdict != "unsafe"

    def offenders(self, limit: int = 10) -> list[OpVerdict]:
        """Ops with a verdict other than ok, worst first (level, then abs-max vs the limit)."""
        bad = [op for op in self.ops if op.verdict != "ok"]
        bad.sort(key=lambda op: (LEVELS.index(op.verdict), op.ratio,
                                 op.stats.absmax / FP16_MAX, op.stats.underflow_fraction),
                 reverse=True)
        return bad[:limit]

    def kinds(self) -> list[dict[str, Any]]:
        rows = []
        for kind, (part, description) in KINDS.items():
            ops = [op for op in self.ops if op.kind == kind]
            if not ops:
                continue
            worst = max(ops, key=lambda op: op.stats.absmax)
            under = max(ops, key=lambda op: op.stats.underflow_fraction)
            rows.append({
                "kind": kind, "description": description, "part": part,
                "dtype": worst.dtype, "ops": len(ops), "worst_op": worst.name,
                "absmax": worst.stats.to_dict()["absmax"],
                "min_nonzero": min((op.stats.min_nonzero for op in ops), default=math.inf),
                "fp16_overflow_ops": sum(op.stats.absmax > FP16_MAX for op in ops),
                "fp16_underflow_max_fraction": under.stats.underflow_fraction,
                "fp16_underflow_op": under.name,
                "verdict": max((op.verdict for op in ops), key=LEVELS.index),
            })
            if math.isinf(rows[-1]["min_nonzero"]):
                rows[-1]["min_nonzero"] = None
        return rows

    def notes(self) -> list[str]:
        notes = []
        if self.model_dtype in ("float16", "torch.float16") and any(
                op.stats.absmax > FP16_MAX for op in self.ops):
            notes.append("the checkpoint's dtype is float16: loading it with dtype='auto' runs "
                         "every part in fp16 and would overflow where marked")
        return notes

    def error(self) -> PrecisionPolicyError | None:
        unsafe = [op for op in self.ops if op.verdict == "unsafe"]
        if not unsafe:
            return None
        worst = max(unsafe, key=lambda op: (op.ratio, op.stats.absmax))
        parts = sorted({op.part for op in unsafe})
        where = f"{len(unsafe)} op(s) in {', '.join(parts)}"
        if worst.part == "kv_cache":
            fix = ("calibrate FP8 scales with `kv_cache: {format: fp8_e4m3}` in the recipe, or "
                   "keep the cache wider: `precision_policy: {kv_cache: bf16}`")
        else:
            fix = (f"keep {worst.part} in fp32/bf16: `precision_policy: {{{worst.part}: bf16}}` "
                   "in the recipe")
        return PrecisionPolicyError(
            f"precision policy unsafe ({where}): worst {worst.name} ({worst.kind}) reaches "
            f"|x| = {worst.stats.absmax:.4g}, above {worst.dtype}'s max {worst.limit:.6g}",
            hint=fix)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "source": self.source_kind, "model_dtype": self.model_dtype,
            "policy": dict(self.policy), "policy_source": self.policy_source,
            "calibration": self.calibration, "verdict": self.verdict, "safe": self.safe,
            "thresholds": thresholds(), "not_checked": dict(NOT_CHECKED),
            "kinds": self.kinds(), "offenders": [op.to_dict() for op in self.offenders()],
            "ops": [op.to_dict() for op in self.ops], "notes": self.notes(),
        }


def thresholds() -> dict[str, float]:
    return {"fp16_max": FP16_MAX, "fp16_min_normal": FP16_MIN_NORMAL,
            "fp16_min_subnormal": FP16_MIN_SUBNORMAL, "bf16_max": BF16_MAX,
            "fp8_e4m3_max": FP8_E4M3_MAX, "fp8_e5m2_max": DTYPE_MAX["fp8_e5m2"],
            "fp32_max": DTYPE_MAX["fp32"], "underflow_warning_fraction": UNDERFLOW_WARNING,
            "kv_clip_tolerance": KV_CLIP_TOLERANCE, "fp16_norm_square_max": FP16_SQUARE_MAX}


def judge_profile(profiler: RangeProfiler, policy: dict[str, str]) -> list[OpVerdict]:
    ops = []
    for (kind, name), stats in profiler.stats.items():
        scale = None
        if kind in ("kv_key", "kv_value") and name in profiler.kv_scales:
            scale = profiler.kv_scales[name].get("k" if kind == "kv_key" else "v")
        ops.append(judge(name, kind, stats, policy, scale))
    return ops


def resolve_policy(path: str, is_artifact: bool, recipe: str | None,
                   overrides: Sequence[str]) -> tuple[dict[str, str], str]:
    """The policy to check and where it came from: --recipe's, else the artifact's recorded
    one, else the default; then --policy overrides."""
    from mpq.engine.spec import as_recipe

    changes = parse_policy_overrides(overrides)
    if recipe is not None:
        policy = as_recipe(recipe).precision_policy.to_dict()
        source = f"recipe {recipe}"
    elif is_artifact:
        from mpq.checkpoint.native import open_artifact

        recorded = open_artifact(path).plan.precision_policy
        policy = {**PrecisionPolicy().to_dict(), **recorded}
        source = "recorded in the artifact"
    else:
        policy = PrecisionPolicy().to_dict()
        source = "default"
    if changes:
        policy = replace(PrecisionPolicy(**policy), **changes).to_dict()
        source += " + --policy " + " ".join(f"{k}={v}" for k, v in changes.items())
    return policy, source


def validate(path: str | Path, *, calib: str | None, num_samples: int = 8, seq_len: int = 512,
             recipe: str | None = None, overrides: Sequence[str] = (),
             on_sample=None) -> ValidationReport:
    """Profile the model or artifact at ``path`` on calibration data and judge its policy."""
    import torch

    from mpq.calibration import CalibrationOptions, build_calibration_set
    from mpq.checkpoint.native import is_artifact, open_artifact
    from mpq.models.source import check_model_dir, load_model, load_tokenizer, read_config

    path = str(path)
    artifact = is_artifact(path)
    policy, policy_source = resolve_policy(path, artifact, recipe, overrides)
    if calib is None:
        hint = "pass --calib FILE (e.g. the text the model was calibrated on)"
        if artifact:
            recorded = open_artifact(path).json_field("calibration") or {}
            if recorded.get("source"):
                hint = f"the artifact was calibrated on {recorded['source']}: pass --calib with it"
        raise CalibrationError("mpq validate needs calibration data to run through the model",
                               hint=hint)
    if artifact:
        config = open_artifact(path).config
    else:
        config = read_config(check_model_dir(path))
    model_dtype = config.get("torch_dtype") or config.get("dtype")
    tokenizer = load_tokenizer(path)
    calibration = build_calibration_set(
        CalibrationOptions(source=calib, num_samples=num_samples, seq_len=seq_len), tokenizer)
    if artifact:
        from mpq.loader import load

        model = load(path, dequantize=True, dtype=torch.float32)
    else:
        model = load_model(path, dtype=torch.float32)
    profiler = RangeProfiler(model)
    profiler.run(calibration.samples, on_sample)
    ops = judge_profile(profiler, policy)
    return ValidationReport(model=path, source_kind="artifact" if artifact else "model",
                            model_dtype=str(model_dtype) if model_dtype else None,
                            policy=policy, policy_source=policy_source,
                            calibration=dict(calibration.provenance), ops=ops)

"""What a run produced, kept beside its immutable plan (mpq.config.plan).

The plan says what will happen; the :class:`RunLog` records what did: each layer's results
(error figures, a calibrated static input scale, the damping GPTQ used, ...), each transform's
per-block records, and the rotations applied.  An artifact stores both as one JSON record
(:func:`plan_record`, read back by :func:`read_plan_record`): the plan's fields, each layer with
its ``result``, each transform with its ``applied`` records and the rotation with what was applied.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mpq.config.plan import Plan
from mpq.errors import ArtifactError

ROTATION_RECORD_KEYS = ("untied_head", "rotations", "online")


@dataclass
class RunLog:
    """``layers``: layer name → its results; ``transforms``: per plan transform, its records in
    block order; ``rotation``: the applied rotation record (``untied_head``, ``rotations``: name →
    spec, ``online``: module suffix → rotation name), or None."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    transforms: list[list[dict[str, Any]]] = field(default_factory=list)
    rotation: dict[str, Any] | None = None

    @classmethod
    def for_plan(cls, plan: Plan) -> "RunLog":
        """An empty log with one record list per transform of ``plan``."""
        return cls(transforms=[[] for _ in plan.transforms])

    def result(self, name: str) -> dict[str, Any]:
        """Layer ``name``'s results (a live dict; empty until the run fills it)."""
        return self.layers.setdefault(name, {})

    def input_scale(self, name: str) -> float | None:
        """The calibrated static input scale of layer ``name``, if any."""
        return self.layers.get(name, {}).get("input_scale")

    def online_rotations(self) -> dict[str, Any]:
        """Module suffix → rotation spec dict of the rotations applied at run time."""
        if not self.rotation:
            return {}
        specs = self.rotation.get("rotations", {})
        return {suffix: specs[name] for suffix, name in self.rotation.get("online", {}).items()}


def plan_record(plan: Plan, log: RunLog | None = None) -> dict[str, Any]:
    """The plan with what ``log`` records merged in, as artifacts store it."""
    log = log or RunLog.for_plan(plan)
    out = plan.to_dict()
    for layer in out["layers"]:
        layer["result"] = dict(log.layers.get(layer["name"], {}))
    for spec, applied in zip(out.get("transforms", []), log.transforms):
        spec["applied"] = list(applied)
    if "rotation" in out and log.rotation:
        out["rotation"].update(log.rotation)
    return out


def read_plan_record(data: Mapping[str, Any]) -> tuple[Plan, RunLog]:
    """Inverse of :func:`plan_record` (ArtifactError when malformed)."""
    plan = Plan.from_dict(data)
    try:
        layers = {item["name"]: dict(item["result"]) for item in data["layers"]
                  if item.get("result")}
        transforms = [list(spec.get("applied", [])) for spec in data.get("transforms", [])]
        rotation = data.get("rotation") or {}
        applied = {key: rotation[key] for key in ROTATION_RECORD_KEYS if key in rotation}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"malformed plan: {type(exc).__name__}: {exc}",
                            hint="the artifact metadata is damaged or was written by another "
                                 "tool") from None
    return plan, RunLog(layers=layers, transforms=transforms, rotation=applied or None)


def describe_transforms(plan: Plan, log: RunLog | None = None) -> str | None:
    """One line naming the transforms, their options and the blocks done, or None."""
    if not plan.transforms:
        return None
    parts = []
    for index, spec in enumerate(plan.transforms):
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        applied = log.transforms[index] if log is not None and log.transforms else []
        done = f", {len(applied)} blocks" if applied else ""
        parts.append(f"{spec.type}({options}){done}")
    return "transforms: " + "; ".join(parts)


def describe_rotation(plan: Plan, log: RunLog | None = None) -> str | None:
    """One line describing the rotation (and its online parts once applied), or None."""
    if plan.rotation is None:
        return None
    r = plan.rotation
    parts = [f"r1 {r.r1}"] + [name for name in ("r2", "r4") if getattr(r, name)]
    text = f"rotation: quarot ({', '.join(parts)}, seed {r.seed})"
    online = (log.rotation or {}).get("online") if log is not None else None
    if online:
        text += "; online: " + ", ".join(f"{k} inputs × {v}" for k, v in online.items())
    return text

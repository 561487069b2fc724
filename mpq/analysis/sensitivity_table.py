"""The sensitivity table: per item (a decoder-block layer, or the input embedding / output head:
mpq.analysis.edge_candidates) and candidate, the measured damage and the cost — bits per weight of
the unpadded encoding and stored bytes — and its JSON form (``mpq sensitivity -o``, read back by
``mpq quantize --sensitivity``).  Measuring it is mpq.analysis.sensitivity's job.

Bytes are those of the native format (:meth:`mpq.config.scheme.LayerScheme.stored_bytes`); bits
per weight are the number format's ``ideal_bits`` (codes + scales + zeros); a tensor kept in float
(the edges' :data:`FLOAT` candidate) costs its storage dtype's bits.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from mpq.config.scheme import LayerScheme
from mpq.errors import RecipeError

TABLE_VERSION = 1
FLOAT = "float"  # the candidate that keeps an edge tensor in the artifact's storage dtype
_STORAGE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16}


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


def layer_cost(scheme: LayerScheme, shape: tuple[int, int], output_format: str = "mpq"
               ) -> tuple[float, int]:
    """(bits per weight of the unpadded encoding, stored bytes in ``output_format``)."""
    return scheme.ideal_bits(shape), scheme.stored_bytes(shape, output_format)


def float_cost(shape: tuple[int, int], storage: str) -> tuple[float, int]:
    """(bits per weight, bytes) of a [rows, cols] tensor kept in ``storage``."""
    bits = _STORAGE_BITS[storage]
    return float(bits), shape[0] * shape[1] * bits // 8


def target_cost(layer: TargetLayer, candidate: str, output_format: str = "mpq"
                ) -> tuple[float, int]:
    """:func:`layer_cost` of ``layer`` under ``candidate`` (a float edge candidate: its dtype's)."""
    scheme = layer.schemes[candidate]
    if scheme is None:
        return float_cost(layer.shape, layer.storage)
    return layer_cost(scheme, layer.shape, output_format)


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
    per weight and bytes.  ``candidates`` in the order given.  ``rotation``: the base recipe's
    ``rotation:`` settings (QuaRotArgs.to_dict) when the damage was measured on the rotated
    model, None when on the model as it is."""

    model: str
    measure: str
    candidates: list[str]
    layers: list[LayerRow]
    calibration: dict[str, Any] | None = None
    model_sha256: str | None = None
    seconds: float = 0.0
    rotation: dict[str, Any] | None = None
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
        return [c for c in self.candidates if c != FLOAT]

    def row(self, name: str) -> LayerRow:
        return next(row for row in self.layers if row.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"mpq_sensitivity": TABLE_VERSION, "model": self.model,
                "model_sha256": self.model_sha256, "measure": self.measure,
                "damage_unit": "mean per-token KL(p_orig || p_quant), nats",
                "candidates": list(self.candidates), "calibration": self.calibration,
                "seconds": round(self.seconds, 3), "rotation": self.rotation, **self.extra,
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
                     "candidates", "calibration", "seconds", "rotation", "layers"}
            return cls(model=data["model"], measure=data["measure"],
                       candidates=list(data["candidates"]),
                       layers=[LayerRow.from_dict(row) for row in data["layers"]],
                       calibration=data.get("calibration"), model_sha256=data.get("model_sha256"),
                       seconds=float(data.get("seconds", 0.0)),
                       rotation=dict(data["rotation"]) if data.get("rotation") else None,
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


def build_table(model_path: str, layers: Sequence[TargetLayer],
                damage: dict[str, dict[str, float]], *, measure: str,
                candidates: Sequence[str], calibration: dict | None = None,
                model_sha256: str | None = None, seconds: float = 0.0) -> SensitivityTable:
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

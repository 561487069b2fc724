"""``mpq list``: what is registered (quantizers, number formats, formats, loaders, presets)."""
from __future__ import annotations

import click

from mpq.cli.console import emit_json, stdout_console
from mpq.cli.options import json_option


def registered() -> dict[str, dict[str, str]]:
    import mpq.quantizers  # noqa: F401  (registration)
    from mpq.models.families import FAMILIES
    from mpq.calibration import SOURCES
    from mpq.checkpoint import WRITERS
    from mpq.numerics.base import NUMBER_FORMATS
    from mpq.quantizers.base import QUANTIZERS
    from mpq.config.recipe import list_presets

    def first_line(obj) -> str:
        doc = (obj.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    return {
        "quantizers": {name: f"needs: {', '.join(sorted(q.needs)) or 'nothing'}"
                       for name, q in QUANTIZERS.items()},
        "number formats": {name: first_line(type(f)) for name, f in NUMBER_FORMATS.items()},
        "formats": {name: first_line(w) for name, w in WRITERS.items()},
        "calibration loaders": {name: first_line(l) for name, l in SOURCES.items()},
        "presets": list_presets(),
        "architectures": {model_type: family_summary(family) for model_type, family
                          in sorted(FAMILIES.model_types().items())},
    }


def family_summary(family) -> str:
    """One line: the family, its block list, and which of its parts exist (the reasons for the
    missing ones: docs/family-matrix.md, or the refusal itself)."""
    parts = {"KV cache": family.attention, "scale groups": family.scale_groups,
             "QuaRot": family.rotation}
    has = ", ".join(f"{name} {'yes' if part else 'no'}" for name, part in parts.items())
    return f"family {family.name}: blocks {family.blocks}; {has}"


@click.command("list")
@json_option
def command(as_json):
    """List registered quantizers, number formats, output formats, loaders and presets."""
    entries = registered()
    if as_json:
        emit_json(entries)
        return
    console = stdout_console()
    for kind, items in entries.items():
        console.print(f"[bold]{kind}[/bold]")
        for name, description in items.items():
            console.print(f"  {name:<16} {description}")

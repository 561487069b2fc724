"""``convert``: an existing native artifact rewritten in another format, without re-quantizing.

The native artifact is read back into its canonical state (mpq.checkpoint.state) and handed to the
target's writer; a target that cannot express some layers raises FormatError naming them and why,
before anything is written.  Pre-flight warnings are returned (``strict``: refused).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpq.checkpoint.native import check_output_apart, check_output_free
from mpq.checkpoint.serving import check_target
from mpq.checkpoint.serving import serving_target as lookup_target
from mpq.checkpoint.state import state_from_artifact
from mpq.checkpoint.verify import require_intact
from mpq.checkpoint.writers import preflight, write_state, writer_for


@dataclass
class ConvertResult:
    out_dir: Path
    output_format: str
    sizes: dict
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"output": str(self.out_dir), "format": self.output_format, "sizes": self.sizes,
                "warnings": self.warnings}


def convert(src: str | Path, out_dir: str | Path, output_format: str, *, force: bool = False,
            strict: bool = False, verify: bool = True,
            serving_target: str | None = None) -> ConvertResult:
    """Rewrite the native artifact ``src`` at ``out_dir``.  ``verify``: first check ``src``
    against its recorded hashes (mpq.checkpoint.verify.require_intact; an artifact from before
    manifests passes on its tensor files), so a changed artifact is not laundered into a fresh
    one whose own records match.  ``serving_target`` (default: the one the plan records, else
    any): the engine the converted folder is for (mpq.checkpoint.serving; FormatError before
    anything is written when the plan does not suit it)."""
    out_dir = Path(out_dir)
    check_output_free(out_dir, force)
    check_output_apart(out_dir, [Path(src)])
    writer = writer_for(output_format)
    if verify:
        require_intact(src, without_manifest_ok=True)
    state = state_from_artifact(src)
    target = serving_target or state.plan.serving_target
    check_target(lookup_target(target), state.plan, state.config.get("model_type"))
    warnings = preflight(writer, state.plan, strict,  # the checks `mpq quantize --format` runs
                         source=(state.config, state.files))
    sizes = write_state(state, out_dir, writer, force=force)
    return ConvertResult(out_dir=out_dir, output_format=output_format, sizes=sizes,
                         warnings=warnings)

"""``mpq verify ARTIFACT``: every file, headers and tensors against the artifact's records."""
from __future__ import annotations

import click
from rich.table import Table

from mpq.cli.console import emit_json, stdout_console
from mpq.cli.options import json_option
from mpq.errors import ArtifactError


@click.command("verify")
@click.argument("artifact", type=click.Path(path_type=str))
@json_option
def command(artifact, as_json):
    """Check ARTIFACT (any format mpq writes): the recorded sha256 of every file (manifest),
    no added file a loader could read, headers, and for native artifacts that every layer
    decodes. Exit 7 when a check fails."""
    from mpq.checkpoint.verify import verify_artifact

    checks = verify_artifact(artifact)
    failed = [check for check in checks if not check.ok]
    if as_json:
        emit_json({"event": "result", "artifact": artifact, "ok": not failed,
                   "checks": [check.to_dict() for check in checks]})
    else:
        table = Table(title=f"mpq verify {artifact}")
        for column in ("check", "result", "detail"):
            table.add_column(column)
        for check in checks:
            table.add_row(check.name, "[green]ok[/green]" if check.ok else "[red]FAILED[/red]",
                          check.detail)
        stdout_console().print(table)
    if failed:
        raise ArtifactError(f"{artifact}: {len(failed)} of {len(checks)} checks failed, first: "
                            f"{failed[0].name}: {failed[0].detail}",
                            hint="the artifact was changed or damaged after it was written; "
                                 "re-run mpq quantize (or copy it again)")

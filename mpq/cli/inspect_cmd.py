"""``mpq inspect ARTIFACT``: per-layer scheme, sizes and provenance of an artifact."""
from __future__ import annotations

from collections import defaultdict

import click
from rich.table import Table

from mpq.cli.calibration_view import activation_lines, summary_lines
from mpq.cli.console import emit_json, human_bytes, size_line, stdout_console
from mpq.cli.options import json_option


def tensor_bytes_by_layer(artifact) -> dict[str, int]:
    """Stored bytes per quantized layer (its encoded tensors, bias included), from headers only."""
    from safetensors import safe_open

    layers = {l.name for l in artifact.plan.quantized()}
    sizes: dict[str, int] = defaultdict(int)
    for file in artifact.files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                owner = key.rsplit(".", 1)[0]
                if owner in layers:
                    tensor_slice = handle.get_slice(key)
                    numel = 1
                    for dim in tensor_slice.get_shape():
                        numel *= dim
                    sizes[owner] += numel * _dtype_bytes(tensor_slice.get_dtype())
    return dict(sizes)


def _dtype_bytes(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return max(int(digits) // 8, 1) if digits else 1


def kernel_lines(paths) -> list[str]:
    """The kernel paths in words: counts, then each reason a layer stays on the decode path."""
    from mpq.runtime.planned_paths import decode_reasons, path_counts

    if not paths:
        return []
    counts = ", ".join(f"{path} {count}" for path, count in path_counts(paths).items())
    lines = [f"kernel paths under mpq.load(kernels=True): {counts}"]
    for reason, names in decode_reasons(paths).items():
        more = f", … {len(names) - 3} more" if len(names) > 3 else ""
        lines.append(f"  decode ({len(names)}): {reason}: {', '.join(names[:3])}{more}")
    return lines


@click.command("inspect")
@click.argument("artifact", type=click.Path(path_type=str))
@json_option
def command(artifact, as_json):
    """Show what ARTIFACT holds: per-layer scheme, sizes, the kernel path each layer takes under
    mpq.load(kernels=True) (and why a layer stays on the reference decode), provenance, and
    what its calibration covered (sample lengths, documents cut, vocabulary share, scripts,
    layer input outliers).  ARTIFACT is a native folder, or a GGUF folder mpq wrote (each
    layer's GGUF type shown; mpq.load does not run GGUF, so no kernel paths)."""
    from mpq.cli.experts_view import ExpertGroup, plan_rows, routing_lines, transform_lines
    from mpq.checkpoint.native import open_artifact
    from mpq.checkpoint.sizes import header_entries, size_summary
    from mpq.config.run_log import describe_rotation, describe_transforms, plan_record

    from mpq.checkpoint.gguf_folder import is_gguf_folder, open_gguf_folder
    from mpq.runtime.planned_paths import path_counts, planned_paths

    if is_gguf_folder(artifact):  # sizes as the writer recorded them; bytes from the GGUF
        art = open_gguf_folder(artifact)
        layer_tensors = art.layer_tensors()
        per_layer = {name: nbytes for name, (_, nbytes) in layer_tensors.items()}
        sizes = {**(art.json_field("sizes") or {}), "files_bytes": art.tensor_bytes()}
        paths = None
    else:
        art = open_artifact(artifact)
        layer_tensors = None
        per_layer = tensor_bytes_by_layer(art)
        sizes = {**(art.json_field("sizes") or {}), "files_bytes": art.tensor_bytes(),
                 **size_summary(art.plan, header_entries(art.files))}
        paths = planned_paths(art)
    info = {
        "path": str(art.path), "format": art.metadata.get("mpq.format", "mpq"),
        "format_version": art.metadata.get("mpq.format_version"),
        "tool_version": art.metadata.get("mpq.tool_version"),
        "packing": art.metadata.get("mpq.packing"), "recipe": art.json_field("recipe"),
        "source": art.json_field("source"), "calibration": art.json_field("calibration"),
        "calibration_coverage": art.json_field("calibration_coverage"),
        "recalibration": art.json_field("recalibration"),
        "sizes": sizes, "plan": plan_record(art.plan, art.log), "layer_bytes": per_layer,
        "kernel_paths": None if paths is None else {
            "counts": path_counts(paths),
            "layers": {name: {"path": p.path, "reason": p.reason} for name, p in paths.items()}},
    }
    if layer_tensors is not None:
        info["gguf_types"] = {name: kind for name, (kind, _) in layer_tensors.items()}
    if as_json:
        emit_json(info)
        return
    console = stdout_console()
    table = Table(title=f"{art.path} ({info['format']} format {info['format_version']}, "
                        f"written by mpq {info['tool_version']})")
    table.add_column("layer", no_wrap=True)
    columns = ("shape", "scheme", "algorithm", "rel. MSE", "bytes") + (("kernel",) if paths
                                                                         is not None else ())
    for column in columns:
        table.add_column(column, justify="right" if column in ("rel. MSE", "bytes") else "left")
    for layer in plan_rows(art.plan):  # fused experts: one row per group of slices
        if layer.scheme is None:
            continue
        names = layer.names if isinstance(layer, ExpertGroup) else [layer.name]
        errors = [e for e in (art.log.result(n).get("rel_mse") for n in names) if e is not None]
        table.add_row(layer.label() if isinstance(layer, ExpertGroup) else layer.name,
                      f"{layer.shape[0]}×{layer.shape[1]}",
                      layer.scheme.describe() + (f" ({info['gguf_types'][names[0]]})"
                                                 if names[0] in info.get("gguf_types", {})
                                                 else ""), layer.scheme.algorithm,
                      f"{max(errors):.2e}" if errors else "",
                      human_bytes(sum(per_layer.get(n, 0) for n in names)),
                      *(() if paths is None else
                        ("/".join(sorted({paths[n].path for n in names if n in paths})),)))
    console.print(table)
    for line in kernel_lines(paths) if paths is not None else ():
        console.print(line, soft_wrap=True)
    for line in routing_lines(art.plan, art.log):
        console.print(line)
    for line in transform_lines(art.plan):
        console.print(line)

    kept = len(art.plan.layers) - len(art.plan.quantized())
    console.print(f"{len(art.plan.quantized())} layers quantized, {kept} linear layers kept")
    for line in (describe_transforms(art.plan, art.log), art.plan.describe_kv_cache(),
                 describe_rotation(art.plan, art.log)):
        if line:
            console.print(line)
    sizes = info["sizes"]
    console.print(f"tensor files: {human_bytes(sizes['files_bytes'])}; tensors "
                  f"{human_bytes(sizes.get('stored_bytes', 0))}, ideal "
                  f"{human_bytes(sizes.get('ideal_bytes', 0))}")
    console.print(f"size: {size_line(sizes)}")
    source, calib = info["source"] or {}, info["calibration"]
    console.print(f"source: {source.get('path')} ({source.get('model_type')}), "
                  f"sha256 {source.get('sha256')}")
    recipe = info["recipe"] or {}
    console.print(f"recipe: {recipe.get('name')} ({recipe.get('source')})")
    if calib:
        from mpq.calibration.conventions import bos_note
        console.print(f"calibration: {calib.get('source')}, {calib.get('num_samples')} × "
                      f"{calib.get('seq_len')} tokens, seed {calib.get('seed')}, "
                      f"sha256 {calib.get('sha256')}" + bos_note(calib))
        report = info["calibration_coverage"]
        if report:
            for line in summary_lines(report) + activation_lines(report):
                console.print(line)
        else:
            console.print("calibration coverage: not recorded (written before mpq recorded it)")
    else:
        console.print("calibration: none")
    recal = info["recalibration"]
    if recal:
        traffic = recal.get("calibration") or {}
        console.print(f"static scales recalibrated ({recal.get('by')}): {recal.get('input_scales')}"
                      f" input scales, {recal.get('kv_tensors')} KV tensors from "
                      f"{traffic.get('source')}, {traffic.get('num_samples')} × "
                      f"{traffic.get('seq_len')} tokens + {recal.get('decode_tokens')} decode "
                      f"tokens each, sha256 {traffic.get('sha256')}")

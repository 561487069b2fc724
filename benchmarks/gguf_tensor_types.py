"""The GGUF type of every tensor of a GGUF file, grouped by tensor kind (what a llama.cpp mix
gives each layer; the presets mirroring llama.cpp's mixes are written from it).

    python benchmarks/gguf_tensor_types.py FILE.gguf [--json]

One line per (tensor kind, type): the kind (``attn_q.weight``, ``token_embd.weight``, ...), the
GGUF type and the blocks that have it (all, or a list).  Read with the ``gguf`` package.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import gguf


def tensor_types(path: str) -> dict[str, dict[str, list[int]]]:
    """{kind: {type: [block index, ...] (empty for tensors outside the blocks)}}."""
    kinds: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for tensor in gguf.GGUFReader(path).tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", tensor.name)
        kind = match.group(2) if match else tensor.name
        blocks = kinds[kind][tensor.tensor_type.name]
        if match:
            blocks.append(int(match.group(1)))
    return {k: dict(v) for k, v in sorted(kinds.items())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    types = tensor_types(args.gguf)
    if args.json:
        print(json.dumps(types))
        return
    n_blocks = 1 + max((b for per in types.values() for bl in per.values() for b in bl),
                       default=-1)
    for kind, per in types.items():
        for kind_type, blocks in per.items():
            where = "" if not blocks else "all blocks" if len(blocks) == n_blocks else \
                "blocks " + ", ".join(map(str, sorted(blocks)))
            print(f"{kind:24} {kind_type:8} {where}")


if __name__ == "__main__":
    main()

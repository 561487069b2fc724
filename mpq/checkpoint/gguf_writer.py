"""The GGUF format (llama.cpp, Ollama, LM Studio): ``--format gguf`` writes the folder OUT with
one ``model.gguf``, its model card and manifest.

``model.gguf`` (through the ``gguf`` package's GGUFWriter) holds

- llama.cpp's architecture metadata and tensor names (mpq.checkpoint.gguf_arch: llama/mistral,
  qwen2, qwen3, gemma, gemma2; the llama family's Q/K rows permuted to llama.cpp's RoPE layout,
  Gemma's norm weights stored as 1 + w);
- the tokenizer (mpq.checkpoint.gguf_tokenizer: byte-level BPE, SentencePiece-style BPE);
- quantized layers in the GGUF block type that holds their weights exactly: the GGUF grids
  (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` and the K-quants ``q4_k``, ``q5_k``,
  ``q6_k``, ``q3_k`` and ``iq4_nl``: the native block bytes as they are), and
  ``int`` 4/5-bit symmetric weights in groups of 32 with ``scale_dtype: fp16`` (without act-order
  unless with static groups), which are q4_0/q5_0 blocks with d = the scale.  Any other scheme
  is refused before work (exit 9), naming the layer;
- float tensors: 1-D ones (norms, biases) in F32, as llama.cpp needs them, 2-D ones in the
  plan's storage dtype (F32, F16 or BF16); a tied output head is not written (llama.cpp reuses
  ``token_embd``);
- mpq's provenance under ``mpq.*`` string keys: the same header strings every mpq format writes
  (format, versions, plan with per-layer results, recipe, calibration, source, pipeline, sizes).

Not expressible (refused): input activation and KV-cache quantization, fused MoE experts and
routers, online rotations, model types outside the records, RoPE scaling, configs departing from
what llama.cpp's graph assumes (gguf_arch's requirements: untied Gemma heads, Gemma 2's
query scale, soft-capping and layer pattern…), tokenizers other than byte-level BPE and
SentencePiece-style BPE.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mpq.errors import FormatError
from mpq.checkpoint.gguf_folder import FORMAT_NAME, GGUF_FILE
from mpq.checkpoint.gguf_spm import merge_gaps
from mpq.checkpoint.gguf_arch import (add_arch_metadata, arch_of, config_problems, permute_rows,
                                      qk_heads, stored_norm, tensor_name)
from mpq.checkpoint.gguf_tokenizer import (add_tokenizer, pre_tokenizer_name,
                                           read_tokenizer_json, tokenizer_model,
                                           tokenizer_problems)
from mpq.checkpoint.manifest import write_manifest
from mpq.checkpoint.model_card import render_model_card
from mpq.checkpoint.native import check_output_free, write_folder
from mpq.checkpoint.sizes import Entry, size_summary
from mpq.checkpoint.state import ArtifactState
from mpq.checkpoint.storage import stored_dense
from mpq.checkpoint.writers import WRITERS, header_metadata, moe_problems
from mpq.config.plan import Plan
from mpq.numerics.args import WeightArgs
from mpq.numerics.base import NUMBER_FORMATS, QuantizedWeight
from mpq.numerics.format import NumberFormat
from mpq.numerics.gguf_iq4nl import IQ4_NL
from mpq.numerics.gguf_kquants import GGUF_KQUANTS
from mpq.numerics.gguf_legacy import GGUF_BLOCK, GGUF_LEGACY

GRID_NAMES = tuple(f.name for f in (*GGUF_LEGACY, *GGUF_KQUANTS, IQ4_NL))
INT_AS_GGUF = {4: "q4_0", 5: "q5_0"}  # int b-bit sym g32 fp16 scales ≡ these blocks
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16",
              "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
              "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1",
              # llama.cpp names its K-quant files by mix; the medium one where it has several
              "q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K",
              "q3_k": "MOSTLY_Q3_K_M", "iq4_nl": "MOSTLY_IQ4_NL"}


def gguf_grid(args: WeightArgs, options: dict) -> NumberFormat | str:
    """The GGUF grid that stores weights quantized with ``args`` (and GPTQ ``options``) exactly,
    or why none does."""
    if args.format in GRID_NAMES:
        return NUMBER_FORMATS.get(args.format)
    if (args.format == "int" and args.bits in INT_AS_GGUF and args.symmetric
            and args.granularity == "group" and args.group_size == GGUF_BLOCK
            and args.scale_dtype == "fp16"):
        if options.get("act_order") and not options.get("static_groups"):
            return (f"{args.describe()} with act_order and no static_groups (GGUF blocks are "
                    "consecutive columns)")
        return NUMBER_FORMATS.get(INT_AS_GGUF[args.bits])
    return (f"{args.describe()}{' ' + args.scale_dtype + ' scales' if args.format == 'int' else ''}"
            f" has no exact GGUF type (GGUF stores {', '.join(GRID_NAMES)}; int4/int5 "
            "symmetric g32 with scale_dtype fp16 are q4_0/q5_0)")


def block_rows(qw: QuantizedWeight, grid: NumberFormat, name: str) -> torch.Tensor:
    """uint8 GGUF rows [N, K/block · type size] of ``qw`` on ``grid`` (a GGUF grid)."""
    if qw.args.format == grid.name:
        return grid.to_blocks(qw)
    k = qw.shape[1]
    if qw.g_idx is not None and not torch.equal(
            qw.g_idx.to(torch.int64), torch.arange(k) // GGUF_BLOCK):
        raise FormatError(f"{name}: columns were grouped out of order (act-order), which GGUF "
                          "blocks cannot store", hint="quantize with static_groups: true")
    return grid.to_blocks(QuantizedWeight(args=qw.args, shape=qw.shape, codes=qw.codes,
                                          scale=qw.scale, zero=None))


def _dense_array(tensor: torch.Tensor, storage: str | None, name: str
                 ) -> tuple[np.ndarray, str]:
    """(array, GGUF type name) of a float tensor: 1-D in F32, else in the storage dtype."""
    t = tensor.detach().cpu()
    if t.dim() < 2:
        return t.to(torch.float32).numpy(), "F32"
    t = stored_dense(name, t, storage)
    kind = FLOAT_TYPES.get(t.dtype)
    if kind is None:
        raise FormatError(f"tensor '{name}' has dtype {t.dtype}, which format 'gguf' does not "
                          "store", hint="write the native format (--format mpq)")
    if kind == "BF16":
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), kind
    return t.contiguous().numpy(), kind


def _order(name: str) -> tuple:
    parts = name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), name)
    return (0 if parts[0] == "token_embd" else 2, 0, name)


class GgufWriter:
    """GGUF (one ``model.gguf``): llama.cpp, Ollama, LM Studio."""

    name = FORMAT_NAME
    online_rotations = False
    load_hint = (f"# llama.cpp: llama-cli -m path/to/this/folder/{GGUF_FILE}; Ollama: a "
                 f"Modelfile with FROM ./{GGUF_FILE}")

    def unsupported(self, plan: Plan) -> list[str]:
        problems = moe_problems(plan, "format 'gguf' writes dense decoder layers only")
        for layer in plan.quantized():
            if layer.expert is not None or "router" in layer.class_name.lower():
                continue
            grid = gguf_grid(layer.scheme.weights, dict(layer.scheme.options))
            if isinstance(grid, str):
                problems.append(f"{layer.name}: {grid}")
            elif layer.shape[1] % grid.block:
                problems.append(f"{layer.name}: {layer.shape[1]} inputs, not a multiple of "
                                f"{grid.name}'s block of {grid.block}")
            if layer.scheme.input_activations is not None:
                problems.append(f"{layer.name}: input activation quantization (GGUF is "
                                "weight-only)")
        if plan.kv_cache is not None:
            problems.append("kv_cache scales (GGUF files store no KV-cache quantization)")
        return problems

    def source_problems(self, config: dict, files: dict, plan: Plan | None = None
                        ) -> list[str]:
        """What of the model itself (config, tokenizer files, and the plan's tied pair) GGUF
        cannot express."""
        tying = plan.tying if plan is not None else None
        return config_problems(config, tying) + tokenizer_problems(files)

    def preflight(self, plan: Plan) -> list[str]:
        return []

    def source_warnings(self, config: dict, files: dict) -> list[str]:
        data = read_tokenizer_json(files)
        model = tokenizer_model(data) if data is not None else None
        if model == "gpt2" and pre_tokenizer_name(data) is None:
            return ["tokenizer: its pre-tokenizer is not one llama.cpp names here; written as "
                    "'default', so llama.cpp may split text differently from the source "
                    "tokenizer"]
        gaps = merge_gaps(data) if model == "llama" else []
        if gaps:
            return [f"tokenizer: {len(gaps)} token(s) (e.g. {gaps[0]!r}) join two vocabulary "
                    "entries without a merge rule for that pair; llama.cpp's SentencePiece "
                    "tokenizer merges any such pair, so it may split text differently from the "
                    "source tokenizer"]
        return []

    # --- writing -----------------------------------------------------------------------------

    def tensors(self, state: ArtifactState) -> list[tuple[str, np.ndarray, str, str]]:
        """(GGUF name, array, GGUF type name, mpq name) of every tensor, in file order; the mpq
        name of a quantized layer's blocks is ``<layer>.blocks``."""
        config = state.config
        arch = arch_of(config)
        blocks = int(config["num_hidden_layers"])
        plan = state.plan
        out = []

        def place(hf_name: str, t: torch.Tensor) -> torch.Tensor:
            heads = qk_heads(hf_name, config) if arch.permute_qk else None
            return t if heads is None else permute_rows(t, heads)

        for layer in plan.quantized():
            if plan.shared_with(layer.name) is not None:
                continue  # a tied head: llama.cpp reuses token_embd
            grid = gguf_grid(layer.scheme.weights, dict(layer.scheme.options))
            if isinstance(grid, str):
                raise FormatError(f"{layer.name}: {grid}")
            rows = block_rows(state.qweights[layer.name], grid, layer.name)
            key = layer.weight_key
            out.append((tensor_name(key, arch, blocks), place(key, rows).numpy(),
                        grid.name, f"{layer.name}.blocks"))
        for name in state.dense:
            tensor = stored_norm(name, place(name, state.dense[name]), arch)
            array, kind = _dense_array(tensor, plan.storage_dtype, name)
            out.append((tensor_name(name, arch, blocks), array, kind, name))
        return sorted(out, key=lambda item: _order(item[0]))

    def write(self, state: ArtifactState, out_dir: str | Path, *, force: bool = False
              ) -> dict:
        """Write OUT/model.gguf (with README.md and the manifest) atomically; return the size
        figures."""
        import gguf

        out_dir = Path(out_dir)
        check_output_free(out_dir, force)
        problems = self.source_problems(state.config, state.files, state.plan)
        if problems:
            raise FormatError(f"format 'gguf' cannot express {'; '.join(problems)}",
                              hint="write the native format (--format mpq)")
        tensors = self.tensors(state)
        sizes = self._sizes(state, tensors)

        def fill(tmp: Path) -> None:
            arch = arch_of(state.config)
            writer = gguf.GGUFWriter(str(tmp / GGUF_FILE), arch.arch)
            source = state.provenance.get("source") or {}
            name = Path(str(source["path"])).name if source.get("path") else "model"
            add_arch_metadata(writer, state.config, name)
            writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[self._main_type(tensors)]]))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_tokenizer(writer, state.files, int(state.config["vocab_size"]))
            for key, value in header_metadata(state, self.name, sizes).items():
                writer.add_string(key, value)
            for name, array, kind, _ in tensors:
                qtype = gguf.GGMLQuantizationType[kind.upper()]
                writer.add_tensor(name, array, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            (tmp / "README.md").write_text(render_model_card(
                source=source, recipe_name=state.plan.recipe_name, plan=state.plan,
                calibration=state.provenance.get("calibration"), sizes=sizes,
                format_name=self.name, load_hint=self.load_hint), encoding="utf-8")
            write_manifest(tmp)

        write_folder(out_dir, force, fill)
        return sizes

    @staticmethod
    def _main_type(tensors) -> str:
        """The GGUF type holding most weights of the 2-D tensors (general.file_type)."""
        counts: dict[str, int] = {}
        for _, array, kind, _ in tensors:
            if array.ndim == 2:
                counts[kind] = counts.get(kind, 0) + array.size
        quantized = {k: v for k, v in counts.items() if k in GRID_NAMES}
        pool = quantized or counts
        return max(pool, key=pool.get) if pool else "F32"

    @staticmethod
    def _sizes(state: ArtifactState, tensors) -> dict:
        entries = {}
        ideal = 0.0
        for _, array, kind, name in tensors:
            if kind in GRID_NAMES:
                layer = state.plan.get(name.rpartition(".")[0])
                entries[name] = Entry(array.size, array.nbytes, False)
                ideal += layer.shape[0] * layer.shape[1] * NUMBER_FORMATS.get(kind).bits / 8
            else:
                entries[name] = Entry(array.size, array.nbytes, True)
                ideal += array.nbytes
        stored = sum(e.nbytes for e in entries.values())
        quantized_weights = sum(l.shape[0] * l.shape[1] for l in state.plan.quantized())
        return {"stored_bytes": stored, "ideal_bytes": int(round(ideal)),
                "quantized_weights": quantized_weights,
                **size_summary(state.plan, entries)}


GGUF = WRITERS.register(FORMAT_NAME)(GgufWriter())

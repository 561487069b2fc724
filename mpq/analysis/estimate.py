"""``mpq quantize --dry-run``: the plan, the artifact's size, peak memory and time, before any work.

:func:`estimate_run` reads only ``config.json`` (the model is built as a meta skeleton, no weight
is read) and the recipe; it resolves the plan exactly as ``mpq quantize`` does (shape checks and
the output format's checks included), then models the run:

**Artifact size** (exact for ``--format mpq`` up to the header): every quantized layer's stored
tensors computed from its shape by its number format (``stored_bytes`` of the format object in
mpq.numerics: the native layout, e.g. int codes packed in int32 words, fp32 scales, packed zero
points, int32 g_idx under GPTQ act-order; compressed-tensors and GPTQ v1 with their own layouts,
scales in the artifact's storage dtype / float16; int scales in their ``scale_dtype`` natively).
Every other tensor of the state dict (embeddings, norms, biases, an untied head) in the
artifact's storage dtype (the plan's ``storage_dtype``, mpq.checkpoint.storage), tied tensors
once.  ``bits_per_weight`` is the tensor bytes × 8 over every weight of the model (quantized
and kept), ``quantized_bits_per_weight`` the quantized layers' bytes over their weights.  The safetensors header (one JSON
entry per tensor plus mpq's metadata, the plan being the largest) is estimated from the plan.
A quantized input embedding counts as a quantized layer.  A tied embedding/head pair the plan
quantizes (mpq.config.tying) is stored once when it stays tied (shared: the head adds nothing and
its weights count once), else each side is counted on its own, and ``size["tying"]`` gives the
record with ``untie_bytes``, what the head's own copy costs.

**Peak memory** (bytes; the host's for ``--device cpu``), the largest of three phases:

- *calibration* (with ``--calib``, read after the model is opened): ``overhead`` + the weights
  held then (streamed: those outside the blocks; else the whole model) + ``tokenizer`` +
  ``calibration_reading``;
- *block loop*: ``overhead`` + ``weights`` + ``activations`` + ``statistics`` + ``solver`` +
  ``block_temporaries`` + ``outputs``;
- *writing*: ``overhead`` + ``weights`` + ``outputs`` (streamed: only those outside the blocks)
  + ``write_buffers``.

The parts, and the assumptions behind them:

- ``overhead``: the Python/torch/transformers process itself. Measured: 243 MB RSS after
  ``import torch, transformers``, 350 MB once mpq is imported and a (tiny) Llama is built
  (torch 2.13 CPU, transformers 5.23); :data:`OVERHEAD_BYTES` = 360 MiB.  With ``--device cuda``
  the CUDA runtime adds about :data:`CUDA_HOST_OVERHEAD_BYTES` on the host.
- ``tokenizer``: the model's tokenizer while it is loaded and used: :data:`TOKENIZER_BASE_BYTES`
  + :data:`TOKENIZER_BYTES_PER_FILE_BYTE` × the size of its files (tokenizer.json, vocab/merges,
  SentencePiece model).  Measured (peak RSS growth while loading): 11.3 MiB for the tests' byte
  tokenizer (5 kB tokenizer.json), 148 MiB for SmolLM2's (3.5 MB, about 40 bytes a file byte).
- ``calibration_reading``: the source is read up to its reading budget (mpq.calibration.dataset:
  ``max(16 × num_samples × seq_len, 2**20)`` tokens), whatever the source's size: the token ids
  kept (4 bytes each, ``array('i')`` with its growth margin), one tokenizer call's transient
  memory, :data:`TOKENIZE_BYTES_PER_CHAR` × its characters (at most reading.PIECE_CHARS +
  reading.CHUNK_BYTES: mpq.calibration.stream), the text held while splitting (that many
  characters, 4 bytes each at worst, twice), and the samples (int64).  Measured with SmolLM2's
  byte-level BPE tokenizer, per character of one call: 41-125 bytes (English), 190 (accented
  Latin), 535 (CJK); reading 4.7 M characters of a 50 MB one-line file to the default budget
  raised the peak by less than the tokenizer's loading had (benchmarks/calibration_memory.py).
- ``weights``: in the load dtype (``--dtype``, else config.json's ``torch_dtype``/``dtype``, else
  float32).  Streamed runs (mpq.engine.streaming, the default where the recipe allows it): the tensors
  outside the decoder blocks plus the largest block.  Otherwise (``rotation:``, statistics for a
  layer outside the blocks, ``--no-stream``) the whole model: mpq.quantize loads it whole
  (mpq.models.source.load_model) and reads every tensor (finiteness check).
- ``activations``: the calibration set's hidden states, ``num_samples × seq_len`` tokens in the
  load dtype: the current block's inputs (hidden + RoPE cos/sin + position ids per token).  With
  ``--true-sequential`` the replay of finished parts (mpq.engine.replay) also keeps, for every token,
  the attention output (hidden) and the MLP's down-projection input (its K, the largest input
  size in a block): at most ``2 × hidden + intermediate`` values per token together with the
  inputs.  None when no layer needs statistics and the recipe has no transform or KV cache
  (round to nearest runs no forward at all).  On CUDA they live on the device (and briefly on the
  host while captured); with ``--offload-activations`` they stay on the host and the device holds
  one batch's (its inputs, outputs and replay records).  GPTQ's and autoround's
  ``error_feedback`` add the float stream (mpq.engine.float_stream): the float model's block
  inputs, its next block inputs and (GPTQ) the recorded inputs of the layers that need them
  (one per group of layers sharing an input, guessed as for the Hessians below), per token
  ``2 × hidden`` + the sum of those groups' K values; and (GPTQ) a K×K cross term (fp64 sum,
  fp32 result) beside each Hessian.
- ``statistics``: the largest step's statistics.  GPTQ: one fp32 K×K Hessian per group of layers
  sharing an input (mpq.engine.collect), one group per true-sequential step, so the largest K (the
  MLP's down projection); :data:`HESSIAN_COPIES` = 5 K×K fp32 live at the worst moment (the
  running sum, its symmetric result, and gptq_solve's damped copy, act-order permutation and
  inverse Cholesky factor).  Without true-sequential (and for AWQ, which collects every group's
  second moments in one pass) the Hessians of all the block's input groups are held at once;
  groups are guessed as layers of one parent module with the same input size.  SmoothQuant's
  input samples: 4096 × K fp32.
- ``solver``: the largest quantized layer's fp32 working copies (N×K × 4 bytes ×
  :data:`SOLVER_COPIES_GPTQ` = 5 for GPTQ: the float weight, its transposed working copy, the
  codes, the dequantized result, the error rows; × :data:`SOLVER_COPIES_RTN` = 3 otherwise).
- ``block_temporaries``: one calibration batch through one block (``--calib-batch-tokens``
  tokens): the MLP's ``3 × intermediate`` and about ``6 × hidden`` values per token, plus the
  attention scores ``samples_per_batch × heads × seq_len²``, all counted in fp32.
- ``outputs``: the quantized weights kept until the artifact is written (uint8 codes, one byte
  per weight, plus scales/zero points), which grows to its full size by the last block.  Streamed:
  those of the layers outside the blocks plus one block's (the rest are in the work directory).
- ``write_buffers`` (writing phase): the artifact's encoded tensors, held until written (files
  are written one tensor at a time, mpq.checkpoint.safetensors_writer); streamed, one layer's
  tensors at a time, decoded from the work directory.

**Time** (seconds, ≈, order of magnitude): forward work 2 × block parameters × tokens per block
pass (plus attention's 4 × seq_len × attention width per token), times the passes per block: none
without statistics, :data:`PASSES_TRUE_SEQUENTIAL` (≈ one full forward for all steps with replay,
plus the nearly free final pass) with true-sequential, 2 (one collection pass, one final pass)
without; Hessian accumulation 1.2 × tokens × K² per input group (upper triangle only); the GPTQ
solve ≈ K³ + 2·N·K² per layer plus :data:`GPTQ_COLUMN_SECONDS` of Python per column; AWQ's search
(grid + 10 clip factors) × 2·N·K²; RTN :data:`RTN_SECONDS_PER_WEIGHT`.  FLOPs are divided by a
matmul throughput measured on the spot on the chosen device (:func:`measure_throughput`, ≤ 0.3 s);
fixed costs: :data:`STARTUP_SECONDS` (imports, config, tokenizer) and reading, checking, hashing and
writing the weights at :data:`IO_BYTES_PER_SECOND`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mpq.calibration import reading
from mpq.calibration.sources import detect_source
from mpq.calibration.stream import read_budget
from mpq.engine.spec import RunSpec
from mpq.engine.float_stream import paired_layers, target_layers
from mpq.errors import CalibrationError
from mpq.errors import ResourceError
from mpq.models.source import read_config
from mpq.checkpoint.storage import storage_bytes
from mpq.config.plan import Plan
from mpq.config.run_log import plan_record

MiB = 1 << 20

# --- constants of the memory model (see the module docstring) ---------------------------------
OVERHEAD_BYTES = 360 * MiB  # process RSS with torch + transformers + mpq imported, model classes built
CUDA_HOST_OVERHEAD_BYTES = 400 * MiB  # the CUDA runtime's host memory once initialised
HESSIAN_COPIES = 5
SOLVER_COPIES_GPTQ = 5
SOLVER_COPIES_RTN = 3
SMOOTHQUANT_ROWS = 4096  # mpq.engine.stats.InputSample.ROWS
TOKENIZER_BASE_BYTES = 12 * MiB  # a tiny tokenizer loaded (measured 11.3 MiB)
TOKENIZER_BYTES_PER_FILE_BYTE = 45  # measured about 40 (SmolLM2's tokenizer.json)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "spiece.model")
TOKENIZE_BYTES_PER_CHAR = 600  # one tokenizer call, per character (measured at most 535, CJK)

# --- constants of the time model -------------------------------------------------------------
PASSES_TRUE_SEQUENTIAL = 1.2
PASSES_PARALLEL = 2.0
# interpreter start, imports, model classes, tokenizer, load + write of a tiny model: 6.3-6.8 s
# measured for RTN runs of a 4-block tiny Llama on 2 busy cores (about 4 s on an idle machine)
STARTUP_SECONDS = 6.0
IO_BYTES_PER_SECOND = 1.0e9  # read + finiteness check + sha256 + write, per weight byte
GPTQ_COLUMN_SECONDS = 60e-6  # Python per column of gptq_solve's loop (CPU)
LAYER_SECONDS = 5e-3  # per quantized layer: error figures, page-out, events
TOKENIZE_TOKENS_PER_SECOND = 2e5  # reading + tokenizing (SmolLM2, 2 busy cores: 1.05 M in 4.8 s)
SOURCE_BYTES_PER_TOKEN = 4  # to guess a local file's tokens from its size (English: about 4.2)
RTN_SECONDS_PER_WEIGHT = 4e-9
FORWARD_EFFICIENCY = 0.5  # a block's forward reaches about half the square-matmul throughput

_DTYPE_NAMES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16, "half": torch.float16}


@dataclass
class RunEstimate:
    """What ``mpq quantize`` would do and need; byte counts are bytes, times seconds."""

    model: str
    recipe: str
    device: str
    output_format: str
    dtype: str  # load dtype
    plan: Plan
    calibration: dict[str, Any]
    size: dict[str, int]  # quantized, dense, header, tensors (= quantized + dense), total
    memory: dict[str, int]  # the parts of the peak (see the module docstring)
    peak_bytes: int  # on the run device (the host for cpu)
    peak_phase: str  # "block loop" or "writing"
    host_peak_bytes: int  # the host's (= peak_bytes on cpu)
    seconds: float
    time_parts: dict[str, float]
    throughput_flops: float  # measured matmul FLOP/s on the device
    warnings: list[str] = field(default_factory=list)
    streaming: str | None = None  # None: streamed; else why the whole model is loaded
    available_bytes: int | None = None
    host_available_bytes: int | None = None

    @property
    def fits(self) -> bool | None:
        if self.available_bytes is None:
            return None
        host_ok = (self.host_available_bytes is None
                   or self.host_peak_bytes <= self.host_available_bytes)
        return self.peak_bytes <= self.available_bytes and host_ok

    def to_dict(self) -> dict[str, Any]:
        summary = self.plan.summary()
        return {
            "model": self.model, "recipe": self.recipe, "device": self.device,
            "format": self.output_format, "dtype": self.dtype,
            "plan": {"recipe_name": self.plan.recipe_name,
                     "quantized_layers": len(self.plan.quantized()), "kept_layers": summary.kept,
                     "schemes": [{"scheme": r.label, "layers": r.layers, "weights": r.weights}
                                 for r in summary.rows]},
            "calibration": dict(self.calibration), "size": dict(self.size),
            "memory": {"parts": dict(self.memory), "peak_bytes": self.peak_bytes,
                       "peak_phase": self.peak_phase, "host_peak_bytes": self.host_peak_bytes,
                       "available_bytes": self.available_bytes,
                       "host_available_bytes": self.host_available_bytes},
            "fits": self.fits,
            "streaming": {"streamed": self.streaming is None, "why_not": self.streaming},
            "time": {"seconds": round(self.seconds, 2),
                     "parts": {k: round(v, 3) for k, v in self.time_parts.items()},
                     "throughput_gflops": round(self.throughput_flops / 1e9, 2),
                     "note": "rough estimate (≈), order of magnitude"},
            "warnings": list(self.warnings),
        }


# --- available memory -------------------------------------------------------------------------

def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes that a run on ``device`` may still use: CPU: MemAvailable of /proc/meminfo (else
    free physical pages from os.sysconf); CUDA: the free memory torch.cuda.mem_get_info reports."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def check_fits(estimate: RunEstimate, available: int, *, host_available: int | None = None
               ) -> None:
    """ResourceError (exit 11) when the estimated peak exceeds ``available`` bytes on the run
    device (or, with ``host_available``, the host's peak exceeds that)."""
    checks = [(estimate.peak_bytes, available, estimate.device)]
    if host_available is not None and estimate.device != "cpu":
        checks.append((estimate.host_peak_bytes, host_available, "cpu (host)"))
    for need, have, where in checks:
        if need > have:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in estimate.memory.items() if v)
            raise ResourceError(
                f"this run needs about {_gib(need)} of memory on {where} at its peak "
                f"({estimate.peak_phase}: {parts}) but only {_gib(have)} is available",
                hint="use fewer --num-samples, a shorter --seq-len or a smaller "
                     "--calib-batch-tokens, or run on a machine with more memory")


# --- the device probe -------------------------------------------------------------------------

def measure_throughput(device: str | torch.device = "cpu", budget_s: float = 0.25) -> float:
    """FLOP/s of fp32 square matmuls on ``device``, measured for at most about ``budget_s``."""
    device = torch.device(device)
    n = 512 if device.type == "cpu" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    torch.mm(a, b)  # warm up
    sync(device) if device.type == "cuda" else None
    flops, started = 0.0, time.perf_counter()
    while True:
        torch.mm(a, b)
        if device.type == "cuda":
            sync(device)
        flops += 2.0 * n ** 3
        elapsed = time.perf_counter() - started
        if elapsed >= budget_s or (device.type != "cpu" and flops >= 2e12):
            break
    return flops / max(elapsed, 1e-9)


# --- sizes ------------------------------------------------------------------------------------

def load_dtype(config: dict, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype mpq.models.source.load_model would load in: ``dtype``, or the checkpoint's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return _DTYPE_NAMES[str(dtype)]
    name = config.get("torch_dtype") or config.get("dtype")
    if isinstance(name, str):
        return _DTYPE_NAMES.get(name.replace("torch.", ""), torch.float32)
    return torch.float32


def _header_bytes(plan: Plan, tensor_names: list[str], recipe_text: str) -> int:
    """The safetensors header: per tensor ``"name":{"dtype":..,"shape":[..],"data_offsets":[..]}``
    plus mpq's metadata strings (plan with per-layer results, recipe, provenance), JSON-escaped."""
    per_tensor = sum(len(name) + 70 for name in tensor_names)
    plan_json = len(json.dumps(plan_record(plan), separators=(",", ":")))
    results = 160 * len(plan.quantized())  # rel_mse, gptq_loss, ... filled in by the run
    # the metadata values are JSON strings inside the JSON header: quotes are escaped (≈ +15 %)
    metadata = int(1.15 * (plan_json + results + 2 * len(recipe_text))) + 2500
    return per_tensor + metadata


# --- the estimate ----------------------------------------------------------------------------

def estimate_run(spec: RunSpec, *, probe: bool = True) -> RunEstimate:
    """Estimate the run ``spec`` (mpq.engine.spec.resolve_run) without reading its weights (see
    the module docstring for the model and its assumptions).  ``probe``: time a short matmul
    on the device for the time estimate."""
    calibration, options = spec.calibration, spec.options
    true_sequential, output_format = options.true_sequential, spec.writer.name
    skeleton, plan, layout, recipe = spec.skeleton, spec.plan, spec.layout, spec.recipe
    torch_device, source_dir = spec.device, spec.source_dir
    warnings, not_streamed = list(spec.warnings), spec.not_streamed
    try:  # from_config leaves meta parameters untied; the loaded model is tied
        skeleton.tie_weights()
    except (AttributeError, RuntimeError, ValueError, KeyError):
        pass
    wdtype = load_dtype(read_config(source_dir), options.dtype)
    elem = torch.empty(0, dtype=wdtype).element_size()
    stored_elem = storage_bytes(plan.storage_dtype or "fp32")  # the artifact's float tensors

    # ---- the state dict: all weights, and what stays dense in the artifact
    quantized = {layer.name: layer for layer in plan.quantized()}
    head = layout.head_name
    tied = (head is not None and head in quantized
            and skeleton.get_submodule(head).weight is getattr(
                skeleton.get_input_embeddings(), "weight", None))
    seen: set[int] = set()
    weight_bytes = dense_bytes = dense_weights = 0
    block_weight_bytes: dict[int, int] = {}  # per decoder block
    blocks_prefix = layout.blocks_path + "."
    tensor_names: list[str] = []
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * (elem if tensor.is_floating_point() else tensor.element_size())
        weight_bytes += size
        if name.startswith(blocks_prefix):
            index = int(name[len(blocks_prefix):].split(".", 1)[0])
            block_weight_bytes[index] = block_weight_bytes.get(index, 0) + size
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in quantized \
                and not (module == head and tied):  # untied: the embedding stays
            continue
        floating = tensor.is_floating_point()
        dense_bytes += tensor.numel() * (stored_elem if floating else tensor.element_size())
        dense_weights += tensor.numel() if floating else 0
        tensor_names.append(name)

    quantized_bytes = 0
    codes_bytes = 0  # QuantizedWeights held in memory until writing: uint8 codes + fp32 params
    block_codes: dict[int, int] = {}  # per decoder block (streaming holds one block's)
    largest_group = 0
    tying, untie_bytes = plan.tying, 0
    if tying is not None and not tying.shared and tying.head not in quantized:
        # the embedding is quantized: the head keeps a float copy of its own
        head_weights = skeleton.get_submodule(tying.head).weight.numel()
        untie_bytes = head_weights * stored_elem
        dense_bytes += untie_bytes
        dense_weights += head_weights
        weight_bytes += head_weights * elem
        tensor_names.append(f"{tying.head}.weight")
    for layer in plan.quantized():
        n, k = layer.shape
        if plan.shared_with(layer.name) is not None:
            continue  # stored once, under the embedding's name
        stored = layer.scheme.stored_bytes(layer.shape, output_format, stored_elem)
        if tying is not None and not tying.shared and layer.name == tying.head:
            untie_bytes = stored
        quantized_bytes += stored
        native = layer.scheme.stored_bytes(layer.shape, "mpq", elem)
        codes = n * k + max(0, native - n * k * layer.scheme.weights.bits // 8)
        codes_bytes += codes
        largest_group = max(largest_group, native + codes)  # decoded codes + encoded tensors
        if layer.block is not None:
            block_codes[layer.block] = block_codes.get(layer.block, 0) + codes
        tensor_names.extend(f"{layer.name}.{key}" for key in ("qweight", "scale"))
        acts = layer.scheme.input_activations
        if acts is not None and not acts.dynamic:
            quantized_bytes += 4
            tensor_names.append(f"{layer.name}.input_scale")
    header = _header_bytes(plan, tensor_names, recipe.text or "")
    tensors_total = quantized_bytes + dense_bytes
    quantized_weights = sum(l.shape[0] * l.shape[1] for l in plan.quantized()
                            if plan.shared_with(l.name) is None)  # a shared head once
    total_weights = quantized_weights + dense_weights
    size = {"quantized_bytes": quantized_bytes, "dense_bytes": dense_bytes,
            "tensor_bytes": tensors_total, "header_bytes": header,
            "file_bytes": tensors_total + header + 8,
            "quantized_weights": quantized_weights, "total_weights": total_weights,
            "storage_dtype": plan.storage_dtype or "fp32",
            "bits_per_weight": round(8 * tensors_total / total_weights, 4)
            if total_weights else 0.0,
            "quantized_bits_per_weight": round(8 * quantized_bytes / quantized_weights, 4)
            if quantized_weights else 0.0}
    if tying is not None:
        size["tying"] = {**tying.to_dict(), "untie_bytes": untie_bytes}

    # ---- the calibration work
    wanted = spec.needs
    forward = bool(calibration.source is not None
                   and spec.needs_calibration_pass)
    seq_len = calibration.seq_len
    tokens = calibration.num_samples * seq_len if forward else 0
    per_batch = max(1, calibration.batch_tokens // seq_len)
    batch_tokens = min(per_batch, calibration.num_samples) * seq_len
    config = skeleton.config
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
                 or skeleton.get_input_embeddings().embedding_dim)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0) or 1)
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    block0 = [l for l in plan.layers if l.block == 0]
    intermediate = max([l.shape[1] for l in block0] + [l.shape[0] for l in block0] + [hidden])
    block_params = sum(l.shape[0] * l.shape[1] for l in block0)
    num_blocks = layout.num_blocks
    attn_width = heads * head_dim

    per_token_inputs = hidden + 2 * head_dim + 8 // elem + 1
    per_token_replay = (hidden + intermediate) if true_sequential else 0
    activations = tokens * (per_token_inputs + per_token_replay) * elem
    paired = set(paired_layers(wanted))
    recorded = {(l.name.rsplit(".", 1)[0], l.shape[1]) for l in block0 if l.name in paired}
    if forward and (recorded or target_layers(wanted)):  # the float stream beside the quantized one
        activations += tokens * (2 * hidden + sum(k for _, k in recorded)) * elem

    hessian_layers = [l for l in plan.quantized() if "hessian" in wanted.get(l.name, ())]
    transform_types = {spec.type for spec in plan.transforms}
    groups: dict[tuple[int | None, str, int], int] = {}
    for layer in block0:
        groups.setdefault((layer.block, layer.name.rsplit(".", 1)[0], layer.shape[1]),
                          layer.shape[1])
    all_groups_k2 = sum(k * k for k in groups.values())
    statistics = 0
    if forward and hessian_layers:
        kmax = max(l.shape[1] for l in hessian_layers)
        held = kmax * kmax if true_sequential else all_groups_k2
        statistics = 4 * (held + (HESSIAN_COPIES - 1) * kmax * kmax)
        if paired:  # the cross term's fp64 sum and fp32 result beside each Hessian
            statistics += 12 * kmax * kmax
    if forward and "awq" in transform_types:
        statistics = max(statistics, 4 * 2 * all_groups_k2)
    if forward and "smoothquant" in transform_types:
        statistics = max(statistics, 4 * SMOOTHQUANT_ROWS * intermediate * len(groups))
    largest = max((l.shape[0] * l.shape[1] for l in plan.quantized()), default=0)
    copies = SOLVER_COPIES_GPTQ if hessian_layers else SOLVER_COPIES_RTN
    solver = 4 * largest * copies
    block_temporaries = 0
    if forward:
        block_temporaries = 4 * (batch_tokens * (3 * intermediate + 6 * hidden)
                                 + min(per_batch, calibration.num_samples) * heads * seq_len ** 2)
    on_cuda = torch_device.type == "cuda"
    overhead = OVERHEAD_BYTES + (CUDA_HOST_OVERHEAD_BYTES if on_cuda else 0)
    write_buffers = tensors_total  # every encoded tensor, held until written
    held_while_writing = weight_bytes + codes_bytes
    held_while_reading = weight_bytes  # the model opened before calibration is read
    tokenizer_bytes, reading_bytes, read_tokens, budget = _calibration_reading(calibration,
                                                                               source_dir)
    if not_streamed is None:  # one block resident; the artifact written one shard at a time
        outside = weight_bytes - sum(block_weight_bytes.values())
        weight_bytes = outside + max(block_weight_bytes.values(), default=0)
        outside_codes = codes_bytes - sum(block_codes.values())
        codes_bytes = outside_codes + max(block_codes.values(), default=0)
        held_while_writing = outside + outside_codes
        held_while_reading = outside
        write_buffers = largest_group  # produced one layer at a time
    memory = {"overhead": overhead, "weights": weight_bytes, "activations": activations,
              "statistics": statistics, "solver": solver,
              "block_temporaries": block_temporaries, "outputs": codes_bytes,
              "write_buffers": write_buffers, "tokenizer": tokenizer_bytes,
              "calibration_reading": reading_bytes}
    block_loop = (overhead + weight_bytes + activations + statistics + solver + block_temporaries
                  + codes_bytes)
    writing = overhead + held_while_writing + write_buffers
    calibrating = (overhead + held_while_reading + tokenizer_bytes + reading_bytes
                   if calibration.source is not None else 0)
    if on_cuda:
        block_weights = weight_bytes // max(num_blocks, 1)
        on_device = activations
        if options.offload_activations:  # one batch in, its output out, its replay records
            on_device = min(activations, batch_tokens * (2 * per_token_inputs
                                                         + per_token_replay) * elem)
        device_peak = (on_device + statistics + solver + block_temporaries + block_weights)
        host_peak = max(overhead + weight_bytes + activations + codes_bytes, writing,
                        calibrating)
        peak, phase = device_peak, "block loop"
    else:
        phase, peak = max((("block loop", block_loop), ("writing", writing),
                           ("calibration", calibrating)), key=lambda item: item[1])
        host_peak = peak

    # ---- time
    throughput = measure_throughput(torch_device) if probe else 5e10
    matmul_rate = throughput * FORWARD_EFFICIENCY
    passes = 0.0
    if forward:
        passes = PASSES_TRUE_SEQUENTIAL if true_sequential else PASSES_PARALLEL
    fwd_flops = passes * num_blocks * tokens * (2 * block_params + 4 * seq_len * attn_width)
    stat_flops = 0.0
    if forward and hessian_layers:
        stat_flops = 1.2 * tokens * all_groups_k2 * num_blocks
    solve_flops = 0.0
    solve_python = 0.0
    rtn_seconds = 0.0
    gptq_names = {layer.name for layer in hessian_layers}
    for layer in plan.quantized():
        n, k = layer.shape
        if layer.name in gptq_names:
            solve_flops += k ** 3 + 2.0 * n * k * k
            solve_python += GPTQ_COLUMN_SECONDS * k
        else:
            rtn_seconds += RTN_SECONDS_PER_WEIGHT * n * k
    if forward and "awq" in transform_types:
        grid = next(int(s.options.get("grid", 20)) for s in plan.transforms if s.type == "awq")
        stat_flops += 1.2 * tokens * all_groups_k2 * num_blocks
        solve_flops += (grid + 10) * sum(2.0 * l.shape[0] * l.shape[1] * l.shape[1]
                                         for l in plan.quantized())
    time_parts = {
        "startup": STARTUP_SECONDS,
        "io": 3 * weight_bytes / IO_BYTES_PER_SECOND + tensors_total / IO_BYTES_PER_SECOND,
        "forward": fwd_flops / matmul_rate,
        "statistics": stat_flops / matmul_rate,
        "solver": solve_flops / matmul_rate + solve_python + rtn_seconds
        + LAYER_SECONDS * len(plan.quantized()),
        "calibration": read_tokens / TOKENIZE_TOKENS_PER_SECOND,
    }
    if calibration.source is None and wanted:
        warnings = [*warnings, "no --calib: the run will stop (exit 5) because "
                               f"{next(iter(wanted))} needs calibration statistics"]
    return RunEstimate(
        model=str(source_dir), recipe=recipe.name, device=str(torch_device),
        output_format=output_format, dtype=str(wdtype).replace("torch.", ""), plan=plan,
        calibration={"source": calibration.source, "num_samples": calibration.num_samples,
                     "seq_len": seq_len, "batch_tokens": calibration.batch_tokens,
                     "tokens": tokens, "read_budget_tokens": budget,
                     "forward_passes_per_block": passes,
                     "true_sequential": true_sequential,
                     "offload_activations": options.offload_activations},
        size=size, memory=memory, peak_bytes=int(peak), peak_phase=phase,
        host_peak_bytes=int(host_peak), seconds=sum(time_parts.values()), time_parts=time_parts,
        throughput_flops=throughput, warnings=list(warnings), streaming=not_streamed)


def _calibration_reading(calibration, source_dir) -> tuple[int, int, int, int]:
    """``(tokenizer bytes, reading bytes, tokens read, reading budget)`` of reading ``--calib``
    (zeros without it); see the module docstring."""
    if calibration.source is None:
        return 0, 0, 0, 0
    budget = read_budget(calibration.num_samples, calibration.seq_len)
    files = sum(reading.file_size(source_dir / name) or 0 for name in TOKENIZER_FILES)
    tokenizer = TOKENIZER_BASE_BYTES + TOKENIZER_BYTES_PER_FILE_BYTE * files
    call_chars = reading.PIECE_CHARS + reading.CHUNK_BYTES
    held = (4 * budget * 9 // 8 + TOKENIZE_BYTES_PER_CHAR * call_chars + 2 * 4 * call_chars
            + 8 * calibration.num_samples * calibration.seq_len)
    tokens = budget
    try:
        loader, location = detect_source(calibration.source)
    except CalibrationError:  # the run itself reports it
        loader, location = None, None
    size = reading.file_size(location) if loader in ("text", "jsonl") else None
    if size is not None:
        tokens = min(budget, size // SOURCE_BYTES_PER_TOKEN + 1)
    return tokenizer, held, tokens, budget


def estimate_and_check(spec: RunSpec) -> RunEstimate:
    """:func:`estimate_run`, with the available memory filled in (no exception)."""
    estimate = estimate_run(spec)
    estimate.available_bytes = available_memory(estimate.device)
    if estimate.device != "cpu":
        estimate.host_available_bytes = available_memory("cpu")
    return estimate


def check_memory_budget(spec: RunSpec) -> None:
    """ResourceError before a run whose estimated peak exceeds the available memory (on the
    device, and on the host for GPU runs); no throughput probe."""
    estimate = estimate_run(spec, probe=False)
    check_fits(estimate, available_memory(spec.device),
               host_available=available_memory("cpu") if spec.device.type != "cpu" else None)


__all__ = ["check_memory_budget", "RunEstimate", "estimate_run", "estimate_and_check", "available_memory",
           "check_fits", "measure_throughput"]

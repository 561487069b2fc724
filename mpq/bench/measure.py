"""One configuration measured in the current process (transformers or mpq.load).

- load: the model (fp32/bf16 through transformers; an mpq artifact through ``mpq.load`` with
  kernels); RSS right after loading;
- time to first token: ``generate`` of one token from a ``prompt_tokens`` prompt (fixed random
  ids, seed 0), best of ``repeats``, per batch size;
- decode: ``generate`` of ``new_tokens`` greedy tokens (``min_new_tokens`` so EOS cannot stop it)
  after a warm-up; tokens/s = batch · (new_tokens − 1) / (generate time − time to first token),
  i.e. the steady decode rate without the prompt's prefill;
- prefill: one forward of ``prefill_tokens`` tokens without cache, best of ``repeats`` after a
  warm-up, computing the next-token logits only (``logits_to_keep=1``, as ``generate`` and
  serving engines do; all-position fp32 logits of a 512-token prompt alone are 100 MB);
- peak RSS: VmHWM at the end (load, decode and prefill together; see mpq.bench.rss).
"""
from __future__ import annotations

import inspect
import time

import torch

from mpq.bench import rss
from mpq.bench.configs import Config, Settings


def load(config: Config, int8_path: str | None = None):
    """(model, {path: layer count}) for ``config`` (``int8_path``: the int8 baseline
    artifact)."""
    if config.kind == "hf":
        from transformers import AutoModelForCausalLM

        dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
        model = AutoModelForCausalLM.from_pretrained(config.path, dtype=dtype,
                                                     local_files_only=True)
        return model.eval(), {}
    import mpq
    from mpq.runtime.qlinear import layer_paths

    options = {"kernels": {"kernels": True}, "decode": {}, "dequantize": {"dequantize": True}}
    dtype = None if config.dtype == "auto" else getattr(torch, config.dtype)
    model = mpq.load(int8_path if config.kind == "int8" else config.path, dtype=dtype,
                     **options[config.load])
    counts: dict[str, int] = {}
    for path in layer_paths(model).values():
        counts[path] = counts.get(path, 0) + 1
    return model, counts


def _best(repeats: int, run) -> float:
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(config: Config, settings: Settings, int8_path: str | None = None) -> dict:
    """The row of ``config``: tokens/s, times and memory (see the module docstring)."""
    torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    model, paths = load(config, int8_path)
    load_s = time.perf_counter() - start
    after_load = rss.current_mb()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    eos = model.config.eos_token_id
    pad = model.config.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
    row = {"model": config.name, "kind": config.kind, "path": config.path,
           "dtype": str(next(p.dtype for p in model.parameters())).replace("torch.", ""),
           "threads": settings.threads, "paths": paths}
    with torch.inference_mode():
        for batch in settings.batches:
            prompt = torch.randint(0, vocab, (batch, settings.prompt_tokens), generator=gen)
            mask = torch.ones_like(prompt)

            def generate(tokens: int):
                out = model.generate(prompt, attention_mask=mask, do_sample=False,
                                     max_new_tokens=tokens, min_new_tokens=tokens,
                                     pad_token_id=pad)
                if out.shape[1] != settings.prompt_tokens + tokens:
                    raise RuntimeError(f"generate gave {out.shape[1] - settings.prompt_tokens} "
                                       f"tokens, not {tokens}")

            generate(4)  # warm-up
            ttft = _best(settings.repeats, lambda: generate(1))
            total = _best(1, lambda: generate(settings.new_tokens))
            steady = max(total - ttft, 1e-9)
            row[f"decode_tok_s_b{batch}"] = round(batch * (settings.new_tokens - 1) / steady, 2)
            row[f"ttft_ms_b{batch}"] = round(ttft * 1000, 1)
        long = torch.randint(0, vocab, (1, settings.prefill_tokens), generator=gen)
        extra = ({"logits_to_keep": 1}
                 if "logits_to_keep" in inspect.signature(model.forward).parameters else {})
        model(long, use_cache=False, **extra)  # warm-up
        prefill = _best(settings.repeats, lambda: model(long, use_cache=False, **extra))
    first = 1 if 1 in settings.batches else settings.batches[0]
    row["ttft_ms"] = row[f"ttft_ms_b{first}"]
    row["prefill_tok_s"] = round(settings.prefill_tokens / prefill, 1)
    row["peak_rss_mb"] = rss.peak_mb()
    row["rss_after_load_mb"] = after_load
    row["load_s"] = round(load_s, 2)
    return row

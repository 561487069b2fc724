"""A GGUF file measured through llama.cpp's Python binding (``llama_cpp``), in the current
process, as :mod:`mpq.bench.measure` measures the others: the same fixed random prompt ids,
time to first token, steady greedy decode rate, prefill of ``prefill_tokens`` tokens, RSS.

The binding decodes one sequence at a time, so only batch 1 is measured (larger batches are
reported as None).  It imports no torch: this module may run in an environment that has
llama_cpp only.
"""
from __future__ import annotations

import random
import time

from mpq.bench import rss
from mpq.bench.configs import Config, Settings


def measure(config: Config, settings: Settings) -> dict:
    """The row of the GGUF file ``config.path``."""
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=config.path, verbose=False, n_threads=settings.threads,
                          n_threads_batch=settings.threads, n_batch=settings.prefill_tokens,
                          n_ctx=max(settings.prefill_tokens,
                                    settings.prompt_tokens + settings.new_tokens) + 8)
    load_s = time.perf_counter() - start
    after_load = rss.current_mb()
    ids = random.Random(0)
    vocab = llm.n_vocab()
    prompt = [ids.randrange(vocab) for _ in range(settings.prompt_tokens)]
    long = [ids.randrange(vocab) for _ in range(settings.prefill_tokens)]

    def generate(tokens: int) -> tuple[float, float]:
        """(time to the first token, total time) of ``tokens`` greedy tokens."""
        llm.reset()
        start = time.perf_counter()
        first = None
        stream = llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True)
        for count, _ in enumerate(stream, start=1):
            if first is None:
                first = time.perf_counter() - start
            if count == tokens:
                break
        return first, time.perf_counter() - start

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(long)
        return time.perf_counter() - start

    generate(4)  # warm-up
    ttft = min(generate(1)[0] for _ in range(max(settings.repeats, 1)))
    _, total = generate(settings.new_tokens)
    prefill()
    best = min(prefill() for _ in range(max(settings.repeats, 1)))
    row = {"model": config.name, "kind": config.kind, "path": config.path, "dtype": "gguf",
           "threads": settings.threads, "paths": {}}
    for batch in settings.batches:
        row[f"decode_tok_s_b{batch}"] = (round((settings.new_tokens - 1) / max(total - ttft, 1e-9), 2)
                                         if batch == 1 else None)
        row[f"ttft_ms_b{batch}"] = round(ttft * 1000, 1) if batch == 1 else None
    row.update(ttft_ms=round(ttft * 1000, 1),
               prefill_tok_s=round(settings.prefill_tokens / best, 1),
               peak_rss_mb=rss.peak_mb(), rss_after_load_mb=after_load,
               load_s=round(load_s, 2))
    return row

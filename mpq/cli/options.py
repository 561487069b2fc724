"""Options shared by several commands."""
from __future__ import annotations

import click

DTYPES = ("auto", "float32", "bfloat16", "float16")

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Machine-readable JSON on stdout instead of tables.")
dtype_option = click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                            help="Dtype to load the model in (auto = the checkpoint's).")

max_unquantized_option = click.option(
    "--max-unquantized", type=click.FloatRange(0, 1), default=None, metavar="SHARE",
    help="Refuse (exit 3), before any weight is read, a plan that leaves more than this share "
         "(0 to 1) of the model's weight bytes unquantized (embeddings, norms, head, fused MoE "
         "experts, layers no rule matched, ...).")


def sample_options(num_samples: int, seq_len_help: str = "Tokens of each sample."):
    """``--num-samples`` (default ``num_samples``) and ``--seq-len`` (default 512): the token
    sequences a command draws from its data."""
    def decorate(command):
        command = click.option("--seq-len", default=512, show_default=True,
                               type=click.IntRange(min=2), help=seq_len_help)(command)
        return click.option("--num-samples", default=num_samples, show_default=True,
                            type=click.IntRange(min=1),
                            help="Token sequences drawn from the data.")(command)
    return decorate


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)

serving_target_option = click.option(
    "--target", "serving_target", default=None, metavar="ENGINE",
    help="The engine the artifact is for: vllm, llama.cpp, transformers or any (default). The "
         "plan must suit it before any weight is read (vllm: fused q/k/v and gate/up share one "
         "scheme, int weights 4/8-bit symmetric per channel or g32/64/128, ...; exit 9 if not); "
         "--target-bits chooses within it. Recorded in the plan.")

"""Multi-process quantization (mpq.engine.distributed): ``torchrun --nproc-per-node 2`` on CPU (gloo)
writes the same artifact, byte for byte, as one process with the same threads per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpq.engine.distributed import Ranks, check_supported, rank_device
from mpq.errors import CalibrationError, ModelError, RecipeError
from mpq.config.kv_cache import KVCacheArgs
from mpq.config.plan import Plan
from mpq.engine.resume import work_dir_for
from tests.helpers import folder_bytes, save_sharded_model

MPQ = Path(sys.executable).parent / "mpq"
# GPTQ (Hessians) with static int8 input scales (maxima), across 4 blocks
RECIPE = """mpq_recipe: 1
name: distributed-test
defaults:
  algorithm: gptq
  options: {act_order: true}
rules:
  - targets: [Linear]
    weights: {format: int, bits: 4, symmetric: false, granularity: group, group_size: 32}
    input_activations: {format: int, bits: 8, dynamic: false, granularity: tensor}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_sharded_model(root / "src")
    words = [f"w{(i * 7) % 23}{'xyz'[i % 3]}" for i in range(6000)]
    (root / "calib.txt").write_text(" ".join(words))
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _quantize_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(root / "src"), "--recipe", str(root / "recipe.yaml"), "-o", str(out),
            "--calib", str(root / "calib.txt"), "--num-samples", "12", "--seq-len", "32",
            "--calib-batch-tokens", "64", "--no-memory-check", *extra]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "--no-python", str(MPQ), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_two_processes_write_the_single_process_artifact(setup, tmp_path, stream):
    single = subprocess.run([str(MPQ), *_quantize_args(setup, tmp_path / "one", stream)],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    run = _torchrun(2, _quantize_args(setup, tmp_path / "two", stream))
    assert run.returncode == 0, run.stderr[-3000:]
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")
    assert not work_dir_for(tmp_path / "two").exists()
    assert run.stdout.count("wrote ") == 1  # only rank 0 reports


@pytest.mark.slow
def test_transforms_are_refused_across_processes(setup, tmp_path):
    recipe = setup / "awq.yaml"
    recipe.write_text(RECIPE.replace("defaults:", "transforms:\n  - {type: awq, grid: 4}\n"
                                     "defaults:"))
    args = _quantize_args(setup, tmp_path / "out")
    args[args.index("--recipe") + 1] = str(recipe)
    run = _torchrun(2, args)
    assert run.returncode != 0
    assert "transform 'awq' is not supported across several processes yet" in run.stderr
    assert not (tmp_path / "out").exists()


def test_share_splits_in_order_and_refuses_too_few_batches():
    items = list(range(7))
    shares = [Ranks(rank, 3).share(items) for rank in range(3)]
    assert sum(shares, []) == items and all(shares)
    # SmolLM2's 32 samples in batches of up to 4 (the first holds one): 17 + 15 samples, not
    # 13 + 19 as an even split of the 9 batches gave
    tokens = [1, 4, 4, 4, 4, 4, 4, 4, 3]
    halves = [Ranks(rank, 2).share(tokens, weights=tokens) for rank in range(2)]
    assert [sum(h) for h in halves] == [17, 15] and sum(halves, []) == tokens
    assert [Ranks(r, 3).share([100, 1, 1], weights=[100, 1, 1]) for r in range(3)] == [
        [100], [1], [1]]  # every process keeps a batch
    with pytest.raises(CalibrationError, match="cannot be split across 3 processes"):
        Ranks(0, 3).share([1, 2])


def test_check_supported_names_the_kv_cache():
    plan = Plan(recipe_name="r", layers=(), precision_policy={}, kv_cache=KVCacheArgs())
    with pytest.raises(RecipeError, match="kv_cache"):
        check_supported(plan)


def test_hessian_sum_does_not_depend_on_the_split():
    """fp64 accumulation of per-batch fp32 terms: one pass over 6 batches equals 2 + 4."""
    from mpq.engine.stats import Hessian

    torch.manual_seed(0)
    batches = [torch.randn(64, 48) * (10 ** (i % 3)) for i in range(6)]
    whole, first, second = Hessian(), Hessian(), Hessian()
    for b in batches:
        whole.add(b)
    for b in batches[:2]:
        first.add(b)
    for b in batches[2:]:
        second.add(b)
    combined = first.total + second.total
    assert torch.equal(combined, whole.total)


def test_each_process_takes_the_gpu_of_its_local_rank():
    cuda = torch.device("cuda")
    assert rank_device(cuda, local_rank=1, gpus=2) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda", 0), local_rank=1, gpus=2) == torch.device("cuda", 0)
    assert rank_device(torch.device("cpu"), local_rank=1, gpus=0) == torch.device("cpu")
    with pytest.raises(ModelError, match="process 2 on this machine has no GPU of its own"):
        rank_device(cuda, local_rank=2, gpus=2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_processes_write_the_single_gpu_artifact(setup, tmp_path):
    """NCCL reduces the GPU-held statistics; float64 sums of fp32 terms are exact, so the
    artifact is the one-GPU run's."""
    args = lambda out: [*_quantize_args(setup, out), "--device", "cuda"]  # noqa: E731
    single = subprocess.run([str(MPQ), *args(tmp_path / "one")], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    run = _torchrun(2, args(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert folder_bytes(tmp_path / "two") == folder_bytes(tmp_path / "one")

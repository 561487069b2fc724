"""Golden matrix: every artifact file of every (family, recipe, format) stays byte-identical.

Each case runs ``mpq quantize SRC --recipe R --format F --calib CALIB -o OUT`` in-process through
the ``mpq`` console script, found as pyproject.toml's ``[project.scripts]`` declares it (no mpq
module is imported by name, so the test survives moving modules around), and compares the sha256
of every file of OUT, by path relative to OUT, with ``tests/golden/artifacts-<CPU>.json`` (one
record per torch CPU capability, e.g. AVX512 and AVX2: their float kernels give other bytes).  A
case recorded as ``refused`` must still exit 9 (the format cannot express the recipe) and leave no
output; any other nonzero exit fails.  (The recorded ``error`` line of a refused case is for the
reader; it is not compared.)

The inputs:
- two tiny random models from ``tests/tiny_models.py`` (seed 0): ``llama`` (untied head, no
  biases) and ``qwen2`` (q/k/v biases), each with the byte tokenizer the other tiny-model tests
  use (vocab 256);
- a fixed ASCII calibration text generated here; ``--num-samples 4 --seq-len 32``;
- 16 recipes: 10 presets, 5 recipe files written here (mxfp4, nvfp4, fp8 128x128 blocks,
  QuaRot W4A8, KV-cache FP8) and ``w4a16 --target-bits 4.5 --sensitivity-samples 2``;
- every format: ``mpq``, ``compressed-tensors``, ``gptq``.

An artifact records the absolute path of its source model, the calibration source and the
recipe file path as given (in README.md, config.json and the safetensors header), so these are
built at a fixed absolute folder (``source_root`` in the JSON, ``<tempdir>/mpq-golden`` when
generated), rebuilt once per session (written to a temporary sibling and renamed into place,
under a lock); only the artifacts go under pytest's tmp_path, whose path is not recorded.
The bytes also depend on the float kernels: torch, transformers (and tokenizers and safetensors,
which write the source model's files) versions and torch's CPU capability are recorded and the
test skips, asking for regeneration, when they differ (``ATEN_CPU_CAPABILITY=avx2`` on an AVX512
machine changes the GPTQ, AWQ, SmoothQuant and activation-searched RTN artifacts, 19 of 96); the
capability picks the record, so a machine of either kind checks its own.  torch's intra-op
thread count is pinned to ``THREADS`` while the matrix runs: GPTQ's artifacts differ between 1
and 2 threads (each is reproducible on its own).

Run only this matrix with ``python -m pytest -m golden`` (the marker is registered in
pyproject.toml).  Regenerate the running CPU capability's golden file (after an intended change
of the bytes, or for new versions; an intended change regenerates every capability's file, each
on a machine of its kind, or removes the ones it cannot)::

    python -m tests.test_golden_matrix --regenerate

from the repository root (``MPQ_REGENERATE_GOLDEN=1 python -m tests.test_golden_matrix`` does the
same).  It runs every case, records written artifacts' hashes and refused (exit 9) cases, and
stops at any other failure without writing.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.golden

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
FAMILIES = ("llama", "qwen2")
FORMATS = ("mpq", "compressed-tensors", "gptq")
THREADS = 1
REFUSED_EXIT = 9
CALIB_ARGS = ("--num-samples", "4", "--seq-len", "32")

# recipes that are not presets: written as files under the source root
RECIPE_FILES = {
    "mxfp4": "mpq_recipe: 1\nname: golden-mxfp4\nrules:\n"
             "  - targets: [Linear]\n    weights: {format: mxfp4}\n",
    "nvfp4": "mpq_recipe: 1\nname: golden-nvfp4\nrules:\n"
             "  - targets: [Linear]\n    weights: {format: nvfp4}\n",
    "fp8-block": "mpq_recipe: 1\nname: golden-fp8-block\nrules:\n"
                 "  - targets: [Linear]\n    weights: {format: fp8_e4m3, granularity: block}\n",
    "quarot-w4a8": "mpq_recipe: 1\nname: golden-quarot-w4a8\ndefaults:\n  algorithm: rtn\n"
                   "  input_activations: {format: int, bits: 8, dynamic: true, "
                   "granularity: token}\n"
                   "rotation: {type: quarot, r1: hadamard, r2: true, r4: true, seed: 0}\n"
                   "rules:\n  - targets: [Linear]\n    weights: {format: int, bits: 4, "
                   "symmetric: true, granularity: group, group_size: 64}\n",
    "kv-fp8": "mpq_recipe: 1\nname: golden-kv-fp8\ndefaults:\n  algorithm: rtn\n"
              "kv_cache: {format: fp8_e4m3, granularity: tensor}\n"
              "rules:\n  - targets: [Linear]\n    weights: {format: int, bits: 4, "
              "symmetric: true, granularity: group, group_size: 64}\n",
}
PRESETS = ("w8a16", "w4a16", "w4a16-asym", "nf4", "nf4-dq", "fp8-weights", "w4a16-gptq",
           "w4a16-awq", "w8a8-int8", "w8a8-fp8")
# recipe label -> (recipe argument: preset name or file name under <root>/recipes, extra args)
RECIPES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: (name, ()) for name in PRESETS},
    **{name: (f"{name}.yaml", ()) for name in RECIPE_FILES},
    "w4a16-target-bits-4.5": ("w4a16", ("--target-bits", "4.5", "--sensitivity-samples", "2")),
}
CASES = [(family, recipe, fmt) for family in FAMILIES for recipe in RECIPES for fmt in FORMATS]


def golden_path() -> Path:
    """The golden record of the running torch CPU capability (tests/golden/artifacts-AVX2.json,
    ...)."""
    return GOLDEN_DIR / f"artifacts-{torch.backends.cpu.get_cpu_capability()}.json"


def case_key(family: str, recipe: str, fmt: str) -> str:
    return f"{family}/{recipe}/{fmt}"


def environment() -> dict:
    """What the bytes depend on besides mpq: checked before comparing."""
    return {"torch": version("torch"), "transformers": version("transformers"),
            "tokenizers": version("tokenizers"), "safetensors": version("safetensors"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": THREADS}


# --- inputs -----------------------------------------------------------------------------------

def calibration_text() -> str:
    """About 6 kB of ASCII words, fixed by arithmetic alone (no RNG whose stream could change)."""
    words = ("the cat sat on a mat while dogs ran over green hills near old towns and rivers "
             "under bright stars in cold winter nights").split()
    lines = []
    for i in range(120):
        picked = [words[(i * 7 + j * j * 3 + j) % len(words)] for j in range(8)]
        lines.append(f"{i}: " + " ".join(picked) + ".")
    return "\n".join(lines) + "\n"


def byte_tokenizer():
    """The tiny models' tokenizer: one token per byte (vocab 256), as tests/test_pipeline.py's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i) if i >= 33 else f"<{i}>": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", eos_token="<1>")


def folder_hashes(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _write_file(path: Path, text: str) -> None:
    """Atomically (temporary sibling, then rename), unless it already holds ``text``."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep other users from reading it
    os.replace(tmp, path)


def _build_model(family: str, target: Path) -> None:
    """Save the tiny model and tokenizer in a temporary sibling of ``target``; put it in place
    unless ``target`` already holds the same files (then another session's copy is kept)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{family}."))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would keep other users from reading it
        save_tiny_model(family, staging, seed=0)
        byte_tokenizer().save_pretrained(staging)
        if target.is_dir() and folder_hashes(target) == folder_hashes(staging):
            return
        if target.exists():
            trash = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{family}.old."))
            target.rename(trash / family)
            shutil.rmtree(trash)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): rely on the rename alone
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_inputs(root: Path) -> None:
    """The source models, the calibration text and the recipe files, at fixed paths."""
    with _locked(root):
        for family in FAMILIES:
            _build_model(family, root / family)
        _write_file(root / "calib.txt", calibration_text())
        for name, text in RECIPE_FILES.items():
            _write_file(root / "recipes" / f"{name}.yaml", text)


@contextlib.contextmanager
def pinned_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- one case -----------------------------------------------------------------------------------

def quantize_args(root: Path, family: str, recipe: str, fmt: str, out: Path) -> list[str]:
    recipe_arg, extra = RECIPES[recipe]
    if recipe_arg.endswith(".yaml"):
        recipe_arg = str(root / "recipes" / recipe_arg)
    return ["quantize", str(root / family), "--recipe", recipe_arg, "--format", fmt,
            "--calib", str(root / "calib.txt"), *CALIB_ARGS, *extra, "-o", str(out)]


def console_script():
    """The ``mpq`` console script's function, as pyproject.toml declares it (``module:function``),
    so the test follows the entry point wherever the CLI module lives."""
    import importlib
    import tomllib

    target = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]["mpq"]
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def run_case(root: Path, family: str, recipe: str, fmt: str, out: Path):
    """(exit code, text to show on failure) of ``mpq quantize`` for this case, run in-process
    as the console script runs it: ``sys.exit(main())`` with ``sys.argv`` set."""
    args = quantize_args(root, family, recipe, fmt, out)
    captured = io.StringIO()
    argv = sys.argv
    sys.argv = ["mpq", *args]
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            try:
                console_script()()
                code = 0
            except SystemExit as exc:
                code = (0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1)
            except Exception:  # noqa: BLE001 - an internal error is exit 1 for the script too
                code = 1
                traceback.print_exc()
    finally:
        sys.argv = argv
    return code, f"$ mpq {' '.join(args)}\n{captured.getvalue()}"


def _stderr_line(output: str) -> str:
    """The refusal's one-line message, shortened: recorded for the reader, never compared."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    line = errors[-1] if errors else output.strip().splitlines()[-1]
    return line if len(line) <= 200 else line[:199] + "…"


# --- the test -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def golden() -> dict:
    path = golden_path()
    recorded = sorted(p.name for p in GOLDEN_DIR.glob("artifacts-*.json"))
    if not recorded:
        pytest.fail(f"no golden record in {GOLDEN_DIR}: python -m tests.test_golden_matrix "
                    "--regenerate")
    if not path.is_file():
        pytest.skip(f"no golden record for this CPU capability ({path.name}; recorded: "
                    f"{', '.join(recorded)}): python -m tests.test_golden_matrix --regenerate")
    data = json.loads(path.read_text())
    recorded, running = data["environment"], environment()
    differ = {k: (recorded.get(k), v) for k, v in running.items() if recorded.get(k) != v}
    if differ:
        pytest.skip("golden artifacts were generated with a different environment ("
                    + ", ".join(f"{k}: recorded {a}, running {b}" for k, (a, b) in differ.items())
                    + "): regenerate with `python -m tests.test_golden_matrix --regenerate`")
    return data


@pytest.fixture(scope="session")
def source_root(golden) -> Path:
    root = Path(golden["source_root"])
    try:
        build_inputs(root)
    except OSError as exc:
        pytest.skip(f"cannot build the golden inputs at the recorded {root} ({exc}): "
                    "regenerate with `python -m tests.test_golden_matrix --regenerate`")
    return root


def test_golden_file_covers_the_matrix(golden):
    recorded = set(golden["artifacts"])
    expected = {case_key(*case) for case in CASES}
    assert recorded == expected, (f"missing: {sorted(expected - recorded)}, "
                                  f"extra: {sorted(recorded - expected)}; regenerate")


@pytest.mark.parametrize("family, recipe, fmt", CASES, ids=[case_key(*c) for c in CASES])
def test_artifact_bytes(family, recipe, fmt, golden, source_root, tmp_path):
    entry = golden["artifacts"].get(case_key(family, recipe, fmt))
    if entry is None:
        pytest.fail("no golden entry for this case: python -m tests.test_golden_matrix "
                    "--regenerate")
    out = tmp_path / "out"
    with pinned_threads(THREADS):
        code, shown = run_case(source_root, family, recipe, fmt, out)
    if entry["status"] == "refused":
        assert code == REFUSED_EXIT, (f"was refused with exit {REFUSED_EXIT}, now exit {code}\n"
                                      f"{shown}")
        assert not out.exists(), "a refused run left an output folder"
        return
    assert code == 0, f"exit {code}\n{shown}"
    actual, expected = folder_hashes(out), entry["files"]
    problems = [f"{name}: missing" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"{name}: not in the golden artifact"
                 for name in sorted(actual.keys() - expected.keys())]
    problems += [f"{name}: sha256 {actual[name]} != recorded {expected[name]}"
                 for name in sorted(expected.keys() & actual.keys())
                 if actual[name] != expected[name]]
    assert not problems, "artifact files differ from the golden ones:\n" + "\n".join(problems)


# --- regeneration ---------------------------------------------------------------------------------

def regenerate(root: Path, path: Path | None = None) -> dict:
    path = path or golden_path()
    build_inputs(root)
    artifacts = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mpq-golden-out-") as work, pinned_threads(THREADS):
        for i, (family, recipe, fmt) in enumerate(CASES):
            out = Path(work) / f"case{i}"
            t0 = time.perf_counter()
            code, shown = run_case(root, family, recipe, fmt, out)
            key = case_key(family, recipe, fmt)
            if code == 0:
                artifacts[key] = {"status": "written", "files": folder_hashes(out)}
            elif code == REFUSED_EXIT and not out.exists():
                artifacts[key] = {"status": "refused", "error": _stderr_line(shown)}
            else:
                raise SystemExit(f"{key}: exit {code}, not regenerating\n{shown}")
            print(f"{key}: {artifacts[key]['status']} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)
    data = {"comment": "sha256 of every file of every artifact of tests/test_golden_matrix.py; "
                       "regenerate with `python -m tests.test_golden_matrix --regenerate`",
            "environment": environment(), "source_root": str(root), "artifacts": artifacts}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}: {len(artifacts)} cases in {time.perf_counter() - started:.1f} s",
          file=sys.stderr)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.test_golden_matrix",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--regenerate", action="store_true",
                        help="run the matrix and rewrite tests/golden/artifacts-<CPU>.json "
                             "(the running torch CPU capability's)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "mpq-golden",
                        help="fixed absolute folder for the source models (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.regenerate or os.environ.get("MPQ_REGENERATE_GOLDEN") == "1"):
        parser.error("nothing to do: pass --regenerate (or set MPQ_REGENERATE_GOLDEN=1)")
    # mpq's own logging.basicConfig would bind the first case's captured stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    regenerate(args.root.resolve(), args.output)


if __name__ == "__main__":
    main()

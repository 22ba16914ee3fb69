"""No optional package at import time (issue 22): bigtrain imports and runs every command whose
work does not need transformers, diffusers, tokenizers, wandb, submitit, deepspeed or webdataset
without them; a config that needs one is refused in one line (exit 2) naming the pip install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TEST_CONFIG

OPTIONAL = ["transformers", "diffusers", "tokenizers", "wandb", "submitit", "deepspeed", "webdataset", "bitsandbytes"]
LM_CONFIG = ROOT / "configs" / "llm" / "stdlib_test.yaml"
UNET_CONFIG = ROOT / "configs" / "diffusion" / "unet_digits.yaml"


def hiding(hidden: list[str], root: Path) -> dict[str, str]:
    """An environment in which ``hidden`` look uninstalled, to this process's children too: a
    ``sitecustomize`` first on PYTHONPATH puts a finder ahead of all others that answers each hidden
    name (and its submodules) with ModuleNotFoundError, for an import and for
    ``importlib.util.find_spec`` alike, as an absent package does."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sitecustomize.py").write_text(
        "import sys\n"
        f"HIDDEN = {sorted(hidden)!r}\n"
        "class _Hide:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name.split('.')[0] in HIDDEN:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (hidden by the test)', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide)\n")
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def without(hidden: list[str], *argv: str, module: str = "bigtrain", timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV`` with the ``hidden`` packages impossible to import."""
    import tempfile

    with tempfile.TemporaryDirectory() as stubs:
        return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=ROOT,
                              timeout=timeout, env=hiding(hidden, Path(stubs)))


def test_the_vit_job_needs_no_optional_package(tmp_path: Path) -> None:
    proc = without(OPTIONAL, "train", str(TEST_CONFIG), f"data.dir={tmp_path / 'data'}", f"run.dir={tmp_path / 'run'}",
                   "train.steps=2", "eval.every_steps=0", "schedule.warmup_steps=0", "schedule.cooldown_steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").is_file()
    for argv in (["families"], ["config", "describe"], ["estimate", str(TEST_CONFIG)]):
        proc = without(OPTIONAL, *argv)
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])


@pytest.mark.parametrize("hidden,argv,needle", [
    (["transformers"], ["config", "show", str(LM_CONFIG)], "model.family=llama (its layers are transformers'"),
    (["tokenizers"], ["config", "show", str(LM_CONFIG), "data.tokenizer=bpe", "model.vocab_size=300"],
     "data.tokenizer=bpe needs the tokenizers package"),
    (["diffusers"], ["config", "show", str(UNET_CONFIG)], "model.family=unet (diffusers' UNet2DConditionModel)"),
    (["wandb"], ["config", "show", str(TEST_CONFIG), "log.wandb=true"], "log.wandb=true needs the wandb package"),
    (["submitit"], ["train", str(TEST_CONFIG), "train.steps=1"], None),  # not needed by train: no error from it
])
def test_a_config_that_needs_a_missing_package_is_one_line(hidden: list[str], argv: list[str], needle: str | None,
                                                           tmp_path: Path) -> None:
    if needle is None:
        proc = without(hidden, *argv, f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}",
                       "schedule.warmup_steps=0", "schedule.cooldown_steps=0", "eval.every_steps=0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    proc = without(hidden, *argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last and "pip install 'bigtrain[" in last, last


@pytest.mark.slow  # the GPU check's CPU run (minutes); the GPU machine has neither webdataset nor diffusers
def test_gpu_check_cpu_run_without_webdataset_or_diffusers(tmp_path: Path) -> None:
    import json

    proc = without(["webdataset", "diffusers"], "--device", "cpu", "--tiny", "--out", str(tmp_path),
                   module="bigtrain.bench.gpu", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())["function"]}
    assert rows["unet"].get("skipped") and "pip install 'bigtrain[diffusers]'" in rows["unet"]["error"]
    assert all(r["resumed"] for name, r in rows.items() if name != "unet")


def test_a_command_that_needs_a_missing_package_is_one_line(tmp_path: Path) -> None:
    """A package imported where the command uses it (prune builds with transformers): exit 2, one
    line naming the command and the pip install, no traceback, nothing written."""
    from test_prune import _model

    src = tmp_path / "src"
    _model().to_hf().save_pretrained(src)
    proc = without(["transformers"], "prune", str(src), "--out", str(tmp_path / "out"), "--layers", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: bigtrain prune needs the transformers package, which is not installed: " \
                   "pip install 'bigtrain[transformers]'", last
    assert not (tmp_path / "out").exists()

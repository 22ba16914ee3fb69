"""Shared fixtures: one small digits shard set per test session, and config helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bigtrain.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = ROOT / "configs" / "vit" / "digits_test.yaml"

def refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A command that ended with exit 2, no traceback and a last line ``error: ...`` holding
    ``needles`` (the contract for bad input); returns that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def refused_in_process(capsys: pytest.CaptureFixture, main: Callable[[list[str]], int], *args: str) -> str:
    """Run a command's entry (``bigtrain.cli._main``, ``launch.submit.main``: they map bad input to
    exit 2) in this process and return its last stderr line, asserting exit 2 and ``error: ...``.
    Same contract as a subprocess without a torch import per probe; any other exception escapes
    and fails the test (a traceback, in a subprocess)."""
    capsys.readouterr()
    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err and err[-1].startswith("error: "), (rc, err[-3:])
    return err[-1]


# `-m quick` (the edit-test loop, a few minutes on 2 cores): the units of every subsystem and one
# small run of each family (train, resume bit-exactly, 2-rank data parallel). Whole files by name,
# or single tests by their name before any parameters.
QUICK_FILES = {"test_layers.py", "test_config.py", "test_schedules.py", "test_optim.py", "test_fewshot.py",
               "test_step_sync.py", "test_sharded_init.py", "test_vit.py", "test_dit.py", "test_guard.py",
               "test_cli.py", "test_data.py", "test_data_specs.py"}
QUICK_TESTS = {"test_every_family_debug_preset"}


# The default run uses two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml): most
# tests run one thread (below), so one worker leaves a core idle. A file is one group, so its
# module fixtures (a trained checkpoint every test of the file reads) are built once; every Slurm
# test is one group, so the one loopback cluster of the session serves them all. Files start
# longest first (measured, see docs/testing.md), so the two workers end together.
LONG_FILES = ["test_slurm.py", "test_resume.py", "test_parallel.py", "test_readme.py", "test_trust.py",
              "test_families.py", "test_trust_inputs.py", "test_prune.py", "test_distill.py", "test_train.py"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the group marks into scopes
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in QUICK_FILES or item.originalname in QUICK_TESTS:
            item.add_marker(pytest.mark.quick)
        group = "slurm" if item.get_closest_marker("slurm") else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    # stable: within a file, pytest's order; the Slurm group is led by test_slurm.py's rank
    items.sort(key=lambda it: 0 if it.get_closest_marker("slurm") else rank.get(it.path.name, len(rank) + 1))


# One thread per test process keeps timings stable on the 2-core CI machine and
# results independent of how many tests run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def launcher(nproc: int = 1, torchrun: bool | None = None) -> list[str]:
    """The command prefix that starts ``nproc`` processes: plain ``python`` for one, ``torchrun
    --standalone`` (as ``python -m torch.distributed.run``, so this interpreter) for more, or for one
    when ``torchrun`` asks for it (its rank environment, its exit-code handling)."""
    if torchrun is None:
        torchrun = nproc > 1
    if not torchrun:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def launch(*args: str, nproc: int = 1, module: str = "bigtrain", torchrun: bool | None = None,
           env: dict[str, str] | None = None, timeout: int = 300, wait: bool = True,
           ) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m MODULE ARGS`` on ``nproc`` ranks (gloo, one thread each), from the repository root,
    output captured: the one way the tests start bigtrain processes. ``env`` adds to this process's
    environment; ``wait=False`` returns the running Popen (for tests that signal or kill it)."""
    cmd = [*launcher(nproc, torchrun), "-m", module, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def required_values(config: Path, workdir: Path) -> list[str]:
    """Overrides for the keys a shipped config leaves ``???`` (today only weights to start or
    distill from): a tiny Llama ``config.json``, which is all validation reads."""
    import yaml

    from bigtrain.config.core import required_keys

    missing = required_keys(yaml.safe_load(config.read_text()) or {})
    if not missing:
        return []
    assert all(k.endswith(".pretrained") for k in missing), f"no test value for {missing} of {config}"
    hf = workdir / "hf_config_only"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False)))
    return [f"{k}={hf}" for k in missing]


def assert_shared_modes(path: Path) -> None:
    """``path`` and everything under it carry the modes the umask gives (0644 files, 0755
    directories at umask 022): a command's output is readable by the user's team."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, f"{p}: mode {oct(p.stat().st_mode & 0o777)}, umask gives {oct(want)}"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from data_pipeline.writer import write_digits

    root = str(tmp_path_factory.mktemp("digits16"))
    write_digits(root, image_size=16, samples_per_shard=128, seed=0)
    return root


@pytest.fixture(scope="session")
def lm_data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Byte-level token shards of the standard library (64-token sequences), written once."""
    from data_pipeline.text import write_text_shards

    root = str(tmp_path_factory.mktemp("stdlib_seq64"))
    write_text_shards(root, seq_len=64, max_bytes=300_000, samples_per_shard=256)
    return root


@pytest.fixture
def tiny_cfg(digits_dir: str, tmp_path: Path):
    """``tiny_cfg("train.steps=4", ...)`` -> Config of the test config in a fresh run dir."""

    def make(*overrides: str) -> Config:
        return load_config(TEST_CONFIG, [f"data.dir={digits_dir}", f"run.dir={tmp_path / 'run'}", *overrides])

    return make


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A real two-node Slurm on loopback (launch/local_slurm.sh), started once for the session and
    stopped at its end. Where it cannot start (no root to install it, no Debian, daemons fail),
    the tests that need it are skipped with the reason, which ``-ra`` prints in the summary."""
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("Slurm tests: no bash")
    root = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "BIGTRAIN_SLURM_ROOT": str(root), "BIGTRAIN_SLURM_NODES": "2", "BIGTRAIN_SLURM_CPUS": "4"}
    script = str(ROOT / "launch" / "local_slurm.sh")
    try:
        out = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("Slurm tests: launch/local_slurm.sh start took over 10 minutes")
    if out.returncode != 0:
        reason = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["no output"]
        pytest.skip(f"Slurm tests: the local cluster did not start: {reason[0]}")
    slurm_env = {"SLURM_CONF": str(root / "etc" / "slurm.conf")}
    saved = {k: os.environ.get(k) for k in slurm_env}
    os.environ.update(slurm_env)  # sbatch/squeue/scontrol in the tests and in submitit talk to it
    yield {"root": str(root), **slurm_env}
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=120)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def parity(config: Path, overrides: list[str], layouts: list[list[str]], workdir: Path, nproc: int = 2,
           timeout: int = 600) -> tuple[dict, Path, str]:
    """``bigtrain.tools.parity``: train ``config`` + ``overrides`` in one process (the reference), then
    under each layout on ``nproc`` ranks. Returns the per-layout comparison, the reference file and
    the ranks' stderr (what rank 0 logged, layout by layout)."""
    args = [x for o in overrides for x in ("--override", o)]
    ref, out = workdir / "ref.pt", workdir / "results.json"
    base = ["--config", str(config), *args]
    proc = launch(*base, "--workdir", str(workdir / "one"), "--reference", str(ref), module="bigtrain.tools.parity")
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = launch(*base, "--workdir", str(workdir / "two"), "--against", str(ref), "--out", str(out), "--layouts",
                  json.dumps(layouts), nproc=nproc, torchrun=True, module="bigtrain.tools.parity", timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(out.read_text()), ref, proc.stderr

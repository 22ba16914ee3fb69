"""The README's quick starts, run as written (issue 23): every shell command in every ```bash block
of its "Quick starts" section, in a fresh directory that holds the repository's ``configs/``,
``launch/`` and ``slurm/`` (what a user's checkout has), so the front page cannot rot. A block
passes when each command exits 0 and what it names exists afterwards (a ``run.dir``'s
results.json, an ``--out``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def quick_starts(readme: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    """(label, script) per ```bash block of the "Quick starts" section; the label is the bold text
    of the paragraph before the block."""
    text = readme.read_text()
    start = text.index("\n## Quick starts\n")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = []
    for m in re.finditer(r"```bash\n(.*?)```", section, re.S):
        label = re.findall(r"\*\*(.+?)\*\*", section[:m.start()])
        blocks.append((label[-1] if label else f"block {len(blocks)}", m.group(1)))
    return blocks


def _commands(script: str) -> list[list[str]]:
    joined = script.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def _expected_outputs(script: str, cwd: Path) -> list[Path]:
    out = []
    for argv in _commands(script):
        for i, a in enumerate(argv):
            if a.startswith("run.dir=") and "train" in argv:
                out.append(cwd / a.split("=", 1)[1] / "results.json")
            if a == "--out" and i + 1 < len(argv):
                out.append(cwd / argv[i + 1])
    return out


def run_block(script: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 1200) -> None:
    for name in ("configs", "launch", "slurm"):
        (cwd / name).symlink_to(ROOT / name)
    bin_dir = os.path.dirname(sys.executable)  # bigtrain, torchrun: this interpreter's scripts
    full_env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), **(env or {})}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script}\n{proc.stderr[-4000:]}"
    missing = [str(p) for p in _expected_outputs(script, cwd) if not p.exists()]
    assert not missing, (script, missing)


BLOCKS = quick_starts()


def test_the_readme_has_a_quick_start_per_workload_and_launch_path() -> None:
    labels = " | ".join(label for label, _ in BLOCKS)
    for needed in ("ViT", "LLM", "Diffusion", "torchrun", "Slurm", "submitit"):
        assert needed in labels, (needed, labels)
    assert all(_commands(script) for _, script in BLOCKS)


LOCAL = [b for b in BLOCKS if "sbatch" not in b[1]]
SLURM = [b for b in BLOCKS if "sbatch" in b[1]]


@pytest.mark.parametrize("label,script", LOCAL, ids=[label for label, _ in LOCAL])
def test_quick_start_runs_as_written(label: str, script: str, tmp_path: Path) -> None:
    run_block(script, tmp_path)


@pytest.mark.slurm
@pytest.mark.parametrize("label,script", SLURM, ids=[label for label, _ in SLURM])
def test_slurm_quick_start_runs_as_written(label: str, script: str, slurm_cluster: dict, tmp_path: Path) -> None:
    # the cluster's nodes run this interpreter (a user's nodes run the python3 bigtrain is installed in)
    run_block(script, tmp_path, env={"BIGTRAIN_PYTHON": sys.executable})

"""Checkpoint trust, part 2 (issue 21): nothing named by a checkpoint's files is imported, every
command checks its inputs before work (one line, exit 2, no traceback, nothing written), and no
output replaces what the user owns. Each probe reproduces a failure a review observed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TEST_CONFIG, assert_shared_modes, refused

PAYLOAD = "evilfam:FAMILY"
QUIET = ["eval.every_steps=0", "eval.final=false", "eval.fewshot=false", "log.progress=false", "schedule.warmup_steps=0",
         "schedule.cooldown_steps=0"]
DIT = ["model.variant=debug", "model.image_size=16", "data.image_size=16", "data.augment=none", "model.num_classes=10",
       "train.global_batch_size=16", "schedule.warmup_steps=1", "schedule.cooldown_steps=0", "diffusion.samples=0"]


def cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def refused_in_process(capsys: pytest.CaptureFixture, *args: str) -> str:
    from bigtrain.cli import _main
    from conftest import refused_in_process as refused_by

    return refused_by(capsys, _main, *args)


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(digest(p).encode() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpts(digits_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ViT and a DiT checkpoint (2 steps each)."""
    root = tmp_path_factory.mktemp("trust_inputs")
    dit_cfg = root / "dit.yaml"
    dit_cfg.write_text(f"model:\n  family: dit\ndata:\n  dir: {digits_dir}\n")
    out = {}
    for name, config, extra in (("vit", TEST_CONFIG, []), ("dit", dit_cfg, DIT)):
        proc = cli("train", str(config), f"data.dir={digits_dir}", f"run.dir={root / name}", "train.steps=2",
                   "checkpoint.every_steps=2", *QUIET, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = root / name / "checkpoints" / "step_00000002"
    return out


def _evil_checkpoint(src: Path, dest: Path, fix_marker: bool) -> Path:
    """A copy of ``src`` whose config.yaml names a module family; with ``fix_marker`` the marker's
    checksum is rewritten to match (an attacker who can write both files)."""
    import shutil

    from bigtrain.checkpoint.integrity import CHECKSUM, MARKER, file_digest

    shutil.copytree(src, dest)
    config = dest / "config.yaml"
    config.write_text(config.read_text().replace("family: vit", f"family: {PAYLOAD}", 1))
    assert PAYLOAD in config.read_text()
    if fix_marker:
        marker = json.loads((dest / MARKER).read_text())
        size, xx = file_digest(str(config))
        marker["files"]["config.yaml"] = {"size": size, CHECKSUM: xx}
        (dest / MARKER).write_text(json.dumps(marker))
    return dest


@pytest.fixture
def attack(ckpts: dict[str, Path], tmp_path: Path) -> Path:
    """A working directory holding evilfam.py, which writes PWNED when imported."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "evilfam.py").write_text("import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('ran')\n")
    return work


def _entry_points(evil: Path, ckpts: dict[str, Path], work: Path, digits_dir: str) -> dict[str, list[str]]:
    train = ["train", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={work / 'run'}", "train.steps=1", *QUIET]
    return {
        "export": ["export", str(evil), "--format", "hf", "--out", str(work / "hf")],
        "sample": ["sample", str(evil), "--n", "2", "--steps", "2", "--out", str(work / "grid.png")],
        "sample --classifier": ["sample", str(ckpts["dit"]), "--classifier", str(evil), "--n", "2", "--steps", "2",
                                "--out", str(work / "grid.png")],
        "model.pretrained": [*train, f"model.pretrained={evil}"],
        "teacher.pretrained": [*train, "task=distill", "teacher.family=vit", f"teacher.pretrained={evil}"],
        "resume": [*train, f"resume={evil}"],
        "eval": ["eval", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={work / 'run'}", f"resume={evil}"],
        "prune": ["prune", str(evil), "--out", str(work / "pruned")],
    }


@pytest.mark.parametrize("entry", ["export", "sample", "sample --classifier", "model.pretrained", "teacher.pretrained",
                                   "resume", "prune"])
def test_a_family_named_by_a_checkpoint_is_never_imported(entry: str, ckpts: dict[str, Path], attack: Path,
                                                           digits_dir: str, tmp_path: Path) -> None:
    evil = _evil_checkpoint(ckpts["vit"], tmp_path / "evil", fix_marker=True)
    proc = cli(*_entry_points(evil, ckpts, attack, digits_dir)[entry], cwd=attack)
    last = refused(proc, PAYLOAD)
    # resume compares the saved config as data: the module is named, never imported
    assert "--trust-family" in last or "saved with other settings: model.family" in last, last
    assert not (attack / "PWNED").exists()
    assert sorted(p.name for p in attack.iterdir()) == ["evilfam.py"]  # nothing written


@pytest.mark.parametrize("entry", ["export", "model.pretrained", "prune"])
def test_an_edited_config_fails_its_checksum_before_it_is_parsed(entry: str, ckpts: dict[str, Path], attack: Path,
                                                                 digits_dir: str, tmp_path: Path) -> None:
    evil = _evil_checkpoint(ckpts["vit"], tmp_path / "evil", fix_marker=False)
    refused(cli(*_entry_points(evil, ckpts, attack, digits_dir)[entry], cwd=attack), "config.yaml: ", "expected")
    assert not (attack / "PWNED").exists()


def test_init_and_eval_never_read_the_config_and_trusting_is_explicit(ckpts: dict[str, Path], attack: Path,
                                                                       digits_dir: str, tmp_path: Path) -> None:
    evil = _evil_checkpoint(ckpts["vit"], tmp_path / "evil", fix_marker=True)
    entry = _entry_points(evil, ckpts, attack, digits_dir)
    for args in (entry["model.pretrained"][:-1] + [f"init={evil}"], entry["eval"]):
        proc = cli(*args, cwd=attack)  # weights into the user's own model: the saved config is never parsed
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (attack / "PWNED").exists()
    # the user's explicit trust is the one way in: the module is imported (and is no family)
    proc = cli("export", str(evil), "--format", "hf", "--out", str(attack / "hf"), "--trust-family", PAYLOAD, cwd=attack)
    refused(proc, "has no attribute 'FAMILY'")
    assert (attack / "PWNED").exists()


@pytest.mark.parametrize("args,needle", [
    (["--steps", "5000"], "--steps 5000: the model has 1000 diffusion timesteps"),
    (["--labels", "3,x"], "--labels '3,x'"),
    (["--labels", "3,11"], "--labels: classes must be in [0, 10)"),
    (["--device", "banana"], "--device 'banana'"),
    (["--sampler", "euler"], "--sampler euler: the model was trained with diffusion.objective=ddpm"),
    (["--n", "100000000"], "--n 100000000: at most"),
    (["--cfg", "nan"], "--cfg nan"),
    (["--n", "0"], "--n 0: must be at least 1"),
])
def test_sample_arguments_are_checked_before_work(args: list[str], needle: str, ckpts: dict[str, Path],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert needle in refused_in_process(capsys, "sample", str(ckpts["dit"]), "--out", str(tmp_path / "grid.png"), *args)
    assert not any(tmp_path.iterdir())


def test_sample_never_overwrites_what_it_did_not_write(ckpts: dict[str, Path], tmp_path: Path) -> None:
    mine = tmp_path / "photo.png"
    mine.write_bytes(b"\x89PNG not bigtrain's")
    before = digest(mine)
    refused(cli("sample", str(ckpts["dit"]), "--n", "2", "--steps", "2", "--out", str(mine)), "not this command's own")
    refused(cli("sample", str(ckpts["dit"]), "--n", "2", "--steps", "2", "--out", str(tmp_path)), "is a directory")
    refused(cli("sample", str(ckpts["dit"]), "--n", "2", "--steps", "2", "--classifier", str(ckpts["dit"]),
                "--out", str(tmp_path / "g.png")), "not an image classifier")
    assert digest(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]
    grid = tmp_path / "grid.png"
    for _ in range(2):  # its own earlier grid is replaced
        proc = cli("sample", str(ckpts["dit"]), "--n", "10", "--steps", "2", "--out", str(grid))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "photo.png"]
    proc = cli("sample", str(ckpts["dit"]), "--n", "2", "--steps", "2", "--out", str(mine), "--force")
    assert proc.returncode == 0 and digest(mine) != before, proc.stderr[-3000:]


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=.inf", "'optim.lr' must be a finite number"),
    ("data.mean=[.nan]", "'data.mean[0]' must be a finite number"),
    ("optim.beta1=1.5", "'optim.beta1' must be < 1"),
    ("optim.beta2=-0.5", "'optim.beta2' must be >= 0"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be >= 0"),
    ("optim.head_weight_decay=-0.5", "'optim.head_weight_decay' must be >= 0 or -1"),
    ("train.preempt_signals=[SIGKILL]", "SIGKILL cannot be caught"),
    ("train.preempt_signals=[SIG_DFL]", "'SIG_DFL' is not a signal name"),
    ("diffusion.timesteps=200000000", "'diffusion.timesteps' must be <= 100000"),
    ("diffusion.guidance=.inf", "'diffusion.guidance' must be a finite number"),
])
def test_values_that_make_a_run_meaningless_are_refused(override: str, needle: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert needle in refused_in_process(capsys, "config", "show", str(TEST_CONFIG), override)


def test_atomic_output_leaves_nothing_that_loads_when_killed(tmp_path: Path) -> None:
    """A process killed while building an output leaves only its ``.partial-`` sibling, which the
    next run removes; the output path never appears half-written."""
    out = tmp_path / "pruned"
    code = ("import os, sys\nfrom bigtrain.outputs import atomic_output\n"
            f"with atomic_output({str(out)!r}, 'dir') as tmp:\n"
            "    open(os.path.join(tmp, 'config.json'), 'w').write('{}')\n"
            "    os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60)
    assert proc.returncode == -9
    assert not out.exists() and len(list(tmp_path.glob("pruned.partial-*"))) == 1
    from bigtrain.outputs import atomic_output

    with atomic_output(str(out), "dir") as tmp:
        Path(tmp, "done").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"] and (out / "done").is_file()


def test_estimate_refuses_what_train_refuses(capsys: pytest.CaptureFixture) -> None:
    last = refused_in_process(capsys, "estimate", str(TEST_CONFIG), "parallel.tp=3", "--world-size", "3")
    assert "'model.num_heads' (2) is not divisible by parallel.tp=3" in last  # it said "fits" before
    assert "--world-size must be between 1 and" in refused_in_process(capsys, "estimate", str(TEST_CONFIG),
                                                                    "--world-size", "100000000")


def test_export_never_overwrites_what_it_did_not_write(ckpts: dict[str, Path], tmp_path: Path) -> None:
    mine = tmp_path / "weights.safetensors"
    mine.write_bytes(b"my own file")
    refused(cli("export", str(ckpts["vit"]), "--out", str(mine)), "not this command's own earlier output")
    refused(cli("export", str(ckpts["vit"]), "--out", str(ckpts["vit"] / "model.safetensors")), "overlaps the input")
    assert mine.read_bytes() == b"my own file"
    out = tmp_path / "model.safetensors"
    for _ in range(2):  # its own earlier export is replaced
        proc = cli("export", str(ckpts["vit"]), "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "weights.safetensors"]
    assert_shared_modes(out)  # safetensors writes 0600; a team reads exports
    proc = cli("export", str(ckpts["vit"]), "--out", str(mine), "--force")
    assert proc.returncode == 0 and mine.read_bytes() != b"my own file", proc.stderr[-3000:]


def test_a_distillation_that_trains_nothing_is_refused(ckpts: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    last = refused_in_process(capsys, "config", "show", str(TEST_CONFIG), "task=distill", "teacher.family=vit",
                              f"teacher.pretrained={ckpts['vit']}", "teacher.variant=custom", "teacher.image_size=16",
                              "distill.kd_weight=0", "distill.ce_weight=0")
    assert "'distill.kd_weight' and 'distill.ce_weight' are both 0" in last

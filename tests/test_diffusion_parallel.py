"""Diffusion models under parallel layouts: DiT loss, weights and EMA match one process under
ZeRO-3 (with a parameter whose first dimension, 11 label embeddings, does not split evenly) and
tensor parallelism; the EMA saved at dp2 resumes in one process and at tp2; the same-layout resume
with EMA is bit-exact; `bigtrain sample` and `bigtrain export` use the EMA weights."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, launch, parity

RTOL = 1e-5  # fp32 parity tolerance of the other layout tests
DIT = ["model.variant=debug", "model.image_size=16", "data.image_size=16", "data.augment=none", "model.num_classes=10",
       "train.global_batch_size=16", "train.steps=4", "ema.decay=0.8", "ema.warmup_power=0.5", "diffusion.label_dropout=0.25",
       "schedule.warmup_steps=1", "schedule.cooldown_steps=0", "log.every_steps=1", "eval.final=false",
       "optim.lr=0.003", "parallel.timeout_s=120"]


def _config(tmp_path: Path, digits_dir: str) -> Path:
    path = tmp_path / "dit.yaml"
    path.write_text(f"model:\n  family: dit\ndata:\n  dir: {digits_dir}\n")
    return path


def test_dit_and_its_sharded_ema_match_one_process(tmp_path: Path, digits_dir: str) -> None:
    layouts = [["parallel.dp=2", "parallel.zero=3"], ["parallel.tp=2", "parallel.sequence_parallel=false"]]
    results, ref_path, _ = parity(_config(tmp_path, digits_dir), DIT, layouts, tmp_path)
    ref = torch.load(ref_path, weights_only=True)
    assert ref["ema"]["y_embedder.weight"].shape[0] == 11  # uneven under dp2: shards of 6 and 5 rows
    moved = max(float((ref["ema"][k] - ref["initial"][k]).abs().max()) for k in ref["ema"])
    lag = max(float((ref["ema"][k] - ref["params"][k]).abs().max()) for k in ref["ema"])
    assert moved > 1e-3 and lag > 1e-4, (moved, lag)  # the EMA changed, and is not the raw weights
    for name, r in results.items():
        print(name, {k: r[k] for k in ("max_loss_rel_diff", "param_update_rel_diff", "ema_rel_diff", "ema_max_abs_diff")})
        assert r["steps"] == 4 and r["same_keys"] and r["ema_same_keys"], (name, r)
        assert r["max_loss_rel_diff"] <= RTOL, (name, r)
        assert r["param_update_rel_diff"] <= 1e-4 and r["ema_rel_diff"] <= RTOL, (name, r)


def _train(args: list[str], nproc: int = 1) -> None:
    proc = launch("train", *args, nproc=nproc, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _ema(run: Path, step: int) -> dict[str, torch.Tensor]:
    from bigtrain.export import load_model_state

    return load_model_state(str(run / "checkpoints" / f"step_{step:08d}"), "ema")


def _resume_from(src: Path, dst: Path, step: int) -> None:
    shutil.copytree(src, dst)
    for later in (dst / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)


def test_ema_resumes_exactly_in_layout_and_across_layouts(tmp_path: Path, digits_dir: str) -> None:
    config = str(_config(tmp_path, digits_dir))
    common = [config, *DIT, "checkpoint.every_steps=2", "checkpoint.keep_last=0"]
    _train([*common, f"run.dir={tmp_path / 'one'}"])
    ref = _ema(tmp_path / "one", 4)
    # same layout, resumed from step 2: bit-exact
    _resume_from(tmp_path / "one", tmp_path / "again", 2)
    _train([*common, f"run.dir={tmp_path / 'again'}"])
    again = _ema(tmp_path / "again", 4)
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    # saved at dp2 ZeRO-3, resumed in one process and at tp2: within the parity tolerance
    _train([*common, f"run.dir={tmp_path / 'dp2'}", "parallel.dp=2", "parallel.zero=3"], nproc=2)
    for name, layout, nproc in (("to_one", [], 1), ("to_tp2", ["parallel.tp=2", "parallel.sequence_parallel=false"], 2)):
        _resume_from(tmp_path / "dp2", tmp_path / name, 2)
        _train([*common, f"run.dir={tmp_path / name}", *layout], nproc=nproc)
        got = _ema(tmp_path / name, 4)
        diff = sum(float((got[k] - ref[k]).double().pow(2).sum()) for k in ref) ** 0.5
        norm = sum(float(ref[k].double().pow(2).sum()) for k in ref) ** 0.5
        assert diff / norm <= RTOL, (name, diff / norm)
    # sampling and export read the EMA by default
    ckpt = tmp_path / "one" / "checkpoints" / "step_00000004"
    out = subprocess.run([sys.executable, "-m", "bigtrain", "sample", str(ckpt), "--n", "20", "--steps", "4", "--cfg", "2",
                          "--out", str(tmp_path / "grid.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["weights"] == "ema" and summary["samples"] == 20 and (tmp_path / "grid.png").stat().st_size > 0
    from safetensors.torch import load_file

    exported = tmp_path / "dit.safetensors"
    assert subprocess.run([sys.executable, "-m", "bigtrain", "export", str(ckpt), "--out", str(exported)], cwd=ROOT,
                          timeout=300).returncode == 0
    weights = load_file(str(exported))
    assert all(torch.equal(weights[k], ref[k]) for k in ref)


@pytest.mark.parametrize("bad,message", [(["parallel.tp=2"], "sequence parallelism"), (["parallel.pp=2"], "pipeline")])
def test_layouts_dit_cannot_run_fail_before_training(tmp_path: Path, digits_dir: str, bad: list[str], message: str) -> None:
    proc = launch("train", str(_config(tmp_path, digits_dir)), *DIT, *bad, f"run.dir={tmp_path / 'bad'}", nproc=2)
    # each rank exits 2 (bad input); torchrun itself reports a failed child with 1
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())


@pytest.mark.parametrize("bad,message", [
    (["model.learn_sigma=true", "diffusion.objective=flow"], "model.learn_sigma"),
    (["diffusion.sampler=euler"], "diffusion.sampler"),
    (["diffusion.eval_classifier=x"], "diffusion.samples"),
    (["model.patch_size=3"], "model.patch_size"),
])
def test_inconsistent_diffusion_keys_are_named(tmp_path: Path, digits_dir: str, bad: list[str], message: str) -> None:
    from bigtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):  # the family's validate runs as the config loads
        load_config(str(_config(tmp_path, digits_dir)), [*DIT, "diffusion.samples=0", *bad])

"""Parity of parallel layouts with a single-process reference (gloo, fp32).

Tolerances (stated in docs/parallelism.md): per-step loss and gradient-norm relative
difference <= 1e-5, and ||P - P_ref|| / ||P_ref - P_0|| <= 2e-5 over all
parameters after training (the parameter difference relative to how far
training moved the parameters).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TEST_CONFIG, launch

LOSS_RTOL = 1e-5
PARAM_RTOL = 2e-5
LM_CONFIG = ROOT / "configs" / "llm" / "stdlib_test.yaml"
MODELS = {
    # config, overrides for every run of that model, the fixture that holds its data
    "vit_digits": (TEST_CONFIG, ["model.dropout=0", "train.steps=6", "schedule.cooldown_steps=2",
                                 "checkpoint.every_steps=0", "train.micro_batch_size=0", "parallel.timeout_s=120"],
                   "digits_dir"),
    "llm_stdlib": (LM_CONFIG, ["train.steps=6", "checkpoint.every_steps=0", "parallel.timeout_s=120"], "lm_data_dir"),
}


def _overrides(model: str, data_dir: str) -> list[str]:
    out = []
    for o in [f"data.dir={data_dir}", *MODELS[model][1]]:
        out += ["--override", o]
    return out


@pytest.fixture(scope="module", params=sorted(MODELS))
def reference(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    model = request.param
    data_dir = request.getfixturevalue(MODELS[model][2])
    work = tmp_path_factory.mktemp(f"parity-{model}")
    ref = work / "ref.pt"
    proc = launch("--config", str(MODELS[model][0]), *_overrides(model, data_dir), "--workdir", str(work),
                  "--reference", str(ref), module="bigtrain.tools.parity")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return model, ref, data_dir


def run_layouts(reference: tuple, nproc: int, layouts: list[list[str]], tmp_path: Path) -> dict:
    model, ref, data_dir = reference
    out = tmp_path / "results.json"
    proc = launch("--config", str(MODELS[model][0]), *_overrides(model, data_dir), "--workdir", str(tmp_path),
                  "--against", str(ref), "--out", str(out), "--layouts", json.dumps(layouts), nproc=nproc, torchrun=True,
                  module="bigtrain.tools.parity", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def check(results: dict, expected: int) -> None:
    assert len(results) == expected
    for name, r in results.items():
        assert r["same_keys"], name
        assert r["steps"] == r["ref_steps"] == 6, name
        assert r["initial_param_max_abs_diff"] == 0.0, f"{name}: every layout starts from the same weights"
        assert r["max_loss_rel_diff"] <= LOSS_RTOL, f"{name}: {r}"
        assert r["max_grad_norm_rel_diff"] <= LOSS_RTOL, f"{name}: {r}"
        assert r["param_update_rel_diff"] <= PARAM_RTOL, f"{name}: {r}"


def test_two_rank_layouts_match_single_process(reference, tmp_path: Path) -> None:
    layouts = [
        ["parallel.zero=0"],
        ["parallel.zero=1"],
        ["parallel.zero=2"],
        ["parallel.zero=3", "train.micro_batch_size=8"],  # gradient accumulation under FSDP
        ["parallel.zero=1", "train.micro_batch_size=4"],
        ["parallel.tp=2"],  # + sequence parallel (default)
        ["parallel.tp=2", "parallel.sequence_parallel=false"],
        ["parallel.tp=2", "parallel.activation_checkpointing=full"],
        ["parallel.zero=3", "parallel.activation_checkpointing=selective", "parallel.ac_every=2"],
        ["parallel.pp=2", "parallel.pp_schedule=gpipe"],
        ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.microbatches=4"],
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
        ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_split=[1,2,3]"],
    ]
    check(run_layouts(reference, 2, layouts, tmp_path), len(layouts))


def test_four_rank_2d_layouts_match_single_process(reference, tmp_path: Path) -> None:
    layouts = [
        ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"],
        ["parallel.dp=2", "parallel.tp=2", "parallel.zero=3"],
        ["parallel.pp=2", "parallel.dp=2", "parallel.zero=2", "parallel.pp_schedule=interleaved_1f1b"],
        ["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=1f1b"],
    ]
    check(run_layouts(reference, 4, layouts, tmp_path), len(layouts))


# The ViT's 8-rank run is slow-marked (CI time); the LM's covers the same 3D layouts by default.
@pytest.mark.parametrize("reference", ["llm_stdlib", pytest.param("vit_digits", marks=pytest.mark.slow)],
                         indirect=True)
def test_eight_rank_3d_layouts_match_single_process(reference, tmp_path: Path) -> None:
    layouts = [
        ["parallel.pp=2", "parallel.dp=2", "parallel.tp=2", "parallel.zero=1", "parallel.pp_schedule=zbv"],
        ["parallel.pp=2", "parallel.dp=2", "parallel.tp=2", "parallel.zero=3", "parallel.pp_schedule=interleaved_1f1b"],
    ]
    check(run_layouts(reference, 8, layouts, tmp_path), len(layouts))


def test_impossible_layouts_fail_before_work(digits_dir: str, tmp_path: Path) -> None:
    from bigtrain.config import ConfigError, load_config
    from bigtrain.distributed import infer_degrees
    from bigtrain.families.vit.parallelize import check_vit_layout
    from bigtrain.models.vit import ViT, ViTArgs

    cfg = load_config(TEST_CONFIG, ["parallel.tp=3"])
    with pytest.raises(ConfigError, match=r"cannot infer parallel.dp: pp=1 x tp=3 = 3 does not divide the world size 4"):
        infer_degrees(cfg.parallel, 4)
    with pytest.raises(ConfigError, match=r"pp=1 x dp=2 x tp=2 = 4 processes, but the world size is 8"):
        infer_degrees(load_config(None, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=1"]).parallel, 8)
    model = ViT(ViTArgs(width=36, depth=1, mlp_dim=72, num_heads=6, patch_size=4, image_size=16, in_channels=1))
    with pytest.raises(ConfigError, match=r"'model.num_heads' \(6\) is not divisible by parallel.tp=4"):
        check_vit_layout(model, 4, sequence_parallel=False)
    with pytest.raises(ConfigError, match="zbv with parallel.zero >= 2 is not supported"):
        from bigtrain.distributed.pipeline import stages_per_rank

        stages_per_rank(load_config(None, ["parallel.pp_schedule=zbv", "parallel.zero=3"]).parallel)
    model = ViT(ViTArgs(width=36, depth=1, mlp_dim=72, num_heads=6, patch_size=4, image_size=16, in_channels=1, head="cls"))
    with pytest.raises(ConfigError, match=r"token count \(17\) divisible by parallel.tp=3"):
        check_vit_layout(model, 3, sequence_parallel=True)


def test_torchrun_layout_mismatch_is_one_line(digits_dir: str, tmp_path: Path) -> None:
    proc = launch("train", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={tmp_path}", "parallel.tp=2",
                  "parallel.dp=2", nproc=2)
    assert proc.returncode != 0
    assert "error: cannot infer parallel.pp: dp=2 x tp=2 = 4 does not divide the world size 2" in proc.stderr
    assert f'File "{ROOT / "bigtrain"}' not in proc.stderr, "no traceback from inside bigtrain, only torchrun's own report"


def test_killed_rank_fails_the_job_fast(digits_dir: str, tmp_path: Path) -> None:
    """kill -9 of one rank mid-training ends the whole job promptly instead of hanging."""
    import signal
    import time

    run = tmp_path / "run"
    proc = launch("train", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={run}", "train.steps=100000",
                  "eval.every_steps=0", "checkpoint.every_steps=0", "checkpoint.save_final=false", "parallel.zero=3",
                  "parallel.timeout_s=30", nproc=2, wait=False)
    assert isinstance(proc, subprocess.Popen)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until training is under way
            if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        else:
            pytest.fail("training did not start")
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)
        t0 = time.monotonic()
        proc.wait(timeout=90)
        assert proc.returncode != 0
        assert time.monotonic() - t0 < 90
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_launch_env_detection() -> None:
    from bigtrain.distributed.mesh import LaunchEnv, first_host

    assert LaunchEnv.detect({}).world_size == 1
    tr = LaunchEnv.detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.source) == (3, 8, 1, "10.0.0.5", 1234, "torchrun")
    sl = LaunchEnv.detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
                           "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu3"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.source) == (5, 8, 1, "slurm")
    assert sl.master_addr == "gpu07" and sl.master_port == 20000 + 4242
    assert LaunchEnv.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"  # sbatch shell, not srun
    assert first_host("node1") == "node1" and first_host("a[3-4]b") == "a3b"


def test_pipeline_evaluation_matches_one_process(digits_dir: str, tmp_path: Path) -> None:
    """``bigtrain eval`` of one checkpoint under pp=2 gives one process's metrics (top-1 exactly,
    loss and few-shot to float rounding): the last stage's logits and features reach every pp rank
    as tensors on that rank's device (no pickled CUDA tensors on the sender's device index)."""
    common = [str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={tmp_path / 'run'}", "eval.every_steps=0",
              "eval.final=false", "train.steps=6", "checkpoint.every_steps=6", "schedule.cooldown_steps=2"]
    proc = launch("train", *common, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = f"resume={tmp_path / 'run' / 'checkpoints' / 'step_00000006'}"
    results = {}
    for name, nproc, layout in (("one", 1, []), ("pp2", 2, ["parallel.pp=2"])):
        proc = launch("eval", *common, ckpt, *layout, nproc=nproc, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    one, pp2 = results["one"], results["pp2"]
    assert one["eval/top1"] == pp2["eval/top1"] and one["eval/num_samples"] == pp2["eval/num_samples"]
    assert abs(one["eval/loss"] - pp2["eval/loss"]) <= LOSS_RTOL * abs(one["eval/loss"])
    shots = [k for k in one if k.startswith("eval/fewshot")]
    assert shots and all(abs(one[k] - pp2[k]) <= 1e-3 for k in shots), {k: (one[k], pp2[k]) for k in shots}

"""Distillation (task=distill, the teacher section): the KD loss's math and reduction, a student equal
to its teacher has nothing to learn, config errors before work starts, the Minitron chain (train a
teacher, prune it, distill the pruned student) end to end, and the layouts: dp2 ZeRO-3 and tp2
match one process, and a run saved under dp2 ZeRO-3 resumes in one process and at tp2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import launch, parity

ROOT = Path(__file__).resolve().parents[1]
LM_CONFIG = ROOT / "configs" / "llm" / "stdlib_test.yaml"
QUIET = ["log.progress=false", "eval.final=false", "eval.every_steps=0"]


def bigtrain(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return launch(*args, nproc=nproc)


@pytest.fixture(scope="module")
def teacher(lm_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4-layer byte-level Llama trained 20 steps (bigtrain checkpoint), its HF export, and a
    depth-pruned (2 layers) copy made by `bigtrain prune`."""
    root = tmp_path_factory.mktemp("teacher")
    proc = bigtrain("train", str(LM_CONFIG), f"data.dir={lm_data_dir}", f"run.dir={root / 'run'}", "train.steps=20",
                    *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = root / "run" / "checkpoints" / "step_00000020"
    proc = bigtrain("export", str(ckpt), "--format", "hf", "--out", str(root / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = bigtrain("prune", str(ckpt), "--out", str(root / "pruned"), "--layers", "2", "--data", lm_data_dir,
                    "--calib-samples", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"ckpt": ckpt, "hf": root / "hf", "pruned": root / "pruned"}


def _distill_args(teacher: dict[str, Path], data: str, run: Path, *extra: str) -> list[str]:
    report = json.loads((teacher["pruned"] / "prune_report.json").read_text())
    kept = ",".join(str(i) for i in report["kept_layers"])
    return ["train", str(LM_CONFIG), f"data.dir={data}", f"run.dir={run}", "task=distill", "teacher.family=llama",
            f"teacher.pretrained={teacher['ckpt']}", f"model.pretrained={teacher['pruned']}", "model.depth=0",
            "model.width=0", "model.num_heads=0", "model.num_kv_heads=0", "model.mlp_dim=0", "distill.ce_weight=0.5",
            "distill.hidden_weight=0.5", f"distill.hidden_layers=[{kept}]", "parallel.sequence_parallel=false",
            "optim.lr=3e-4", *QUIET, *extra]  # a pruned start wants ~1/5 of the teacher's LR (Minitron)


# --- the loss --------------------------------------------------------------------------------------
def test_kd_loss_is_forward_kl_per_token_times_tau_squared() -> None:
    from bigtrain.tasks.distill import kd_per_item, teacher_probs

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    for tau in (1.0, 2.0):
        got = kd_per_item(s, teacher_probs(t, tau), tau)
        assert got.shape == (3, 5)  # one value per token: summed over the vocabulary, not averaged
        ref = F.kl_div(F.log_softmax(s / tau, -1).flatten(0, 1), F.softmax(t / tau, -1).flatten(0, 1),
                       reduction="batchmean") * tau**2
        assert float(got.mean()) == pytest.approx(float(ref), rel=1e-5)
    assert float(kd_per_item(t, teacher_probs(t, 1.0), 1.0).abs().max()) < 1e-6  # student == teacher
    # a target with exact zeros (sparse stored logits) is well defined
    q = torch.zeros(11)
    q[2], q[7] = 0.25, 0.75
    assert torch.isfinite(kd_per_item(s[0, 0], q, 1.0))


def test_kd_gradient_matches_finite_differences() -> None:
    from bigtrain.tasks.distill import kd_per_item, teacher_probs

    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    q = teacher_probs(torch.randn(2, 3, 7, generator=g, dtype=torch.float64), 1.5)
    assert torch.autograd.gradcheck(lambda x: kd_per_item(x, q, 1.5).mean(), (s,))


def test_student_equal_to_teacher_has_nothing_to_learn() -> None:
    """KD, hidden-state loss and disagreement are 0; weight-0 rows (bad samples) add nothing."""
    from bigtrain.models.causal_lm import CausalLM, llama_config
    from bigtrain.tasks.distill import DistillLMTask, default_layer_map

    assert default_layer_map(2, 4) == [1, 3] and default_layer_map(4, 4) == [0, 1, 2, 3]
    torch.manual_seed(0)
    teacher = CausalLM(llama_config(257, 32, 2, 4, 2, 64, 16)).eval()
    student = CausalLM(llama_config(257, 32, 2, 4, 2, 64, 16))
    student.load_state_dict(teacher.state_dict())
    task = DistillLMTask(student, teacher, temperature=2.0, ce_weight=0.3, hidden_weight=1.0)
    tokens = torch.randint(0, 257, (3, 17))
    out = task({"tokens": tokens, "weight": torch.ones(3)})
    assert float(out["kd"]) < 1e-6 and float(out["hidden"]) < 1e-10 and float(out["teacher_agreement"]) == 1.0
    assert float(out["loss"].detach()) == pytest.approx(0.3 * float(out["ce"]), abs=1e-5)
    # a different student: the loss only sees rows of weight 1
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    one = task({"tokens": tokens[:1], "weight": torch.ones(1)})
    padded = task({"tokens": torch.cat([tokens[:1], torch.randint(0, 257, (2, 17))]), "weight": torch.tensor([1., 0., 0.])})
    for key in ("loss", "kd", "ce", "hidden"):
        assert float(padded[key].detach()) == pytest.approx(float(one[key].detach()), rel=1e-5), key
    assert float(one["kd"]) > 1e-4 and float(one["hidden"]) > 1e-6


# --- config ----------------------------------------------------------------------------------------
def test_distillation_config_errors(teacher: dict[str, Path]) -> None:
    from bigtrain.config import ConfigError, load_config

    base = [f"teacher.pretrained={teacher['ckpt']}", "teacher.family=llama", "task=distill"]
    cases = [
        (["task=distill"], "task=distill distills from a teacher: set the teacher section"),
        (["task=distill", "teacher.family=llama"], "'teacher.pretrained' must name the teacher's weights"),
        ([*base, "parallel.pp=2"], "parallel.pp must be 1"),
        ([*base, "model.vocab_size=300"], r"the teacher's vocabulary \(257"),
        ([*base, "distill.hidden_weight=1", "model.width=32", "model.num_heads=4"], "needs the teacher's width"),
        ([*base, "distill.hidden_weight=1", "parallel.tp=2"], "set parallel.sequence_parallel=false"),
        ([*base, "distill.hidden_layers=[0,1,2,9]"], r"'distill.hidden_layers' needs one teacher block \(0..3\)"),
        ([*base[:2], "task=distill", "teacher.pretrained=/nonexistent"], "config key 'teacher.pretrained'"),
        ([*base, "distill.temperature=0"], "distill.temperature"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(LM_CONFIG, overrides)
    cfg = load_config(LM_CONFIG, [*base, "model.depth=2"])
    assert (cfg.teacher.depth, cfg.teacher.width, cfg.teacher.seq_len) == (4, 64, cfg.model.seq_len)


# --- the chain, end to end -------------------------------------------------------------------------
def test_prune_then_distill_trains_and_resumes_exactly(teacher: dict[str, Path], lm_data_dir: str, tmp_path: Path) -> None:
    """The pruned student (an HF dir) learns from the teacher (a bigtrain checkpoint; the HF export
    gives the same targets); the checkpoint holds the teacher's fingerprint, not its weights; a
    resume from step 4 repeats steps 5-8 bit for bit."""
    from test_resume import model_params, train_records

    run = tmp_path / "run"
    proc = bigtrain(*_distill_args(teacher, lm_data_dir, run, "train.steps=8", "checkpoint.every_steps=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = train_records(run)
    assert {"kd", "ce", "hidden", "teacher_agreement"} <= set(rec[1])
    assert "activations not estimated" not in proc.stderr  # the memory check profiles student and teacher
    assert rec[8]["kd"] < rec[1]["kd"] and rec[8]["loss"] < rec[1]["loss"]
    ckpt = run / "checkpoints" / "step_00000004"
    saved = model_params(ckpt)
    assert not any(k.startswith("teacher") for k in saved) and len(saved["layers.1.mlp.down_proj.weight"]) == 64
    meta = torch.distributed.checkpoint.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert "teacher.fingerprint" in meta and not any(k.startswith("teacher.") and k != "teacher.fingerprint" for k in meta)

    resumed = tmp_path / "resumed"
    proc = bigtrain(*_distill_args(teacher, lm_data_dir, resumed, "train.steps=8", "checkpoint.every_steps=4",
                                   f"resume={ckpt}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = train_records(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step]["loss"] == rec[step]["loss"] and got[step]["kd"] == rec[step]["kd"], step

    hf_run = tmp_path / "hf-teacher"
    proc = bigtrain(*_distill_args(teacher, lm_data_dir, hf_run, "train.steps=2", "checkpoint.every_steps=0"),
                    f"teacher.pretrained={teacher['hf']}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step, r in train_records(hf_run).items():
        assert r["kd"] == pytest.approx(rec[step]["kd"], rel=1e-5), step


# --- layouts ---------------------------------------------------------------------------------------
def test_sharded_distillation_matches_one_process_and_resumes_elastically(teacher: dict[str, Path], lm_data_dir: str,
                                                                          tmp_path: Path) -> None:
    """dp2 ZeRO-3 (teacher FSDP-sharded too) and tp2 (teacher tensor-parallel) train like one
    process; a run saved under dp2 ZeRO-3 continues in one process and at tp2 within tolerance."""
    from test_resume import check_elastic_continuation

    common = _distill_args(teacher, lm_data_dir, tmp_path / "x", "train.steps=8", "checkpoint.every_steps=4",
                           "train.global_batch_size=8")[2:]
    overrides = [o for o in common if not o.startswith("run.dir=")]
    results, _, _ = parity(LM_CONFIG, overrides, [["parallel.zero=3"], ["parallel.tp=2"]], tmp_path)
    for name, r in results.items():
        assert r["initial_param_max_abs_diff"] == 0.0, name
        assert r["max_loss_rel_diff"] <= 1e-5 and r["param_update_rel_diff"] <= 2e-5, (name, r)

    saved_run = tmp_path / "dp2-zero3"
    proc = bigtrain(*_distill_args(teacher, lm_data_dir, saved_run, "train.steps=8", "checkpoint.every_steps=4",
                                   "train.global_batch_size=8", "parallel.zero=3"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for nproc, layout in ((1, []), (2, ["parallel.tp=2"])):
        run = tmp_path / f"resumed-{nproc}"
        proc = bigtrain(*_distill_args(teacher, lm_data_dir, run, "train.steps=8", "checkpoint.every_steps=4",
                                       "train.global_batch_size=8", *layout,
                                       f"resume={saved_run / 'checkpoints' / 'step_00000004'}"), nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        check_elastic_continuation(saved_run, run, layout, 1e-5)

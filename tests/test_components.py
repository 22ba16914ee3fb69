"""Training components (EMA): the update rule, evaluation with the averaged weights, exact resume,
checkpoints from before the component existed, and data-parallel parity of the averaged weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TEST_CONFIG, launch

EMA_RUN = ["train.steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=0", "eval.every_steps=0",
           "eval.fewshot=false", "schedule.cooldown_steps=2", "ema.decay=0.8", "log.every_steps=1"]


def _cli(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return launch("train", str(TEST_CONFIG), *args, nproc=nproc)


def _saved(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from bigtrain.checkpoint import SafeFileSystemReader, SafeLoadPlanner, _single_process_ok

    reader = SafeFileSystemReader(str(ckpt))
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in reader.read_metadata().state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata) and len(m.size)}
    with _single_process_ok():
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def test_ema_update_rule_and_evaluation_swap() -> None:
    from bigtrain.components import EMA, TrainComponent

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.75)
    assert isinstance(ema, TrainComponent)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.after_optimizer_step(1)
    for n, p in model.named_parameters():
        assert torch.allclose(ema.shadow[n], 0.75 * start[n] + 0.25 * p)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.evaluation():
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.shadow[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, raw[n]), "the raw weights come back after the evaluation"
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_ema_decay_warm_up() -> None:
    """With warm-up the first update copies the weights, then the decay climbs as 1 - (1 + n)^-power
    up to its cap; the update count (saved with the state) drives it."""
    from bigtrain.components import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup_power=0.75)
    decays = []
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        before = {n: s.clone() for n, s in ema.shadow.items()}
        decays.append(ema.current_decay())
        ema.after_optimizer_step(step)
        for n, p in model.named_parameters():
            assert torch.allclose(ema.shadow[n], decays[-1] * before[n] + (1 - decays[-1]) * p)
    assert decays == pytest.approx([0.0, 1 - 2 ** -0.75, 0.5, 0.5])  # 1 - 3^-0.75 = 0.56 is capped at 0.5
    assert EMA(model, decay=0.9).current_decay() == 0.9


def test_ema_resumes_exactly_and_starts_from_weights_of_an_older_checkpoint(digits_dir: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _cli(1, f"data.dir={digits_dir}", f"run.dir={run}", *EMA_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = run / "checkpoints" / "step_00000006"
    ema, params = _saved(final, "ema.params."), _saved(final, "model.")
    assert ema.keys() == params.keys() and any(not torch.equal(ema[k], params[k]) for k in ema)
    reference = {k: v.clone() for k, v in ema.items()}
    import shutil

    shutil.rmtree(final)
    proc = _cli(1, f"data.dir={digits_dir}", f"run.dir={run}", *EMA_RUN)
    assert proc.returncode == 0 and "step_00000003" in proc.stderr, proc.stderr[-3000:]
    again = _saved(final, "ema.params.")
    assert all(torch.equal(again[k], reference[k]) for k in reference), "bit-identical after resume"

    # a checkpoint written without an EMA: the EMA starts from its weights (logged), training goes on
    plain = tmp_path / "plain"
    args = [a for a in EMA_RUN if not a.startswith("ema.")]
    assert _cli(1, f"data.dir={digits_dir}", f"run.dir={plain}", *args).returncode == 0
    shutil.rmtree(plain / "checkpoints" / "step_00000006")
    proc = _cli(1, f"data.dir={digits_dir}", f"run.dir={plain}", *EMA_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no 'ema' state" in proc.stderr
    weights3 = _saved(plain / "checkpoints" / "step_00000003", "model.")
    ema6 = _saved(plain / "checkpoints" / "step_00000006", "ema.params.")
    model6 = _saved(plain / "checkpoints" / "step_00000006", "model.")
    for k in weights3:  # three updates from the step-3 weights: between them and the step-6 weights
        lo, hi = torch.minimum(weights3[k], model6[k]), torch.maximum(weights3[k], model6[k])
        assert bool(((ema6[k] >= lo - 1e-3) & (ema6[k] <= hi + 1e-3)).all()), k


def test_ema_matches_one_process_under_zero3(digits_dir: str, tmp_path: Path) -> None:
    """The averaged weights of a dp2 ZeRO-3 run (DTensor shards) equal the one-process run's within
    the parity tolerance (fp32, dropout off)."""
    args = [f"data.dir={digits_dir}", *EMA_RUN, "model.dropout=0", "parallel.timeout_s=60"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert _cli(1, f"run.dir={one}", *args).returncode == 0
    proc = _cli(2, f"run.dir={two}", *args, "parallel.zero=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = _saved(one / "checkpoints" / "step_00000006", "ema.params.")
    b = _saved(two / "checkpoints" / "step_00000006", "ema.params.")
    start = _saved(one / "checkpoints" / "step_00000003", "ema.params.")
    assert a.keys() == b.keys()
    num = sum(float((b[k] - a[k]).double().pow(2).sum()) for k in a)
    den = sum(float((a[k] - start[k]).double().pow(2).sum()) for k in a)
    assert (num / den) ** 0.5 <= 2e-5

    # the evaluation used the averaged weights: with ema.eval=false the same run evaluates otherwise
    raw = tmp_path / "raw"
    assert _cli(1, f"run.dir={raw}", *args, "ema.eval=false").returncode == 0

    def final_eval(run: Path) -> float:
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]["eval/loss"]

    assert final_eval(one) == pytest.approx(final_eval(two), rel=1e-4)
    assert final_eval(one) != final_eval(raw)

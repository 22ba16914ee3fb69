"""Stored sparse teacher logits (`bigtrain distill-logits`, distill.logits): the records replay the
live teacher's targets (top-k classes exact, values to fp16 rounding) on the very samples — for
images the very augmented crops — the student's loader reads; a store written for another seed,
another data order or too few steps is refused; students train from it (LM and ViT)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import refused

ROOT = Path(__file__).resolve().parents[1]
LM_CONFIG = ROOT / "configs" / "llm" / "stdlib_test.yaml"
VIT_CONFIG = ROOT / "configs" / "vit" / "digits_test.yaml"
QUIET = ["log.progress=false", "eval.final=false", "eval.every_steps=0", "checkpoint.every_steps=0"]


def bigtrain(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _teacher(config: Path, data: str, run: Path, *extra: str) -> Path:
    proc = bigtrain("train", str(config), f"data.dir={data}", f"run.dir={run}", "train.steps=6", *QUIET, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "step_00000006"


@pytest.fixture(scope="module")
def lm(lm_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("lm_logits")
    ckpt = _teacher(LM_CONFIG, lm_data_dir, root / "teacher")
    distill = [f"data.dir={lm_data_dir}", "task=distill", "teacher.family=llama", f"teacher.pretrained={ckpt}",
               "model.depth=2", "train.steps=4", "distill.temperature=2"]
    proc = bigtrain("distill-logits", str(LM_CONFIG), *distill, "--out", str(root / "store"), "--top-k", "5",
                    "--samples-per-shard", "24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"store": root / "store", "overrides": distill, "root": root}


@pytest.fixture(scope="module")
def vit(digits_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("vit_logits")
    ckpt = _teacher(VIT_CONFIG, digits_dir, root / "teacher")
    distill = [f"data.dir={digits_dir}", "data.augment=crop_flip", "task=distill", "teacher.family=vit",
               f"teacher.pretrained={ckpt}", "teacher.variant=custom", "teacher.image_size=16", "teacher.head=map",
               "model.depth=2", "train.steps=6"]
    proc = bigtrain("distill-logits", str(VIT_CONFIG), *distill, "--out", str(root / "store"), "--top-k", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"store": root / "store", "overrides": distill, "root": root}


def _live(config: Path, overrides: list[str], positions: list[int], stored: Path | None = None) -> tuple[dict, torch.Tensor]:
    """The student's loader batch at ``positions`` (with the store's fields when ``stored``) and the
    live teacher's logits on exactly that batch, (batch, items, classes)."""
    from bigtrain.config import load_config
    from bigtrain.distributed import ParallelState
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_teacher, make_task, train_dataset
    from data_pipeline import load_split
    from data_pipeline.logits import StoredLogits

    cfg = load_config(config, overrides)
    run = RunSpec.of(cfg)
    ps = ParallelState.create(cfg.parallel)
    dataset = train_dataset(run, load_split(cfg.data.dir, cfg.data.train_split))
    if stored is not None:
        dataset.stored = StoredLogits(str(stored))
    batch = dataset[positions]
    teacher = build_teacher(run, ps, None)
    return batch, make_task(run, teacher.model, teacher.model).teacher_logits(batch)


def _check_replay(batch: dict, logits: torch.Tensor, tau: float) -> None:
    val, idx = logits.topk(batch["t_idx"].shape[-1], dim=-1)
    assert torch.equal(batch["t_idx"], idx)
    assert torch.allclose(batch["t_val"], val.half().float(), rtol=0, atol=0)  # fp16 rounding, nothing else
    assert torch.allclose(batch["t_lse"], torch.logsumexp(logits / tau, dim=-1), rtol=1e-6, atol=1e-6)


def test_sparse_target_rebuilds_the_distribution() -> None:
    from bigtrain.tasks.distill import sparse_target, teacher_probs

    logits = torch.randn(2, 3, 9)
    lse = torch.logsumexp(logits / 1.5, -1)
    full = sparse_target(*logits.topk(9, -1), lse, 9, 1.5)  # k = V: exact
    assert torch.allclose(full, teacher_probs(logits, 1.5), atol=1e-6)
    val, idx = logits.topk(4, -1)
    q = sparse_target(val, idx, lse, 9, 1.5)
    assert torch.allclose(q.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert torch.allclose(q.gather(-1, idx), teacher_probs(logits, 1.5).gather(-1, idx), atol=1e-6)


def test_lm_store_replays_the_live_teacher(lm: dict) -> None:
    meta = json.loads((lm["store"] / "logits.json").read_text())
    assert (meta["samples"], meta["items"], meta["top_k"], meta["vocab"]) == (4 * 16, 64, 5, 257)
    assert len(meta["shards"]) == 3 and meta["stats"]["kl_mean"] > 0 and 0 < meta["stats"]["topk_mass_mean"] < 1
    positions = [0, 23, 24, 63]  # both ends of a shard, the next one's first, the last
    batch, logits = _live(LM_CONFIG, lm["overrides"], positions, lm["store"])
    _check_replay(batch, logits.float(), 2.0)


def test_vit_store_replays_the_same_augmented_crops(vit: dict) -> None:
    """The teacher saw random crops and flips; the student's loader, reading the store, draws the
    same ones from (seed, position): the live teacher on the student's batch reproduces the record."""
    positions = [0, 5, 31, 95]
    batch, logits = _live(VIT_CONFIG, vit["overrides"], positions, vit["store"])
    _check_replay(batch, logits.float(), 1.0)
    other, _ = _live(VIT_CONFIG, vit["overrides"], [p + 1 for p in positions])  # not a constant image
    assert not torch.equal(other["image"], batch["image"])


def test_stale_or_foreign_stores_are_refused(lm: dict, tmp_path: Path) -> None:
    from bigtrain.config import ConfigError, load_config
    from data_pipeline import DataError
    from data_pipeline.logits import StoredLogits

    student = [o for o in lm["overrides"] if not o.startswith("teacher.")] + [f"distill.logits={lm['store']}"]
    load_config(LM_CONFIG, student)  # fits
    for extra, message in ((["train.seed=1"], "data seed 0, this run has 1"),
                           (["train.steps=5"], "stores 64 samples, this run reads 80"),
                           (["distill.temperature=1"], "temperature 2.0, this run has 1.0"),
                           (["model.seq_len=32"], "targets per sample 64, this run has 32"),
                           (["distill.hidden_weight=1"], "a logit store .* holds logits only")):
        with pytest.raises(ConfigError, match=message):
            load_config(LM_CONFIG, [*student, *extra])
    # a record that belongs to another sample (another data set behind the same positions)
    broken = tmp_path / "store"
    broken.mkdir()
    for f in os.listdir(lm["store"]):
        (broken / f).write_bytes((lm["store"] / f).read_bytes())
    store = StoredLogits(str(broken))
    rec = np.memmap(broken / "logits-000000.bin", dtype=store.meta.record, mode="r+")
    rec["sample"][3] += 1
    rec.flush()
    with pytest.raises(DataError, match="position 3 was stored for sample"):
        store.targets(3, 0, int(rec["sample"][3]) - 1)
    (broken / "logits-000002.bin").write_bytes(b"short")
    with pytest.raises(DataError, match="logits-000002.bin has 5 bytes"):
        StoredLogits(str(broken))


@pytest.mark.parametrize("kind", ["lm", "vit"])
def test_students_train_from_the_store(kind: str, lm: dict, vit: dict, tmp_path: Path) -> None:
    setup, config = (lm, LM_CONFIG) if kind == "lm" else (vit, VIT_CONFIG)
    student = [o for o in setup["overrides"] if not o.startswith("teacher.")] + [f"distill.logits={setup['store']}"]
    proc = bigtrain("train", str(config), *student, f"run.dir={tmp_path / 'run'}", "log.every_steps=1", *QUIET)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == (4 if kind == "lm" else 6) and all(np.isfinite(r["kd"]) for r in train)
    assert "pretrained from" not in proc.stderr  # the teacher was never built
    assert "activations not estimated" not in proc.stderr  # the memory check profiles the stored-target path


def _copy_store(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in os.listdir(src):
        (dest / f).write_bytes((src / f).read_bytes())
    return dest


def _edit_meta(store: Path, **fields: object) -> None:
    meta = json.loads((store / "logits.json").read_text())
    meta.update(fields)
    (store / "logits.json").write_text(json.dumps(meta))


def _student(lm: dict, store: Path, run: Path) -> subprocess.CompletedProcess:
    student = [o for o in lm["overrides"] if not o.startswith("teacher.")] + [f"distill.logits={store}"]
    return bigtrain("train", str(LM_CONFIG), *student, f"run.dir={run}", *QUIET)


def test_a_flipped_byte_in_a_shard_is_refused_at_start_up(lm: dict, tmp_path: Path) -> None:
    store = _copy_store(lm["store"], tmp_path / "store")
    data = bytearray((store / "logits-000001.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (store / "logits-000001.bin").write_bytes(bytes(data))
    proc = _student(lm, store, tmp_path / "run")
    refused(proc, "logits-000001.bin fails its SHA-256 checksum")
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or '"kind": "train"' not in (
        tmp_path / "run" / "metrics.jsonl").read_text()  # not one update was made


def test_records_no_teacher_could_write_are_refused_on_read(lm: dict, tmp_path: Path) -> None:
    """Damage that passes the shard checksums (a store whose checksums were rewritten to match): ids
    out of range or repeated, logits that make a top-k mass above 1, non-finite values."""
    import hashlib

    from data_pipeline import DataError
    from data_pipeline.logits import StoredLogits, fields_digest, read_meta

    for name, edit, message in (("ids", lambda r: r["idx"].__setitem__(slice(None), 0), "repeats a class id"),
                                ("range", lambda r: r["idx"].__setitem__((slice(None), 0), 300), r"outside \[0, 257\)"),
                                ("thirty", lambda r: r["val"].__setitem__(slice(None), 30), "summing to"),
                                ("nan", lambda r: r["lse"].__setitem__(slice(None), np.nan), "non-finite")):
        store = _copy_store(lm["store"], tmp_path / name)
        meta = read_meta(str(store))
        rec = np.memmap(store / "logits-000000.bin", dtype=meta.record, mode="r+")
        edit(rec[2])
        rec.flush()
        del rec
        entry = meta.shards[0]
        entry["sha256"] = hashlib.sha256((store / "logits-000000.bin").read_bytes()).hexdigest()
        _edit_meta(store, shards=meta.shards, fields_sha256=fields_digest(meta))
        opened = StoredLogits(str(store))
        assert opened.verify() == []  # the checksums agree: only the record checks can tell
        r = opened.record(2)
        with pytest.raises(DataError, match=message):
            opened.targets(2, int(r["seed"]), int(r["sample"]))


@pytest.mark.parametrize("fields,needle", [
    ({"samples_per_shard": 0}, "'samples_per_shard' must be an integer >= 1"),
    ({"temperature": 4.0}, "fields were edited after the store was written"),
    ({"sha256": 1}, "unknown field 'sha256'"),
    ({"shards": [{"name": "../../etc/passwd", "bytes": 1, "sha256": "0" * 64}] * 3}, "shard entry 0 is malformed"),
    ({"top_k": "5"}, "'top_k' must be an integer"),
])
def test_edited_or_malformed_store_metadata_is_refused_before_work(lm: dict, tmp_path: Path, fields: dict,
                                                                   needle: str) -> None:
    store = _copy_store(lm["store"], tmp_path / "store")
    _edit_meta(store, **fields)
    refused(_student(lm, store, tmp_path / "run"), needle)
    assert not (tmp_path / "run").exists()


def test_distill_logits_arguments_are_checked_before_work(lm: dict, tmp_path: Path) -> None:
    for flag, value in (("--samples-per-shard", "0"), ("--samples-per-shard", "-4"), ("--batch-size", "-3")):
        proc = bigtrain("distill-logits", str(LM_CONFIG), *lm["overrides"], "--out", str(tmp_path / "s"), flag, value)
        refused(proc, flag)
        assert not any(tmp_path.iterdir())

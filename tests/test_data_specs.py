"""Shard specs (issue 24, item 1): webdataset brace patterns, several patterns joined with '::',
shards under webdataset's own names without an index; counts scanned once and stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipeline import DataError
from data_pipeline.spec import COUNTS_NAME, expand_braces, expand_spec, load_spec

from conftest import TEST_CONFIG, launch, refused_in_process

PATTERNS = ["a-{000..003}.tar", "x{1..3}{a,b}", "{a,b{1,2}}c", "d{0..10..5}", "lit{x}", "{3..1}", "{01..3}",
            "{-01..2}", "p/{a,b}/s-{8..11}.tar", "none"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_brace_expansion_is_webdatasets(pattern: str) -> None:
    """The same names braceexpand (what webdataset expands its urls with) gives."""
    braceexpand = pytest.importorskip("braceexpand")
    assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern))


@pytest.mark.parametrize("spec, needle", [
    ("a{1..2", "unbalanced '{'"),
    ("a}b", "unbalanced '}'"),
    ("s3://bucket/x-{0..2}.tar", "uses 's3', but shards are read from local paths only"),
    ("pipe:curl -s http://x/a.tar", "uses 'pipe'"),
    ("a.tar::", "empty pattern"),
    ("a.tar::a.tar", "named twice"),
    ("x-{0..99999999999}.tar", "expands to more than"),
    ("x-{0..4..0}.tar", "a range step of 0"),
])
def test_bad_specs_are_one_line_naming_the_key(spec: str, needle: str) -> None:
    with pytest.raises(DataError) as err:
        expand_spec(spec, "data.train")
    assert str(err.value).startswith("config key 'data.train': ") and needle in str(err.value), err.value


def _webdataset_named(src: str, split: str, dest: Path, prefix: str) -> str:
    """``src``'s split copied as ``prefix-000000.tar ...`` (webdataset's naming, no index); its spec."""
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in Path(src).glob(f"{split}-*.tar"))
    for i, name in enumerate(names):
        shutil.copy(Path(src) / name, dest / f"{prefix}-{i:06d}.tar")
    return str(dest / f"{prefix}-{{000000..{len(names) - 1:06d}}}.tar")


def test_counts_are_scanned_once_and_stored(digits_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _webdataset_named(digits_dir, "train", tmp_path / "wds", "digits")
    info = load_spec(spec, "data.train", str(tmp_path / "cache"))
    index = json.loads((Path(digits_dir) / "index.json").read_text())["splits"]["train"]
    assert [s.num_samples for s in info.shards] == [s["num_samples"] for s in index["shards"]]
    assert not info.indexed and info.meta == {}
    assert (tmp_path / "wds" / COUNTS_NAME).is_file(), "stored beside the shards"

    import data_pipeline.spec as spec_module

    def no_scan(path: str) -> None:
        raise AssertionError(f"scanned {path} again")

    monkeypatch.setattr(spec_module, "scan_shard", no_scan)
    again = load_spec(spec, "data.train", str(tmp_path / "cache"))
    assert [s.num_samples for s in again.shards] == [s.num_samples for s in info.shards]
    monkeypatch.undo()

    # a stored count that is not a count is scanned again, not trusted
    counts_file = tmp_path / "wds" / COUNTS_NAME
    stored = json.loads(counts_file.read_text())
    stored["shards"]["digits-000000.tar"]["num_samples"] = -5
    counts_file.write_text(json.dumps(stored))
    assert load_spec(spec, "data.train").shards[0].num_samples == 128

    # a shard that changed is scanned again; the others are not
    last = tmp_path / "wds" / "digits-000011.tar"
    shutil.copy(Path(digits_dir) / "train-000000.tar", last)
    assert load_spec(spec, "data.train").shards[-1].num_samples == 128


def test_counts_go_to_the_cache_where_the_shards_directory_takes_none(digits_dir: str, tmp_path: Path) -> None:
    """(As root no directory is read-only: a directory in the counts file's place makes the write fail.)"""
    spec = _webdataset_named(digits_dir, "test", tmp_path / "wds", "eval")
    (tmp_path / "wds" / COUNTS_NAME).mkdir()
    load_spec(spec, "data.eval", str(tmp_path / "cache"))
    stored = list((tmp_path / "cache" / "shard-counts").glob("*.json"))
    assert len(stored) == 1 and len(json.loads(stored[0].read_text())["shards"]) == 3
    assert not list((tmp_path / "wds").glob(".counts-*")), "no temporary left behind"


def test_a_spec_of_indexed_shards_keeps_the_index(digits_dir: str) -> None:
    info = load_spec(f"{digits_dir}/train-{{000000..000005}}.tar::{digits_dir}/train-0000{{06..11}}.tar", "data.train")
    assert info.indexed and info.num_classes == 10 and len(info.shards) == 12
    assert not (Path(digits_dir) / COUNTS_NAME).exists(), "the index gave every count"


def test_missing_shard_or_empty_spec_is_refused(digits_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bigtrain.cli import _main

    base = ["train", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={tmp_path / 'r'}"]
    last = refused_in_process(capsys, _main, *base, f"data.train={digits_dir}/train-{{000000..000012}}.tar")
    assert "config key 'data.train': shard" in last and "train-000012.tar does not exist" in last, last
    last = refused_in_process(capsys, _main, *base, "data.eval=gs://bucket/eval-{0..3}.tar")
    assert "config key 'data.eval'" in last and "uses 'gs'" in last, last
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_training_from_webdataset_named_shards_equals_the_data_dir_run(digits_dir: str, tmp_path: Path) -> None:
    """The same shards under webdataset's names, no index, named by brace specs: the same losses
    and evaluation, bit for bit, as data.dir; the embedded set is not written anywhere."""
    train = _webdataset_named(digits_dir, "train", tmp_path / "wds", "digits")
    evals = _webdataset_named(digits_dir, "test", tmp_path / "wds", "digits-test")
    common = ["train.steps=4", "eval.every_steps=0", "checkpoint.every_steps=0", "schedule.warmup_steps=1",
              "schedule.cooldown_steps=0", "log.progress=off", "eval.fewshot=false"]
    runs = {}
    for name, data in (("dir", [f"data.dir={digits_dir}"]),
                       ("spec", [f"data.train={train}", f"data.eval={evals}", f"data.dir={tmp_path / 'absent'}"])):
        run = tmp_path / name
        proc = launch("train", str(TEST_CONFIG), *data, f"run.dir={run}", *common)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [(r["step"], r.get("loss"), r.get("eval/top1"), r.get("eval/loss")) for r in lines
                      if r.get("kind") in ("train", "eval")]
    assert runs["spec"] == runs["dir"] and len(runs["dir"]) == 5 and runs["dir"][-1][2] is not None, runs
    assert not (tmp_path / "absent").exists(), "nothing written for data.dir"


# --- weighted mixtures (issue 24, item 3) ---------------------------------------------------------
@pytest.mark.parametrize("weights", [[0.75, 0.25], [0.5, 0.3, 0.2], [1.0, 1.0], [0.999, 0.001]])
def test_every_prefix_of_the_interleaving_holds_the_weights_to_a_sample(weights: list[float]) -> None:
    import numpy as np

    from data_pipeline.order import MIXTURE_PERIOD, interleave

    pattern = interleave(weights)
    share = np.asarray(weights) / sum(weights)
    n = np.arange(1, MIXTURE_PERIOD + 1)
    for s in range(len(weights)):
        drawn = np.cumsum(pattern == s)
        assert np.all(np.abs(drawn - share[s] * n) < 1.0 + n / MIXTURE_PERIOD), s  # + quota rounding (<= 0.5/period per position)


def test_a_mixture_draws_each_source_its_share_without_repeats(digits_dir: str) -> None:
    """Over 100 steps of 16: the draws per source (found through the order the loader uses) are
    within a sample of 0.75 / 0.25, agree with the logged counts, and no sample of a source repeats
    before its epoch ends."""
    from data_pipeline.spec import load_mixture

    split = load_mixture([(f"{digits_dir}/train-{{000000..000005}}.tar", 0.75),
                          (f"{digits_dir}/train-{{000006..000011}}.tar", 0.25)], "data.sources")
    assert split.sources == [(6, 0.75), (6, 0.25)] and split.num_classes == 10
    order = split.order(seed=3, window=4)
    n = 100 * 16
    drawn: list[list[tuple[int, int]]] = [[], []]
    for p in range(n):
        _, shard, index = order.lookup(p)
        drawn[0 if shard < 6 else 1].append((shard, index))
    assert [len(d) for d in drawn] == order.source_counts(n)
    assert abs(len(drawn[0]) - 0.75 * n) <= 1 and abs(len(drawn[1]) - 0.25 * n) <= 1
    sizes = [sum(s.num_samples for s in split.shards[:6]), sum(s.num_samples for s in split.shards[6:])]
    for d, size in zip(drawn, sizes):
        first_epoch = d[:size]
        assert len(set(first_epoch)) == len(first_epoch), "a sample repeats within its source's epoch"


def test_a_mixture_trains_the_same_on_one_and_two_ranks(digits_dir: str, tmp_path: Path) -> None:
    """The same losses and counts on 1 and 2 ranks; a resume continues the mixture exactly."""
    sources = (f"data.sources=[{{spec: '{digits_dir}/train-{{000000..000005}}.tar', weight: 0.75}}, "
               f"{{spec: '{digits_dir}/train-{{000006..000011}}.tar', weight: 0.25}}]")
    common = [sources, f"data.dir={digits_dir}", "train.steps=6", "eval.every_steps=0", "checkpoint.every_steps=3",
              "schedule.warmup_steps=1", "schedule.cooldown_steps=0", "log.progress=off", "eval.final=false",
              "model.dropout=0", "parallel.timeout_s=120"]
    logs = {}
    for nproc in (1, 2):
        run = tmp_path / f"dp{nproc}"
        proc = launch("train", str(TEST_CONFIG), *common, f"run.dir={run}", f"parallel.dp={nproc}", nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "data source 0:" in proc.stderr and "weight 0.75" in proc.stderr
        logs[nproc] = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                       if json.loads(x).get("kind") == "train"]
    batch = 32  # digits_test's global batch
    for one, two in zip(logs[1], logs[2]):
        assert one["loss"] == pytest.approx(two["loss"], rel=1e-5), (one, two)
        seen = one["step"] * batch
        assert one["data/source0_samples"] == two["data/source0_samples"]
        assert abs(one["data/source0_samples"] - 0.75 * seen) <= 1
        assert one["data/source0_samples"] + one["data/source1_samples"] == seen

    # resumed from step 3: in the same layout bit for bit, on two ranks (elastic) within the tolerance
    ckpt = tmp_path / "dp1" / "checkpoints" / "step_00000003"
    for nproc in (1, 2):
        run = tmp_path / f"resumed{nproc}"
        proc = launch("train", str(TEST_CONFIG), *common, f"run.dir={run}", f"parallel.dp={nproc}", f"resume={ckpt}",
                      nproc=nproc)
        assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
        resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x).get("kind") == "train"]
        assert [r["step"] for r in resumed] == [4, 5, 6]
        for r, ref in zip(resumed, logs[1][3:]):
            assert r["data/source0_samples"] == ref["data/source0_samples"]
            assert r["loss"] == ref["loss"] if nproc == 1 else r["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_sources_and_train_are_exclusive(digits_dir: str) -> None:
    from bigtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="both name the training shards"):
        load_config(TEST_CONFIG, [f"data.train={digits_dir}/train-000000.tar", "data.sources=[{spec: 'x.tar'}]"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight' must be > 0"):
        load_config(TEST_CONFIG, ["data.sources=[{spec: 'x.tar', weight: 0}]"])

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import DataError, GlobalOrder, ImageBatchDataset, ImageSpec, TrainStream, load_split, sequential_batches
from data_pipeline.writer import write_imagefolder

SPEC = ImageSpec(image_size=16, channels=1, num_classes=10, augment="crop", crop_padding=2)


def stream(split, seed=0, gbs=32, micro=16, rank=0, dp=1, workers=0, spec=SPEC, window=2):
    order = GlobalOrder([s.num_samples for s in split.shards], seed, window)
    ds = ImageBatchDataset(split, order, spec, seed, train=True)
    return TrainStream(ds, gbs, micro, rank, dp, workers)


def cat(batches):
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def png_bytes(value: int, size: int = 8, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, samples):
    """samples: list of (key, {ext: bytes}) written as a plain tar, webdataset naming."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_digits_roundtrip(digits_dir):
    train, test = load_split(digits_dir, "train"), load_split(digits_dir, "test")
    assert train.num_samples + test.num_samples == 1797
    assert train.num_classes == 10 and len(train.shards) == -(-train.num_samples // 128)
    images, labels = [], []
    for b in sequential_batches(test, ImageSpec(16, 1, 10), batch_size=100):
        assert b["num_errors"] == 0
        images.append(b["image"])
        labels.append(b["label"])
    x, y = torch.cat(images), torch.cat(labels)
    assert x.shape == (test.num_samples, 1, 16, 16)
    assert sorted(set(y.tolist())) == list(range(10))
    # every class is about 20% held out (stratified split)
    counts = np.bincount(y.numpy(), minlength=10)
    assert counts.min() >= 30 and counts.max() <= 40
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_inspect_cli(digits_dir):
    out = subprocess.run([sys.executable, "-m", "data_pipeline", "inspect", digits_dir], capture_output=True, text=True, check=True)
    assert '"samples": 1438' in out.stdout or '"samples": 1437' in out.stdout


def test_global_order_is_a_permutation_per_epoch():
    order = GlobalOrder([5, 0, 7, 3], seed=1, window=2)
    n = order.epoch_size
    for epoch in range(3):
        seen = {order.lookup(epoch * n + i)[1:] for i in range(n)}
        assert len(seen) == n == 15
    first = [order.lookup(i) for i in range(n)]
    second = [order.lookup(n + i) for i in range(n)]
    assert [s[1:] for s in first] != [s[1:] for s in second], "each epoch reshuffles"
    assert [order.lookup(i) for i in range(n)] == first, "pure function of position"


def test_batches_do_not_depend_on_workers(digits_dir):
    split = load_split(digits_dir, "train")
    a, b = stream(split, workers=0), stream(split, workers=2)
    for _ in range(3):
        xa, ya = cat(a.next_step())
        xb, yb = cat(b.next_step())
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_global_batch_is_the_same_for_any_dp_size(digits_dir):
    split = load_split(digits_dir, "train")
    single = stream(split, gbs=32, micro=32)
    ranks = [stream(split, gbs=32, micro=8, rank=r, dp=2) for r in range(2)]
    for _ in range(3):
        x1, y1 = cat(single.next_step())
        parts = [cat(r.next_step()) for r in ranks]
        assert torch.equal(x1, torch.cat([p[0] for p in parts])) and torch.equal(y1, torch.cat([p[1] for p in parts]))


def test_exact_mid_stream_resume_across_epochs(digits_dir):
    split = load_split(digits_dir, "train")
    gbs = 200  # 1438 samples: steps 7..8 cross the first epoch boundary
    full = stream(split, gbs=gbs, micro=100, workers=1)
    reference = [cat(full.next_step()) for _ in range(10)]
    part = stream(split, gbs=gbs, micro=100)
    for _ in range(6):
        part.next_step()
    state = part.state_dict()
    assert state["consumed_samples"] == 6 * gbs
    resumed = stream(split, gbs=gbs, micro=50, workers=2)  # other micro size / workers: same samples
    resumed.load_state_dict(state)
    for step in range(6, 10):
        x, y = cat(resumed.next_step())
        assert torch.equal(x, reference[step][0]) and torch.equal(y, reference[step][1])


def test_elastic_resume_changes_dp_without_repeating(digits_dir):
    split = load_split(digits_dir, "train")
    a = stream(split, gbs=32, micro=16, rank=1, dp=2)
    for _ in range(3):
        a.next_step()
    b = stream(split, gbs=32, micro=32)
    b.load_state_dict(a.state_dict())
    ref = stream(split, gbs=32, micro=32)
    for _ in range(3):
        ref.next_step()
    assert torch.equal(cat(b.next_step())[0], cat(ref.next_step())[0])


def test_augmentation_differs_between_epochs_but_is_seeded(digits_dir):
    split = load_split(digits_dir, "train")
    n = split.num_samples
    order = GlobalOrder([s.num_samples for s in split.shards], 0, 2)
    ds = ImageBatchDataset(split, order, SPEC, 0, train=True)
    # find the position of the first sample of epoch 0 again in epoch 1
    target = order.lookup(0)[1:]
    again = next(p for p in range(n, 2 * n) if order.lookup(p)[1:] == target)
    x0, x1, x0b = ds[[0]]["image"], ds[[again]]["image"], ds[[0]]["image"]
    assert torch.equal(x0, x0b)
    assert not torch.equal(x0, x1)


def test_imagefolder_and_foreign_tar(tmp_path):
    src = tmp_path / "folder"
    for c, value in (("cat", 10), ("dog", 200)):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 10), (value, value, value)).save(src / c / f"{i}.png")
        Image.new("RGB", (12, 10), (value,) * 3).save(src / c / "x.jpeg")
    out = tmp_path / "shards"
    write_imagefolder(str(src), str(out), "train", samples_per_shard=3)
    split = load_split(str(out), "train")
    assert split.num_samples == 8 and split.classes == ["cat", "dog"] and len(split.shards) == 3
    spec = ImageSpec(8, 3, 2, mean=[0.0], std=[1.0])
    batch = next(sequential_batches(split, spec, batch_size=8))
    assert batch["image"].shape == (8, 3, 8, 8)
    bright = batch["image"].mean(dim=(1, 2, 3)) > 0.5
    assert torch.equal(bright, batch["label"] == 1), "label follows the class directory"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_tar(foreign / "val-000000.tar", [(f"dir/s{i}", {"png": png_bytes(i * 20), "cls": str(i % 3).encode()}) for i in range(5)])
    write_tar(foreign / "val-000001.tar", [(f"t{i}", {"jpg": png_bytes(7), "cls": b"1"}) for i in range(2)])
    info = load_split(str(foreign), "val")
    assert info.num_samples == 7 and info.num_classes == 0
    batch = next(sequential_batches(info, ImageSpec(8, 1, 3, mean=[0.0], std=[1.0]), batch_size=10))
    assert batch["num_samples"] == 7 and batch["label"].tolist()[:5] == [0, 1, 2, 0, 1]


def test_corrupt_samples_skip_or_raise(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    good = {"png": png_bytes(100), "cls": b"1"}
    samples = [("a", good), ("b", {"png": b"not an image", "cls": b"2"}), ("c", {"png": png_bytes(5), "cls": b"42"}), ("d", good), ("e", {"cls": b"1"})]
    write_tar(root / "train-000000.tar", samples)
    split = load_split(str(root), "train")
    spec = ImageSpec(8, 1, 10)
    batch = next(sequential_batches(split, spec, batch_size=5))
    assert batch["num_samples"] == 2 and batch["num_errors"] == 3
    assert any("does not decode" in e for e in batch["errors"]) and any("out of range" in e for e in batch["errors"])
    with pytest.raises(DataError, match=r"train-000000.tar#1: image does not decode"):
        next(sequential_batches(split, ImageSpec(8, 1, 10, on_error="raise"), batch_size=5))
    # the error budget stops a run whose data is mostly bad
    order = GlobalOrder([5], 0)
    ts = TrainStream(ImageBatchDataset(split, order, spec, 0, True), 5, 5, max_error_fraction=0.5)
    with pytest.raises(DataError, match="more than data.max_error_fraction"):
        ts.next_step()


def test_truncated_empty_and_missing_shards(tmp_path, digits_dir):
    root = tmp_path / "trunc"
    root.mkdir()
    src = os.path.join(digits_dir, "train-000000.tar")
    data = open(src, "rb").read()
    (root / "train-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    info = load_split(str(root), "train")
    assert info.damaged_shards and 0 < info.num_samples < 128
    batch = next(sequential_batches(info, ImageSpec(16, 1, 10), batch_size=info.num_samples))
    assert batch["num_errors"] == 0, "every sample kept from a truncated shard is whole"

    empty = tmp_path / "empty"
    empty.mkdir()
    write_tar(empty / "train-000000.tar", [])
    with pytest.raises(DataError, match="no readable samples"):
        load_split(str(empty), "train")
    (empty / "train-000000.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match="no readable samples"):
        load_split(str(empty), "train")
    with pytest.raises(DataError, match="data directory not found"):
        load_split(str(tmp_path / "nowhere"), "train")
    with pytest.raises(DataError, match="no shards for split 'val'"):
        load_split(digits_dir, "val")


def test_index_listed_shard_truncated_later_is_counted(tmp_path, digits_dir):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(digits_dir, root)
    path = root / "train-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    split = load_split(str(root), "train")  # index.json still claims 128 samples
    order = GlobalOrder([s.num_samples for s in split.shards], 0, shuffle=False)
    ds = ImageBatchDataset(split, order, ImageSpec(16, 1, 10), 0, train=False)
    batch = ds[list(range(128, 256))]
    assert batch["num_errors"] > 0 and batch["num_samples"] + batch["num_errors"] == 128
    assert "missing" in batch["errors"][0]


def test_data_pipeline_never_imports_bigtrain():
    code = "import sys, data_pipeline, data_pipeline.cli; sys.exit(any(m.startswith('bigtrain') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    code = "import sys, bigtrain.models.vit; sys.exit(any(m.startswith(('bigtrain.distributed', 'torch.distributed.fsdp')) for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- safe data (issue 8) --------------------------------------------------------------------------
def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)


def test_killed_data_write_leaves_nothing_trusted(tmp_path):
    """A writer killed half-way used to leave a partial set the next run trusted: now the set is
    written into a temporary sibling and renamed into place only when complete."""
    from data_pipeline.writer import write_set_atomically

    root = tmp_path / "digits"
    code = (
        "import os, signal, sys\n"
        "from data_pipeline.writer import write_digits, write_set_atomically\n"
        "def write(d):\n"
        "    write_digits(d, image_size=8, samples_per_shard=128)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # all shards of both splits written, not yet renamed\n"
        f"write_set_atomically({str(root)!r}, write)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == -9
    assert not root.exists(), "nothing under the real name"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".digits.partial-")]
    assert len(leftovers) == 1 and (leftovers[0] / "index.json").is_file()
    write_set_atomically(str(root), lambda d: write_tar(os.path.join(d, "train-000000.tar"), [("a", {"cls": b"1"})]))
    assert (root / "train-000000.tar").is_file() and not leftovers[0].exists(), "the dead writer's temporary is removed"


def test_embedded_data_never_written_into_a_users_directory(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    proc = _cli("train", "configs/vit/digits_test.yaml", f"data.dir={photos}", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "data.source=digits" in last and "not empty" in last
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.jpg"], "nothing written into it"


def test_truncated_eval_shard_is_reported(tmp_path, digits_dir):
    """A truncated evaluation shard used to shrink the eval set silently (359 -> 230 samples)."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shard = data / "test-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    run = tmp_path / "run"
    proc = _cli("train", "configs/vit/digits_test.yaml", f"data.dir={data}", f"run.dir={run}", "train.steps=2",
                "schedule.warmup_steps=0", "schedule.cooldown_steps=1", "eval.fewshot=false", "checkpoint.every_steps=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "damaged shard" in proc.stderr and "test-000001.tar" in proc.stderr
    assert "evaluation lost" in proc.stderr
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    lost = evals[-1]["eval/samples_lost"]
    assert lost > 0 and evals[-1]["eval/num_samples"] + lost == 359


def test_tar_member_size_cap(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    huge = b"\x00" * (3 * 2**20)  # as if a crafted shard named a 3 MiB blob "png"
    write_tar(root / "train-000000.tar", [("a", {"png": png_bytes(10), "cls": b"1"}), ("b", {"png": huge, "cls": b"2"})])
    split = load_split(str(root), "train")
    batch = next(sequential_batches(split, ImageSpec(8, 1, 10, max_member_bytes=2**20), batch_size=2))
    assert batch["num_samples"] == 1 and batch["num_errors"] == 1
    assert "over the 1048576-byte cap" in batch["errors"][0]
    batch = next(sequential_batches(split, ImageSpec(8, 1, 10, max_member_bytes=0), batch_size=2))
    assert "does not decode" in batch["errors"][0], "without a cap it is read (and fails to decode)"


def test_a_key_repeated_later_in_a_tar_is_a_bad_sample_not_a_relabel(tmp_path):
    """webdataset refuses such tars; merging the stray 'a.cls' into sample a would relabel it."""
    root = tmp_path / "dup"
    root.mkdir()
    write_tar(root / "train-000000.tar", [("a", {"png": png_bytes(10), "cls": b"1"}), ("b", {"png": png_bytes(20), "cls": b"2"}),
                                          ("a", {"cls": b"7"}), ("c", {"png": png_bytes(30), "cls": b"3"})])
    split = load_split(str(root), "train")
    batch = next(sequential_batches(split, ImageSpec(8, 1, 10), batch_size=4))
    assert batch["num_samples"] == 2 and batch["num_errors"] == 1
    assert any("duplicate member a.cls" in e for e in batch["errors"])
    assert sorted(batch["label"][batch["weight"] > 0].tolist()) == [2, 3]  # never relabelled to 7


def test_16_bit_pngs_are_scaled_not_clipped():
    from data_pipeline.loader import decode_image

    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000 of 65535
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    grey = decode_image({"png": buf.getvalue()}, ImageSpec(8, 1, 10))[:, :, 0]
    assert np.allclose(grey, ramp / 65535.0, atol=1e-6) and (grey >= 0.999).mean() == 0  # convert("L") saturated 99%
    rgb = decode_image({"png": buf.getvalue()}, ImageSpec(4, 3, 10))
    assert rgb.shape == (4, 4, 3) and 0.3 < rgb.mean() < 0.6


@pytest.mark.parametrize("index,needle", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"format": "bigtrain-wds-index/1"}', "'splits' must map split names"),
    ('{"format": "bigtrain-wds-index/1", "splits": {}, "extra": 1}', "unknown field 'extra'"),
    ('{"format": "bigtrain-wds-index/1", "splits": {"train": {"shards": [{"name": "a.tar", "num_samples": -3}]}}}',
     "shard 0 must be {name, num_samples >= 0}"),
    ('{"format": "bigtrain-wds-index/1", "splits": {"train": {"shards": [], "num_clases": 3}}}', "unknown field 'num_clases'"),
    ('{"format": "bigtrain-wds-index/1", "splits": {"train": {"shards": [{"name": "../x.tar", "num_samples": 1}]}}}',
     "outside the data directory"),
])
def test_malformed_index_files_are_one_line_errors(tmp_path, index, needle):
    (tmp_path / "index.json").write_text(index)
    with pytest.raises(DataError, match=None) as exc:
        load_split(str(tmp_path), "train")
    assert needle in str(exc.value)
    proc = subprocess.run([sys.executable, "-m", "data_pipeline", "inspect", str(tmp_path), "--split", "train"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_shards_are_webdataset_tars_written_without_webdataset(tmp_path):
    """Our shards read the same through webdataset (when it is installed), are byte-identical when
    written twice, and writing and reading them never imports webdataset (the GPU machine has none)."""
    from data_pipeline.writer import write_member_shards

    samples = [(f"s{i:03d}", {"png": png_bytes(i), "cls": str(i % 3).encode()}) for i in range(5)]
    for name in ("a", "b"):
        write_member_shards(samples, str(tmp_path / name), "train", 3, {"num_classes": 3})
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (tmp_path / "b" / "train-000000.tar").read_bytes()
    code = ("import sys; sys.modules['webdataset'] = None\n"
            "from data_pipeline import load_split, sequential_batches, ImageSpec\n"
            "from data_pipeline.cli import main\n"
            f"assert main(['write', 'digits', '--out', {str(tmp_path / 'digits')!r}]) == 0\n"
            f"b = next(sequential_batches(load_split({str(tmp_path / 'digits')!r}, 'train'), ImageSpec(16, 1, 10), 8))\n"
            "assert b['num_samples'] == 8 and 'webdataset' not in [m for m in sys.modules if sys.modules[m]]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wds = pytest.importorskip("webdataset")  # a test dependency: the reference reader of the format
    theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
              for s in wds.WebDataset(str(tmp_path / "a" / "train-000000.tar"), shardshuffle=False)]
    assert theirs == samples[:3]

"""Write labelled images into webdataset tar shards plus our JSON index.

Each shard is written to a temporary name and renamed when complete, so an
interrupted write never leaves a truncated shard under a real shard name.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.index import DataError, ShardInfo, write_split_index

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


@dataclass
class Example:
    key: str
    image: bytes  # encoded image file contents
    image_ext: str  # webdataset extension of the image member, e.g. "png"
    label: int


class TarShardWriter:
    """One webdataset shard, written with the standard library: a sample's members are
    ``KEY.EXT`` entries in sorted extension order (as webdataset's TarWriter writes them), read-only
    mode, a fixed owner and modification time, so the same samples give byte-identical shards."""

    MTIME = 0  # reproducible shards: the bytes depend on the samples only

    def __init__(self, path: str) -> None:
        self._tar = tarfile.open(path, "w")

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), self.MTIME, 0o444, "bigtrain", "bigtrain"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


def write_member_shards(
    samples: Iterable[tuple[str, dict[str, bytes]]], root: str, split: str, samples_per_shard: int, extra: dict[str, Any]
) -> list[ShardInfo]:
    """Write ``(key, {ext: bytes})`` samples as ``{root}/{split}-NNNNNN.tar`` and record them in index.json."""
    if samples_per_shard <= 0:
        raise DataError("samples_per_shard must be > 0")
    os.makedirs(root, exist_ok=True)
    shards: list[ShardInfo] = []
    writer: TarShardWriter | None = None
    tmp_path = final_name = ""
    count = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            os.replace(tmp_path, os.path.join(root, final_name))
            shards.append(ShardInfo(final_name, count))
            writer = None

    for key, members in samples:
        if writer is None or count == samples_per_shard:
            close()
            final_name = f"{split}-{len(shards):06d}.tar"
            tmp_path = os.path.join(root, f".{final_name}.tmp")
            writer = TarShardWriter(tmp_path)
            count = 0
        writer.write(key, members)
        count += 1
    close()
    if not shards:
        raise DataError(f"no samples to write for split '{split}'")
    write_split_index(root, split, shards, extra)
    return shards


def write_shards(
    examples: Iterable[Example],
    root: str,
    split: str,
    samples_per_shard: int,
    num_classes: int,
    classes: list[str] | None = None,
) -> list[ShardInfo]:
    """Labelled images -> shards with ``key.<image ext>`` and ``key.cls`` members."""

    def members() -> Iterator[tuple[str, dict[str, bytes]]]:
        for ex in examples:
            if not 0 <= ex.label < num_classes:
                raise DataError(f"sample {ex.key}: label {ex.label} out of range [0, {num_classes})")
            yield ex.key, {ex.image_ext: ex.image, "cls": str(ex.label).encode()}

    return write_member_shards(members(), root, split, samples_per_shard, {"num_classes": num_classes, "classes": classes or []})


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def digits_examples(image_size: int, test_fraction: float, seed: int) -> dict[str, list[Example]]:
    """scikit-learn's bundled 8x8 digits (1797 real scans), upsampled, stratified split."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(digits.target):
        by_class.setdefault(int(y), []).append(i)
    test_ids: set[int] = set()
    for ids in by_class.values():
        rng.shuffle(ids)
        test_ids.update(ids[: round(len(ids) * test_fraction)])
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for i, (img, y) in enumerate(zip(digits.images, digits.target)):
        # 0..16 intensities -> 0..255, bicubic upsampling keeps strokes smooth.
        small = Image.fromarray(np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8))
        big = np.asarray(small.resize((image_size, image_size), Image.BICUBIC))
        ex = Example(f"digits_{i:05d}", _png(big), "png", int(y))
        splits["test" if i in test_ids else "train"].append(ex)
    for name in splits:  # mix classes inside shards
        rng.shuffle(splits[name])
    return splits


def write_digits(root: str, image_size: int = 32, samples_per_shard: int = 256, test_fraction: float = 0.2, seed: int = 0) -> dict[str, list[ShardInfo]]:
    classes = [str(c) for c in range(10)]
    splits = digits_examples(image_size, test_fraction, seed)
    return {name: write_shards(exs, root, name, samples_per_shard, 10, classes) for name, exs in splits.items()}


def imagefolder_examples(src: str, classes: list[str], seed: int) -> Iterator[Example]:
    """``src/<class>/<image>`` files, stored as-is (no re-encoding), in a seeded shuffled order."""
    items = []
    for label, cls in enumerate(classes):
        cdir = os.path.join(src, cls)
        for name in sorted(os.listdir(cdir)):
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            if ext in IMAGE_EXTS:
                items.append((os.path.join(cdir, name), ext, label))
    random.Random(seed).shuffle(items)
    for i, (path, ext, label) in enumerate(items):
        with open(path, "rb") as f:
            # Keys must not contain dots (webdataset splits key/extension at the first dot).
            yield Example(f"img_{i:08d}", f.read(), "jpg" if ext == "jpeg" else ext, label)


def write_imagefolder(src: str, root: str, split: str, samples_per_shard: int = 1000, seed: int = 0) -> list[ShardInfo]:
    if not os.path.isdir(src):
        raise DataError(f"image folder not found: {src}")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise DataError(f"{src} has no class sub-directories (expected {src}/<class>/<image>)")
    return write_shards(imagefolder_examples(src, classes, seed), root, split, samples_per_shard, len(classes), classes)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_set_atomically(root: str, write: Callable[[str], object]) -> None:
    """Write a whole shard set with ``write(directory)`` into a temporary sibling of ``root``,
    then rename it to ``root``: a run killed half-way leaves no partial set that the next run
    would trust. ``root`` must not exist or be an empty directory (nothing of a user's is
    overwritten). Temporaries of killed writers (their process is gone) are removed first."""
    root = os.path.abspath(root)
    parent, base = os.path.dirname(root), os.path.basename(root)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{base}.partial-"
    for name in os.listdir(parent):
        pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a data set is meant to be shared
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        os.rename(tmp, root)  # fails if another writer got there first: its complete set stays
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

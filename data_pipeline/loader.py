"""Deterministic, resumable image loaders over webdataset shards.

``TrainStream`` walks the global order (:mod:`data_pipeline.order`): for step k
it takes positions ``[k*B, (k+1)*B)``, each data-parallel rank keeps its
contiguous slice and splits it into micro-batches. A DataLoader item is a whole
micro-batch, so workers only change *who* decodes a batch, never its content.
Augmentation randomness is seeded by (seed, position), hence identical across
layouts and after resume. State = the global consumed-samples counter.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_pipeline.index import DataError, SplitInfo
from data_pipeline.logits import StoredLogits, sample_key
from data_pipeline.order import GlobalOrder
from data_pipeline.tario import DEFAULT_MAX_MEMBER_BYTES, ShardReader
from data_pipeline.writer import IMAGE_EXTS

log = logging.getLogger(__name__)


class SampleError(ValueError):
    """One sample could not be used (undecodable image, missing member, bad label)."""


@dataclass
class ImageSpec:
    """How samples become tensors."""

    image_size: int
    channels: int
    num_classes: int
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    augment: str = "none"  # none | crop | crop_flip
    crop_padding: int = 0
    on_error: str = "skip"  # skip | raise
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # larger tar members are bad samples; 0 = no cap


def decode_image(members: dict[str, bytes], spec: ImageSpec) -> np.ndarray:
    """Encoded image member -> float32 HWC array in [0, 1] at the configured size."""
    from PIL import Image

    ext = next((e for e in members if e.lower() in IMAGE_EXTS), None)
    if ext is None:
        raise SampleError(f"no image member (have {sorted(members)})")
    try:
        img = Image.open(io.BytesIO(members[ext]))
        size = (spec.image_size, spec.image_size)
        if img.mode.startswith("I"):  # 16-bit (or integer) grey: scaled to [0, 1]; convert("L") would clip at 255
            raw = np.asarray(img)
            peak = 65535.0 if img.mode.startswith("I;16") or raw.max(initial=0) <= 65535 else float(2**32 - 1)
            grey = Image.fromarray(raw.astype(np.float32) / peak, mode="F")
            grey = grey.resize(size, Image.BICUBIC) if grey.size != size else grey
            arr = np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0)
            arr = arr if spec.channels == 1 else np.repeat(arr[:, :, None], 3, axis=2)
            return arr[:, :, None] if arr.ndim == 2 else arr
        img = img.convert("L" if spec.channels == 1 else "RGB")
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    except Exception as exc:  # PIL raises many types for bad bytes
        raise SampleError(f"image does not decode ({type(exc).__name__}: {exc})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_label(members: dict[str, bytes], num_classes: int) -> int:
    raw = members.get("cls", members.get("label"))
    if raw is None:
        raise SampleError(f"no label member 'cls' (have {sorted(members)})")
    try:
        label = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise SampleError(f"label {raw[:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise SampleError(f"label {label} out of range for {num_classes} classes (check model.num_classes)")
    return label


def augment(arr: np.ndarray, spec: ImageSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.augment in ("crop", "crop_flip") and spec.crop_padding > 0:
        p = spec.crop_padding
        padded = np.pad(arr, ((p, p), (p, p), (0, 0)), mode="constant")
        dy, dx = rng.integers(0, 2 * p + 1, size=2)
        arr = padded[dy : dy + arr.shape[0], dx : dx + arr.shape[1]]
    if spec.augment == "crop_flip" and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr


class ShardBatchDataset(Dataset):
    """Map-style dataset whose items are whole batches: ``ds[[p0, p1, ...]]``.

    Subclasses turn one sample's tar members into a dict of arrays
    (``decode``); this class reads members by global position and batches,
    replacing bad samples (see ``__getitem__``).
    """

    def __init__(self, split: SplitInfo, order: GlobalOrder, seed: int, train: bool, on_error: str,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        self.split, self.order, self.seed, self.train, self.on_error = split, order, seed, train, on_error
        self.max_member_bytes = max_member_bytes
        self.reader: ShardReader | None = None  # opened lazily, per process
        self.stored: StoredLogits | None = None  # stored teacher targets, merged into each sample

    def decode(self, members: dict[str, bytes], position: int) -> dict[str, Any]:
        raise NotImplementedError

    def load(self, position: int) -> dict[str, Any]:
        if self.reader is None:
            self.reader = ShardReader(max_member_bytes=self.max_member_bytes)
        _, shard, index = self.order.lookup(position)
        try:
            _, members = self.reader.read(self.split.path(shard), index)
        except (IndexError, OSError) as exc:
            raise SampleError(str(exc)) from None
        sample = self.decode(members, position)
        if self.stored is not None:
            sample.update(self.stored.targets(position, self.seed, sample_key(shard, index)))
        return sample

    def __getitem__(self, positions: list[int]) -> dict[str, Any]:
        """A batch of exactly ``len(positions)`` samples.

        A bad sample is replaced by a copy of a good one from the same batch with
        ``weight`` 0, so batch shapes never change (every data-parallel, tensor-
        and pipeline-parallel rank keeps running the same collectives) and the
        substitute contributes nothing to losses or metrics.
        """
        samples: list[dict[str, Any] | None] = []
        errors = []
        for p in positions:
            try:
                samples.append(self.load(p))
            except SampleError as exc:
                _, shard, index = self.order.lookup(p)
                msg = f"{self.split.shards[shard].name}#{index}: {exc}"
                if self.on_error == "raise":
                    raise DataError(f"bad sample {msg} (set data.on_error=skip to count and skip)") from None
                errors.append(msg)
                samples.append(None)
        good = next((x for x in samples if x is not None), None)
        if good is None:
            raise DataError(f"every sample of a batch of {len(positions)} was bad, e.g. {errors[0]}")
        batch: dict[str, Any] = {
            key: torch.as_tensor(np.stack([(x or good)[key] for x in samples])) for key in good
        }
        batch["weight"] = torch.tensor([0.0 if x is None else 1.0 for x in samples])
        batch.update(num_samples=len(positions) - len(errors), num_errors=len(errors), errors=errors[:3])
        return batch

    def __len__(self) -> int:  # only meaningful for the sequential (eval) order
        return self.order.epoch_size


class ImageBatchDataset(ShardBatchDataset):
    """Image classification samples: ``image`` (C, H, W float, normalised) and ``label``."""

    def __init__(self, split: SplitInfo, order: GlobalOrder, spec: ImageSpec, seed: int, train: bool) -> None:
        super().__init__(split, order, seed, train, spec.on_error, spec.max_member_bytes)
        self.spec = spec
        c = spec.channels
        self.mean = np.asarray(spec.mean * (c if len(spec.mean) == 1 else 1), dtype=np.float32)
        self.std = np.asarray(spec.std * (c if len(spec.std) == 1 else 1), dtype=np.float32)

    def decode(self, members: dict[str, bytes], position: int) -> dict[str, Any]:
        arr = decode_image(members, self.spec)
        label = decode_label(members, self.spec.num_classes)
        if self.train and self.spec.augment != "none":
            arr = augment(arr, self.spec, np.random.default_rng([self.seed, position, 7]))
        arr = (arr - self.mean) / self.std
        return {"image": np.ascontiguousarray(arr.transpose(2, 0, 1)), "label": np.int64(label)}


class NoisedImageDataset(ImageBatchDataset):
    """Images for denoising objectives: also each sample's own randomness, drawn from
    (seed, position) like the augmentation, so every layout, micro-batch size and resume draws the
    same: ``noise`` (standard normal, the image's shape, or ``noise_shape`` for latents), ``u``
    (uniform [0, 1): the timestep), ``z`` (standard normal: a logit-normal noise level) and
    ``drop`` (uniform [0, 1): compared with the label-dropout rate). A set of precomputed latents
    (``latent.npy`` members instead of images) yields ``latent`` instead of ``image``."""

    def __init__(self, split: SplitInfo, order: GlobalOrder, spec: ImageSpec, seed: int, train: bool,
                 noise_shape: tuple[int, ...] | None = None) -> None:
        super().__init__(split, order, spec, seed, train)
        self.noise_shape = noise_shape or (spec.channels, spec.image_size, spec.image_size)

    def decode(self, members: dict[str, bytes], position: int) -> dict[str, Any]:
        if "latent.npy" in members:  # a set of precomputed latents (`bigtrain encode-latents`)
            try:
                latent = np.load(io.BytesIO(members["latent.npy"]), allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise SampleError(f"latent.npy does not load: {exc}") from None
            if latent.shape != self.noise_shape:
                raise SampleError(f"latent of shape {latent.shape}, the model denoises {self.noise_shape}")
            if latent.dtype.kind != "f" or not np.isfinite(latent).all():
                raise SampleError(f"latent.npy holds {latent.dtype} values that are not all finite numbers")
            sample = {"latent": latent.astype(np.float32), "label": np.int64(decode_label(members, self.spec.num_classes))}
        else:
            sample = super().decode(members, position)
        rng = np.random.default_rng([self.seed, position, 13])
        sample["noise"] = rng.standard_normal(self.noise_shape, dtype=np.float32)
        sample["u"], sample["z"], sample["drop"] = (np.float64(v) for v in (rng.random(), rng.standard_normal(),
                                                                            rng.random()))
        return sample

class TokenBatchDataset(ShardBatchDataset):
    """Packed token sequences (``.tok``: little-endian uint16, or ``.tok32``: uint32 for vocabularies
    over 65,536): ``tokens`` of length seq_len + 1."""

    def __init__(self, split: SplitInfo, order: GlobalOrder, seq_len: int, vocab_size: int, seed: int, on_error: str,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        super().__init__(split, order, seed, train=False, on_error=on_error, max_member_bytes=max_member_bytes)
        self.seq_len, self.vocab_size = seq_len, vocab_size

    def decode(self, members: dict[str, bytes], position: int) -> dict[str, Any]:
        key, width = ("tok", 2) if "tok" in members else ("tok32", 4)
        raw = members.get(key)
        if raw is None or len(raw) % width:
            raise SampleError(f"no whole 'tok' (uint16) or 'tok32' (uint32) member (have {sorted(members)})")
        tokens = np.frombuffer(raw, dtype=f"<u{width}").astype(np.int64)
        if len(tokens) < self.seq_len + 1:
            raise SampleError(f"sequence of {len(tokens)} tokens is shorter than seq_len + 1 = {self.seq_len + 1}")
        tokens = tokens[: self.seq_len + 1]
        if tokens.max(initial=0) >= self.vocab_size:
            raise SampleError(f"token id {int(tokens.max())} out of range for vocab_size {self.vocab_size}")
        return {"tokens": tokens}


def _loader(dataset: Dataset, batches: Any, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # items are already batches
        sampler=batches,
        num_workers=num_workers,
        pin_memory=pin_memory,  # page-locked batches: host-to-GPU copies can run asynchronously
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        # Our own generator: creating an iterator draws a base seed from it, and
        # drawing from torch's global RNG instead would shift dropout masks
        # depending on when the loader was (re)started, breaking exact resume.
        generator=torch.Generator().manual_seed(0),
    )


class TrainStream:
    """Infinite, resumable stream of per-rank micro-batches for each optimizer step."""

    def __init__(
        self,
        dataset: ShardBatchDataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        max_error_fraction: float = 1.0,
        error_budget_min_samples: int = 0,
        pin_memory: bool = False,
    ) -> None:
        if global_batch_size % dp_size:
            raise DataError(f"global batch size {global_batch_size} is not divisible by data-parallel size {dp_size}")
        local = global_batch_size // dp_size
        if local % micro_batch_size:
            raise DataError(f"per-rank batch {local} is not divisible by micro batch size {micro_batch_size}")
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.num_workers, self.pin_memory = dp_rank, dp_size, num_workers, pin_memory
        self.max_error_fraction = max_error_fraction
        # the fraction is judged only after this many samples: 1 bad sample in the first
        # batch of 16 is not evidence that 6% of the data set is bad
        self.error_budget_min_samples = error_budget_min_samples
        self.consumed_samples = 0  # global, over all ranks: the whole resumable state
        self.samples_read = self.errors = 0  # this rank's counters, for the error budget
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def accum_steps(self) -> int:
        return self.global_batch_size // self.dp_size // self.micro_batch_size

    def _positions(self, start: int) -> Iterator[list[int]]:
        local = self.global_batch_size // self.dp_size
        step_start = start
        while True:
            lo = step_start + self.dp_rank * local
            for m in range(self.accum_steps):
                a = lo + m * self.micro_batch_size
                yield list(range(a, a + self.micro_batch_size))
            step_start += self.global_batch_size

    def next_step(self) -> list[dict[str, Any]]:
        """This rank's micro-batches of the next optimizer step."""
        if self._it is None:
            self._it = iter(_loader(self.dataset, self._positions(self.consumed_samples), self.num_workers, self.pin_memory))
        batches = [next(self._it) for _ in range(self.accum_steps)]
        self.consumed_samples += self.global_batch_size
        for b in batches:
            self.samples_read += b["num_samples"] + b["num_errors"]
            self.errors += b["num_errors"]
            for msg in b["errors"]:
                log.warning("skipped bad sample %s", msg)
        judged = self.samples_read >= self.error_budget_min_samples
        if judged and self.errors and self.errors > self.max_error_fraction * self.samples_read:
            raise DataError(
                f"{self.errors} of {self.samples_read} samples were bad, more than "
                f"data.max_error_fraction={self.max_error_fraction}; last: {batches[-1]['errors'] or 'see log'}"
            )
        return batches

    def skip(self, n: int) -> None:
        """Advance the global position by ``n`` samples without reading them (same on every rank)."""
        self.consumed_samples += n
        self._it = None  # the prefetching DataLoader read ahead from the old position

    @property
    def epoch(self) -> float:
        return self.consumed_samples / self.dataset.order.epoch_size

    def source_samples(self) -> dict[str, int]:
        """Samples each source of a weighted mixture gave the whole run so far (all ranks; a pure
        function of the counter); {} for one source."""
        counts = getattr(self.dataset.order, "source_counts", None)
        return {f"data/source{i}_samples": n for i, n in enumerate(counts(self.consumed_samples))} if counts else {}

    def state_dict(self) -> dict[str, int]:
        # The bad-sample counters are per rank and per process (an error budget over what this
        # process read), so they are not part of the resumable state; the trainer keeps the
        # global count.
        return {"consumed_samples": self.consumed_samples, "seed": self.dataset.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.dataset.seed:
            log.warning("data seed changed on resume (%s -> %s): the sample order changes", state["seed"], self.dataset.seed)
        self.consumed_samples = int(state["consumed_samples"])
        self._it = None  # restart the DataLoader at the restored position


def sequential_batches(
    split: SplitInfo,
    spec: ImageSpec | None,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    limit: int = 0,
    num_workers: int = 0,
    make_dataset: Any = None,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """One pass over a split in stored order (no augmentation), this rank's contiguous share.

    Images by default; ``make_dataset(split, order)`` builds another dataset type.
    """
    order = GlobalOrder([s.num_samples for s in split.shards], seed=0, shuffle=False)
    total = min(order.epoch_size, limit) if limit else order.epoch_size
    lo, hi = rank * total // world, (rank + 1) * total // world
    chunks = [list(range(a, min(a + batch_size, hi))) for a in range(lo, hi, batch_size)]
    if make_dataset is not None:
        dataset = make_dataset(split, order)
    else:
        assert spec is not None
        dataset = ImageBatchDataset(split, order, spec, seed=0, train=False)
    yield from _loader(dataset, chunks, num_workers, pin_memory)

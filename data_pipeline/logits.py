"""Stored sparse teacher targets (TinyViT's idea): the teacher runs once, its top-k logits per token
(or per image) are written here, and the student reads them instead of running the teacher.

A store is a directory: ``logits.json`` (written last: a store without it is incomplete) and shards
``logits-NNNNNN.bin`` of fixed-size records, one per **global sample position** of the training
stream — the same positions the loader reads, so record ``p`` is the target of the sample the
student sees at position ``p`` on any layout. Shard ``j`` holds positions ``[j*M, (j+1)*M)``.

A record holds, for ``items`` tokens (1 for a classifier) and ``k`` logits each:

* ``seed``, ``position``, ``sample``: the data seed, the position and the data sample read there
  (``shard << 32 | index``). The loader checks them: the augmentation is drawn from (seed,
  position), so an equal pair replays the very crop the teacher saw; a different data set, seed or
  order is refused instead of silently pairing samples with another sample's targets;
* ``lse``: logsumexp of the teacher's logits / T over the whole vocabulary (fp32);
* ``val``: the top-k logits (fp16), ``idx``: their classes (uint16, or int32 above 65,536).

The dense target at temperature T is rebuilt as ``q_i = exp(val_i / T - lse)`` on the top k and the
remaining mass ``1 - sum q_i`` spread evenly over the other ``V - k`` classes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from data_pipeline.index import DataError

META = "logits.json"
FORMAT = 1


@dataclass
class LogitsMeta:
    top_k: int
    items: int  # targets per sample: tokens per sequence, or 1
    vocab: int
    temperature: float
    samples: int  # positions [0, samples) are stored
    samples_per_shard: int
    seed: int
    teacher: str = ""  # the teacher's fingerprint (hex)
    shards: list[dict[str, Any]] = field(default_factory=list)  # name, bytes, sha256
    stats: dict[str, Any] = field(default_factory=dict)  # how close the sparse targets are, timings
    format: int = FORMAT

    @property
    def index_dtype(self) -> str:
        return "<u2" if self.vocab <= 65536 else "<i4"

    @property
    def record(self) -> np.dtype:
        n, k = self.items, self.top_k
        return np.dtype([("seed", "<i8"), ("position", "<i8"), ("sample", "<i8"), ("lse", "<f4", (n,)),
                         ("val", "<f2", (n, k)), ("idx", self.index_dtype, (n, k))])

    @property
    def num_shards(self) -> int:
        return -(-self.samples // self.samples_per_shard)

    def shard_range(self, j: int) -> tuple[int, int]:
        return j * self.samples_per_shard, min(self.samples, (j + 1) * self.samples_per_shard)


def shard_name(j: int) -> str:
    return f"logits-{j:06d}.bin"


def write_shard(root: str, meta: LogitsMeta, j: int, records: np.ndarray) -> dict[str, Any]:
    """Write shard ``j`` (all its records, in position order) atomically; returns its manifest entry."""
    lo, hi = meta.shard_range(j)
    if records.dtype != meta.record or len(records) != hi - lo or not np.array_equal(records["position"],
                                                                                      np.arange(lo, hi)):
        raise ValueError(f"shard {j} needs the records of positions {lo}..{hi - 1} in order")
    data = records.tobytes()
    path = os.path.join(root, shard_name(j))
    with open(path + ".tmp", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return {"name": shard_name(j), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_meta(root: str, meta: LogitsMeta) -> None:
    with open(os.path.join(root, META + ".tmp"), "w") as f:
        json.dump(asdict(meta), f, indent=1)
    os.replace(os.path.join(root, META + ".tmp"), os.path.join(root, META))


def read_meta(root: str, key: str = "distill.logits") -> LogitsMeta:
    path = os.path.join(root, META)
    try:
        with open(path) as f:
            raw = json.load(f)
        meta = LogitsMeta(**raw)
    except FileNotFoundError:
        raise DataError(f"{key}={root}: no {META} (not a logit store, or its writer did not finish)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"{key}={root}: unreadable {META} ({exc})") from None
    if meta.format != FORMAT:
        raise DataError(f"{key}={root}: store format {meta.format}, this version reads {FORMAT}")
    return meta


class StoredLogits:
    """Reads records by position (memory-mapped shards; opened lazily per process, so it pickles into
    loader workers). Shard sizes are checked on open; checksums by :meth:`verify`."""

    def __init__(self, root: str, key: str = "distill.logits") -> None:
        self.root, self.key = root, key
        self.meta = read_meta(root, key)
        record = self.meta.record.itemsize
        if len(self.meta.shards) != self.meta.num_shards:
            raise DataError(f"{key}={root}: {len(self.meta.shards)} shards listed, {self.meta.num_shards} expected")
        for j, entry in enumerate(self.meta.shards):
            lo, hi = self.meta.shard_range(j)
            path = os.path.join(root, entry["name"])
            size = os.path.getsize(path) if os.path.isfile(path) else -1
            if size != (hi - lo) * record or size != entry["bytes"]:
                raise DataError(f"{key}={root}: {entry['name']} has {size} bytes, expected {(hi - lo) * record}")
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def verify(self) -> None:
        for entry in self.meta.shards:
            with open(os.path.join(self.root, entry["name"]), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != entry["sha256"]:
                    raise DataError(f"{self.key}={self.root}: {entry['name']} fails its checksum")

    def record(self, position: int) -> np.ndarray:
        if not 0 <= position < self.meta.samples:
            raise DataError(f"{self.key}={self.root} stores positions 0..{self.meta.samples - 1}; the run reads "
                            f"position {position} (write the store for as many steps as the run trains)")
        j = position // self.meta.samples_per_shard
        if j not in self._maps:
            self._maps[j] = np.memmap(os.path.join(self.root, self.meta.shards[j]["name"]), dtype=self.meta.record,
                                      mode="r")
        return self._maps[j][position - j * self.meta.samples_per_shard]

    def targets(self, position: int, seed: int, sample: int) -> dict[str, np.ndarray]:
        """The sample fields the student's batch gains: ``t_val``, ``t_idx``, ``t_lse``; refuses a record
        written for another seed or another sample at this position."""
        r = self.record(position)
        if int(r["position"]) != position or int(r["seed"]) != seed or int(r["sample"]) != sample:
            raise DataError(f"{self.key}={self.root}: position {position} was stored for sample {int(r['sample'])} with "
                            f"data seed {int(r['seed'])}, the run reads sample {sample} with seed {seed}: the store "
                            "belongs to another data set, train.seed or data order")
        return {"t_val": np.asarray(r["val"], dtype=np.float32), "t_idx": np.asarray(r["idx"], dtype=np.int64),
                "t_lse": np.asarray(r["lse"], dtype=np.float32)}


def sample_key(shard: int, index: int) -> int:
    return (int(shard) << 32) | int(index)

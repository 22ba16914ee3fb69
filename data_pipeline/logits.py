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


# the fields that say what a record means: a digest of them in logits.json catches an edit (a
# temperature changed by hand would pair the stored values with the wrong T without any error)
_MEANING = ("top_k", "items", "vocab", "temperature", "samples", "samples_per_shard", "seed", "teacher", "shards")
_MASS_SLACK = 1.05  # top-k probabilities from fp16 logits may sum a little above 1; far above is damage


def fields_digest(meta: LogitsMeta) -> str:
    raw = json.dumps({k: getattr(meta, k) for k in _MEANING}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def write_meta(root: str, meta: LogitsMeta) -> None:
    data = {**asdict(meta), "fields_sha256": fields_digest(meta)}
    with open(os.path.join(root, META + ".tmp"), "w") as f:
        json.dump(data, f, indent=1)
    os.replace(os.path.join(root, META + ".tmp"), os.path.join(root, META))


def _int(raw: dict[str, Any], name: str, low: int, where: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DataError(f"{where}: field '{name}' must be an integer >= {low}, got {value!r}")
    return value


def _check_meta(raw: Any, where: str) -> LogitsMeta:
    """Every field of ``logits.json`` typed and in range, the shard list complete and named as the
    writer names it (no path can point outside the store), the digest of the fields intact."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise DataError(f"{where}: store format {raw.get('format')!r}, this version reads {FORMAT}")
    known = {f for f in LogitsMeta.__dataclass_fields__} | {"fields_sha256"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}")
    ints = {name: _int(raw, name, low, where) for name, low in (("top_k", 1), ("items", 1), ("vocab", 2),
                                                                 ("samples", 1), ("samples_per_shard", 1))}
    seed = raw.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"{where}: field 'seed' must be an integer, got {seed!r}")
    if ints["top_k"] > ints["vocab"]:
        raise DataError(f"{where}: top_k {ints['top_k']} exceeds the vocabulary of {ints['vocab']}")
    t = raw.get("temperature")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not (np.isfinite(t) and t > 0):
        raise DataError(f"{where}: field 'temperature' must be a finite number > 0, got {t!r}")
    if not isinstance(raw.get("teacher", ""), str) or not isinstance(raw.get("stats", {}), dict):
        raise DataError(f"{where}: fields 'teacher' (text) and 'stats' (object) are malformed")
    meta = LogitsMeta(**{**{k: raw[k] for k in raw if k != "fields_sha256"}, **ints, "seed": seed, "temperature": float(t)})
    shards = raw.get("shards")
    if not isinstance(shards, list) or len(shards) != meta.num_shards:
        raise DataError(f"{where}: {len(shards) if isinstance(shards, list) else 'no'} shards listed, "
                        f"{meta.num_shards} expected")
    for j, entry in enumerate(shards):
        ok = (isinstance(entry, dict) and entry.get("name") == shard_name(j) and isinstance(entry.get("bytes"), int)
              and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)
        if not ok:
            raise DataError(f"{where}: shard entry {j} is malformed (expected name {shard_name(j)}, bytes, sha256)")
    digest = raw.get("fields_sha256")
    if digest is not None and digest != fields_digest(meta):
        raise DataError(f"{where}: its fields were edited after the store was written (fields_sha256 does not match); "
                        "write the store again with the settings you need")
    return meta


def read_meta(root: str, key: str = "distill.logits") -> LogitsMeta:
    path = os.path.join(root, META)
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{key}={root}: no {META} (not a logit store, or its writer did not finish)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{key}={root}: unreadable {META} ({exc})") from None
    return _check_meta(raw, f"{key}={root}: {META}")


class StoredLogits:
    """Reads records by position (memory-mapped shards; opened lazily per process, so it pickles into
    loader workers). The metadata is checked field by field and shard sizes on open; the shards'
    SHA-256 by :meth:`verify` (the trainer runs it on every rank's share before the first step); and
    every record read is checked (ids in range and distinct, finite values, a top-k mass that a real
    softmax can have), so damage that slipped past is an error, never a silent update."""

    def __init__(self, root: str, key: str = "distill.logits") -> None:
        self.root, self.key = root, key
        self.meta = read_meta(root, key)
        record = self.meta.record.itemsize
        for j, entry in enumerate(self.meta.shards):
            lo, hi = self.meta.shard_range(j)
            path = os.path.join(root, entry["name"])
            if os.path.islink(path) or not os.path.isfile(path):
                raise DataError(f"{key}={root}: {entry['name']} is missing (or a link)")
            size = os.path.getsize(path)
            if size != (hi - lo) * record or size != entry["bytes"]:
                raise DataError(f"{key}={root}: {entry['name']} has {size} bytes, expected {(hi - lo) * record}")
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def verify(self, rank: int = 0, world_size: int = 1) -> list[str]:
        """Problems (one line each) of this rank's share of the shards: SHA-256 against logits.json."""
        problems = []
        for entry in self.meta.shards[rank::world_size]:
            hasher = hashlib.sha256()
            with open(os.path.join(self.root, entry["name"]), "rb") as f:
                while chunk := f.read(8 << 20):
                    hasher.update(chunk)
            if hasher.hexdigest() != entry["sha256"]:
                problems.append(f"{self.key}={self.root}: {entry['name']} fails its SHA-256 checksum (damaged or edited)")
        return problems

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
        written for another seed or another sample at this position, or one no teacher could write."""
        r = self.record(position)
        if int(r["position"]) != position or int(r["seed"]) != seed or int(r["sample"]) != sample:
            raise DataError(f"{self.key}={self.root}: position {position} was stored for sample {int(r['sample'])} with "
                            f"data seed {int(r['seed'])}, the run reads sample {sample} with seed {seed}: the store "
                            "belongs to another data set, train.seed or data order")
        val, idx = np.asarray(r["val"], dtype=np.float32), np.asarray(r["idx"], dtype=np.int64)
        lse = np.asarray(r["lse"], dtype=np.float32)
        problem = self._bad_record(val, idx, lse)
        if problem:
            raise DataError(f"{self.key}={self.root}: the record of position {position} "
                            f"({self.meta.shards[position // self.meta.samples_per_shard]['name']}) {problem}: "
                            "the store is damaged")
        return {"t_val": val, "t_idx": idx, "t_lse": lse}

    def _bad_record(self, val: np.ndarray, idx: np.ndarray, lse: np.ndarray) -> str:
        if not (np.isfinite(val).all() and np.isfinite(lse).all()):
            return "holds a non-finite logit"
        if idx.min() < 0 or idx.max() >= self.meta.vocab:
            return f"holds a class id outside [0, {self.meta.vocab})"
        if self.meta.top_k > 1 and (np.diff(np.sort(idx, axis=-1), axis=-1) == 0).any():
            return "repeats a class id among its top-k"
        mass = np.exp(val.astype(np.float64) / self.meta.temperature - lse[..., None].astype(np.float64)).sum(-1)
        if (mass > _MASS_SLACK).any():
            return f"has top-k probabilities summing to {float(mass.max()):.3g} (> 1)"
        return ""


def sample_key(shard: int, index: int) -> int:
    return (int(shard) << 32) | int(index)

"""Shard sets: our JSON index, or discovery of foreign webdataset tars.

Layout written by :mod:`data_pipeline.writer`::

    DIR/index.json               {"format": ..., "splits": {split: {"shards": [...], ...}}}
    DIR/{split}-000000.tar ...   webdataset shards

Shards written by other tools are found by the same naming (``{split}-*.tar`` or
``{split}/*.tar``) and counted by scanning their headers.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipeline.tario import scan_shard

INDEX_NAME = "index.json"
INDEX_FORMAT = "bigtrain-wds-index/1"


class DataError(ValueError):
    """A data problem the user must fix (missing path, empty or unreadable shards)."""


@dataclass
class ShardInfo:
    name: str  # path relative to the data directory
    num_samples: int


@dataclass
class SplitInfo:
    """Everything a loader needs to define a global sample order over one split."""

    root: str
    shards: list[ShardInfo]
    num_classes: int = 0  # 0 = unknown (foreign shards)
    classes: list[str] = field(default_factory=list)
    damaged_shards: list[str] = field(default_factory=list)  # found while counting foreign shards, or by check_shards
    indexed: bool = False  # counts come from our index.json (not from scanning the tars)
    meta: dict[str, Any] = field(default_factory=dict)  # the index entry's writer metadata (seq_len, tokenizer, latents...)
    # a weighted mixture: (shards, weight) per source, over consecutive runs of ``shards``; [] = one source
    sources: list[tuple[int, float]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def path(self, shard: int) -> str:
        return os.path.join(self.root, self.shards[shard].name)

    def order(self, seed: int, window: int = 4, shuffle: bool = True) -> Any:
        """The split's global sample order: one :class:`~data_pipeline.order.GlobalOrder`, or a
        :class:`~data_pipeline.order.MixtureOrder` of its sources by weight."""
        from data_pipeline.order import GlobalOrder, MixtureOrder

        sizes = [s.num_samples for s in self.shards]
        if not self.sources:
            return GlobalOrder(sizes, seed, window, shuffle)
        groups, start = [], 0
        for count, _ in self.sources:
            groups.append(sizes[start:start + count])
            start += count
        return MixtureOrder(groups, [w for _, w in self.sources], seed, window, shuffle)


def entry_meta(entry: dict[str, Any]) -> dict[str, Any]:
    """A split entry's writer metadata: every field but its shard list and total."""
    return {k: v for k, v in entry.items() if k not in ("shards", "num_samples")}


def read_index(root: str) -> dict[str, Any] | None:
    path = os.path.join(root, INDEX_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is unreadable: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    check_index(data, path)
    return data


# the fields each split entry of our index may carry (the writers' metadata); anything else is a typo
# or another tool's file, and would otherwise be ignored silently
SPLIT_FIELDS = {"shards": list, "num_samples": int, "num_classes": int, "classes": list, "vocab_size": int,
                "seq_len": int, "tokenizer": str, "token_bits": int, "latents": dict}


def check_index(data: Any, path: str) -> None:
    """Our index, field by field: a JSON object with the format and a mapping of splits, each with
    its shards (names inside the data directory, non-negative counts) and known metadata."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: unknown index format {data.get('format')!r} (expected {INDEX_FORMAT!r})")
    unknown = sorted(set(data) - {"format", "splits"})
    if unknown:
        raise DataError(f"{path}: unknown field {unknown[0]!r}")
    splits = data.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{path}: 'splits' must map split names to their shards")
    for split, entry in splits.items():
        where = f"{path}: split {split!r}"
        if not isinstance(entry, dict) or "shards" not in entry:
            raise DataError(f"{where} must be an object with 'shards'")
        for key, value in entry.items():
            kind = SPLIT_FIELDS.get(key)
            if kind is None:
                raise DataError(f"{where}: unknown field {key!r}")
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                raise DataError(f"{where}: field {key!r} must be a {'non-negative integer' if kind is int else kind.__name__}")
        for i, shard in enumerate(entry["shards"]):
            ok = isinstance(shard, dict) and set(shard) == {"name", "num_samples"} and isinstance(shard["name"], str) \
                and isinstance(shard["num_samples"], int) and not isinstance(shard["num_samples"], bool) \
                and shard["num_samples"] >= 0
            if not ok:
                raise DataError(f"{where}: shard {i} must be {{name, num_samples >= 0}}, got {shard!r}"[:300])
            if os.path.isabs(shard["name"]) or os.path.normpath(shard["name"]).startswith(".."):
                raise DataError(f"{where}: shard {shard['name']!r} is outside the data directory")
        total = sum(s["num_samples"] for s in entry["shards"])
        if entry.get("num_samples", total) != total:
            raise DataError(f"{where}: num_samples {entry['num_samples']} differs from its shards' sum {total}")


def split_entry(root: str, split: str) -> dict[str, Any]:
    """The index entry of ``split`` in ``root`` (its shards and the writer's metadata), {} when the
    directory has no index or the index no such split."""
    index = read_index(root) if os.path.isdir(root) else None
    return (index or {"splits": {}})["splits"].get(split, {})


def write_split_index(root: str, split: str, shards: list[ShardInfo], extra: dict[str, Any]) -> None:
    """Add/replace one split in ``index.json`` atomically (write temp file, then rename)."""
    data = read_index(root) or {"format": INDEX_FORMAT, "splits": {}}
    data["splits"][split] = {
        "shards": [asdict(s) for s in shards],
        "num_samples": sum(s.num_samples for s in shards),
        **extra,
    }
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".index-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the index is meant to be shared
    os.replace(tmp, os.path.join(root, INDEX_NAME))


def find_foreign_shards(root: str, split: str) -> list[str]:
    patterns = [f"{split}-*.tar", f"{split}_*.tar", os.path.join(split, "*.tar")]
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(root, pattern)))
        if found:
            return [os.path.relpath(p, root) for p in found]
    return []


def check_shards(info: SplitInfo) -> list[str]:
    """Scan every shard of an indexed split (headers only) and describe each one that holds
    fewer readable samples than the index says, e.g. a shard truncated after it was indexed.
    The descriptions also go into ``info.damaged_shards``."""
    found = []
    for shard in info.shards:
        scan = scan_shard(os.path.join(info.root, shard.name))
        if len(scan.samples) < shard.num_samples:
            found.append(f"{shard.name}: {len(scan.samples)} of {shard.num_samples} samples readable"
                         + (f" ({scan.error})" if scan.error else ""))
    info.damaged_shards.extend(found)
    return found


def load_split(root: str, split: str) -> SplitInfo:
    """Describe one split, from our index if present, else by scanning foreign tars."""
    if not os.path.isdir(root):
        raise DataError(f"data directory not found: {root}")
    index = read_index(root)
    if index is not None and split in index["splits"]:
        entry = index["splits"][split]
        shards = [ShardInfo(**s) for s in entry["shards"]]
        missing = [s.name for s in shards if not os.path.isfile(os.path.join(root, s.name))]
        if missing:
            raise DataError(f"{root}/{INDEX_NAME} lists shards that do not exist: {missing[:3]}")
        info = SplitInfo(root, shards, entry.get("num_classes", 0), entry.get("classes", []), indexed=True,
                         meta=entry_meta(entry))
    else:
        names = find_foreign_shards(root, split)
        if not names:
            known = sorted(index["splits"]) if index else []
            raise DataError(
                f"no shards for split '{split}' in {root} (looked for index.json, {split}-*.tar, {split}/*.tar)"
                + (f"; index.json has splits {known}" if known else "")
            )
        shards, damaged = [], []
        for name in names:
            scan = scan_shard(os.path.join(root, name))
            if scan.error:
                damaged.append(f"{name}: {scan.error}")
            shards.append(ShardInfo(name, len(scan.samples)))
        info = SplitInfo(root, [s for s in shards if s.num_samples > 0], damaged_shards=damaged)
    if info.num_samples == 0:
        raise DataError(f"split '{split}' in {root} has no readable samples (empty or corrupt shards)")
    return info

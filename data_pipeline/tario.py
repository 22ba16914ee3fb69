"""Random access into webdataset tar shards by member offset.

A webdataset sample is the group of consecutive tar members sharing a key
(``path/key.ext``). We scan a shard's headers once (no payload is read) and keep
``key -> {ext: (offset, size)}``; a sample is then a handful of ``pread``s.
Any tar that follows webdataset naming works, whoever wrote it; webdataset itself is not needed.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field

_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str, str] | tuple[None, None]:
    """webdataset's naming rule, without webdataset: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``);
    the key ends at the first dot of the last path component. A name without one is no member."""
    match = _MEMBER.match(path)
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclass
class SampleEntry:
    """Where one sample's members live inside a shard."""

    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # ext -> (data offset, size)
    problem: str = ""  # non-empty: the sample is unusable (read as a bad sample, counted, never merged)


@dataclass
class ShardScan:
    """Result of scanning one shard: its samples and whether it was damaged."""

    path: str
    samples: list[SampleEntry]
    error: str = ""  # non-empty when the shard was truncated or unreadable past some point


def scan_shard(path: str) -> ShardScan:
    """Index the samples of one tar shard, tolerating truncation.

    A truncated shard keeps every sample whose members lie wholly inside the
    file; the damage is reported in ``error`` so the caller can count it.
    """
    samples: list[SampleEntry] = []
    error = ""
    file_size = os.path.getsize(path)
    by_key: dict[str, SampleEntry] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                base, ext = base_plus_ext(info.name)
                if base is None or ext is None:
                    continue
                if info.offset_data + info.size > file_size:
                    error = f"member {info.name} is truncated"
                    break
                entry = by_key.get(base)
                if entry is None:
                    entry = by_key[base] = SampleEntry(key=base)
                    samples.append(entry)
                elif entry is not samples[-1] or ext in entry.members:
                    # webdataset groups *consecutive* members and refuses a repeated name; merging a
                    # stray later 'KEY.cls' into the earlier sample would silently relabel it
                    entry.problem = f"duplicate member {info.name} in {os.path.basename(path)}"
                    continue
                entry.members[ext] = (info.offset_data, info.size)
            else:
                # tarfile stops silently at a cut header; a whole tar ends with two zero blocks.
                tf.fileobj.seek(tf.offset)
                if tf.fileobj.read(1024) != bytes(1024):
                    error = "no end-of-archive marker (shard truncated)"
    except (tarfile.TarError, EOFError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    # A sample cut in half by truncation is incomplete: drop the last one if damaged.
    if error and samples:
        samples.pop()
    return ShardScan(path=path, samples=samples, error=error)


class MemberTooLarge(OSError):
    """A tar member is larger than the reader's cap (a crafted or mixed-up shard)."""


DEFAULT_MAX_MEMBER_BYTES = 16 * 2**20


class ShardReader:
    """Reads sample members by offset; keeps a small cache of open files and scans.

    One instance per process (DataLoader workers each build their own after fork),
    so no file handle is shared across processes. A member larger than
    ``max_member_bytes`` (0 = no cap) is refused before any of it is read.
    """

    def __init__(self, max_open: int = 16, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        self._scans: dict[str, ShardScan] = {}
        self._files: dict[str, int] = {}
        self._max_open = max_open
        self.max_member_bytes = max_member_bytes

    def scan(self, path: str) -> ShardScan:
        scan = self._scans.get(path)
        if scan is None:
            scan = self._scans[path] = scan_shard(path)
        return scan

    def _fd(self, path: str) -> int:
        fd = self._files.get(path)
        if fd is None:
            if len(self._files) >= self._max_open:
                old_path, old_fd = next(iter(self._files.items()))
                os.close(old_fd)
                del self._files[old_path]
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, path: str, index: int) -> tuple[str, dict[str, bytes]]:
        """Return (key, {ext: bytes}) of the ``index``-th sample of a shard."""
        scan = self.scan(path)
        if index >= len(scan.samples):
            raise IndexError(
                f"sample {index} of {os.path.basename(path)} is missing "
                f"(shard has {len(scan.samples)} readable samples{'; ' + scan.error if scan.error else ''})"
            )
        entry = scan.samples[index]
        if entry.problem:
            raise OSError(entry.problem)
        fd = self._fd(path)
        out = {}
        for ext, (offset, size) in entry.members.items():
            if self.max_member_bytes and size > self.max_member_bytes:
                raise MemberTooLarge(f"member {entry.key}.{ext} is {size} bytes, over the {self.max_member_bytes}-byte "
                                     "cap (data.max_member_bytes)")
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise OSError(f"short read of {entry.key}.{ext} in {path}")
            out[ext] = data
        return entry.key, out

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass

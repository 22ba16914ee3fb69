"""What makes a checkpoint trustworthy: metadata read without running code, and checksums.

* **No code runs on load.** DCP stores its ``.metadata`` as a pickle and reads it with a
  plain ``pickle.load``, which executes whatever a crafted file asks for. We read it with
  a restricted unpickler that resolves only DCP's own metadata classes, ``torch.Size``,
  dtypes/layouts, an enum DCP uses for memory formats and ``pathlib`` paths; any other
  global is refused before anything is called. Tensor payloads are read by DCP with
  ``torch.load(weights_only=True)`` and non-tensor values by our planner the same way.
* **Integrity.** While DCP writes a ``.distcp`` file, the bytes pass through a stream that
  updates an XXH3-64 checksum (in the writer thread, while the bytes are in memory: no second
  read; ~20 GB/s on one core here, against ~4 GB/s for zlib's CRC32).
  Each rank leaves the sizes and checksums of its files in a small side file; at commit,
  rank 0 merges them (plus ``.metadata`` and ``config.yaml``) into the completion marker.
  Before a load, every listed file is checked for size and checksum (the files are
  divided over the ranks, so each reads only its share).
"""

from __future__ import annotations

import glob
import importlib
import io
import json
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

MARKER = "bigtrain_complete.json"
CONFIG_FILE = "config.yaml"  # the resolved config of the run that saved the checkpoint
METADATA_FILE = ".metadata"
SUMS_GLOB = ".sums_rank*.json"  # per-rank sizes + checksums, merged into the marker at commit
# 1: marker without a file manifest (checkpoints written before checksums existed); 2: with it
FORMAT_VERSION = 2
CHECKSUM = "xxh3_64"  # the manifest's checksum of each file (an unsigned 64-bit integer)
_CHUNK = 8 * 2**20


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on (one line, exit 2 from the CLI)."""


class CorruptCheckpoint(CheckpointError):
    """The checkpoint is damaged or untrusted: resume=auto and rollback fall back past it."""


class IncompatibleCheckpoint(CheckpointError):
    """The checkpoint is intact but does not fit this run (shape, keys, settings)."""


# --- metadata without code execution -------------------------------------------------------------
_DTYPES = frozenset(n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype))
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # maps a layout's name to torch.strided etc.
    "torch": frozenset({"Size"}) | _DTYPES,
    "pathlib": frozenset({"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedIOBase, path: str) -> None:
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return getattr(importlib.import_module(module), name)
        raise CorruptCheckpoint(f"{self.path}: refusing to load it, it asks for {module}.{name} "
                                "(only DCP metadata types are trusted)")


def read_metadata_file(path: str) -> Metadata:
    """DCP metadata from ``path`` through the restricted unpickler (refuses anything else)."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()  # type: ignore[arg-type]
    except CorruptCheckpoint:
        raise
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} is missing") from None
    except Exception as exc:  # truncated or garbled pickle: many exception types
        raise CorruptCheckpoint(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpoint(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the metadata read through :func:`read_metadata_file`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata_file(os.path.join(str(self.path), METADATA_FILE))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# --- checksums while writing ---------------------------------------------------------------------
class _HashingStream:
    """Passes writes through to ``raw`` and keeps a running checksum and size of what went by.

    DCP and ``torch.save`` write each file front to back; a seek would invalidate the
    running checksum, so it is refused rather than silently producing a wrong one.
    """

    def __init__(self, raw: Any, on_write: Callable[[], None]) -> None:
        self.raw, self.on_write = raw, on_write
        self.hasher, self.size = xxhash.xxh3_64(), 0

    def write(self, data: Any) -> int:
        self.on_write()
        view = memoryview(data)
        n = self.raw.write(view)
        self.hasher.update(view)
        self.size += view.nbytes
        return n

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("checksummed checkpoint streams are write-once, front to back")

    def seekable(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ...
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    """Checksums every file written, and takes over write errors: DCP runs its extra writer
    threads without collecting their exceptions (torch 2.13), so a failed write there (a full
    disk) would vanish with a stray thread traceback and DCP would commit metadata without that
    file's items. The error is recorded and swallowed here (the thread moves on) and
    :meth:`ChecksummedWriter.write_data` raises it in DCP's own thread, failing the save."""

    def __init__(self, sums: dict[str, tuple[int, int]], on_write: Callable[[], None]) -> None:
        super().__init__()
        self.sums, self.on_write = sums, on_write
        self.errors: list[BaseException] = []

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        try:
            with super().create_stream(path, mode) as raw:
                stream = _HashingStream(raw, self.on_write)
                yield stream
        except Exception as exc:
            self.errors.append(exc)
            return
        self.sums[Path(path).name] = (stream.size, stream.hasher.intdigest())


class ChecksummedWriter(FileSystemWriter):
    """DCP's file writer that records each written file's size and checksum in a side file.

    ``on_write`` is called before every write (fault injection uses it to fail or kill a
    rank in the middle of a checkpoint file).
    """

    def __init__(self, path: str, rank: int, thread_count: int, on_write: Callable[[], None] = lambda: None) -> None:
        super().__init__(path, thread_count=thread_count)
        self.rank = rank
        self.sums: dict[str, tuple[int, int]] = {}
        self.fs = _HashingFileSystem(self.sums, on_write)

    def write_data(self, plan: Any, planner: Any) -> Any:
        future = super().write_data(plan, planner)
        future.wait()  # the file system writer is synchronous; re-raises a failed write here
        if self.fs.errors:  # raised in a writer thread DCP does not watch: fail this rank's write
            raise self.fs.errors[0]
        files = {name: {"size": size, CHECKSUM: digest} for name, (size, digest) in self.sums.items()
                 if name.endswith(".distcp")}
        _write_json(os.path.join(str(self.path), f".sums_rank{self.rank}.json"), files)
        return future


# --- the marker and its manifest -----------------------------------------------------------------
def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def file_digest(path: str) -> tuple[int, int]:
    """(size, checksum) of a file, read in large chunks."""
    hasher, size = xxhash.xxh3_64(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.intdigest()


def collect_manifest(path: str, world_size: int) -> dict[str, dict[str, int]]:
    """Merge the ranks' side files into one ``{file: {size, checksum}}`` (rank 0, at commit)."""
    sums = sorted(glob.glob(os.path.join(path, SUMS_GLOB)))
    if len(sums) != world_size:
        raise CheckpointError(f"{path}: checksums from {len(sums)} of {world_size} ranks; not committing it")
    files: dict[str, dict[str, int]] = {}
    for side in sums:
        with open(side) as f:
            files.update(json.load(f))
    written = {os.path.basename(p) for p in glob.glob(os.path.join(path, "*.distcp"))}
    if written != set(files):
        raise CheckpointError(f"{path}: files {sorted(written ^ set(files))[:3]} lack checksums; not committing it")
    for name in (METADATA_FILE, CONFIG_FILE):  # small, written outside DCP's writer threads
        if os.path.isfile(os.path.join(path, name)):
            size, digest = file_digest(os.path.join(path, name))
            files[name] = {"size": size, CHECKSUM: digest}
    for side in sums:
        os.remove(side)
    return files


def read_marker(path: str) -> dict[str, Any]:
    """The completion marker of checkpoint ``path``; CorruptCheckpoint if it is not a valid one."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} is not a complete checkpoint (no {MARKER})") from None
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(f"{marker} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CorruptCheckpoint(f"{marker} is not a bigtrain completion marker")
    version = meta.get("format", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CorruptCheckpoint(f"{marker}: checkpoint format {version!r} is newer than this bigtrain ({FORMAT_VERSION})")
    files = meta.get("files")
    if version >= 2 and meta.get("checksum") != CHECKSUM:
        raise CorruptCheckpoint(f"{marker}: unknown checksum {meta.get('checksum')!r} (this bigtrain uses {CHECKSUM})")
    if version >= 2 and not (isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get(CHECKSUM), int)
            for v in files.values())):
        raise CorruptCheckpoint(f"{marker}: its file manifest is missing or malformed")
    return meta


def check_files(path: str, files: dict[str, dict[str, int]], names: list[str], checksums: bool = True) -> list[str]:
    """Problems found in ``names`` (a share of the manifest ``files``): missing, size, checksum."""
    problems = []
    for name in names:
        expected, full = files[name], os.path.join(path, name)
        try:
            size = os.path.getsize(full)
            if size != expected["size"]:
                problems.append(f"{name}: {size} bytes, expected {expected['size']}")
            elif checksums and file_digest(full)[1] != expected[CHECKSUM]:
                problems.append(f"{name}: checksum mismatch")
        except FileNotFoundError:
            problems.append(f"{name}: missing")
        except OSError as exc:
            problems.append(f"{name}: unreadable ({exc.strerror})")
    return problems


def manifest_names(path: str, meta: dict[str, Any]) -> list[str]:
    """Files to verify, in a fixed order (every rank splits the same list)."""
    files = meta.get("files") or {}
    extra = {os.path.basename(p) for p in glob.glob(os.path.join(path, "*.distcp"))} - set(files)
    if extra:  # a .distcp nobody committed could only come from tampering or a mixed-up copy
        raise CorruptCheckpoint(f"{path}: {sorted(extra)[:3]} not in the checkpoint's manifest")
    return sorted(files)

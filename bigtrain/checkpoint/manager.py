"""The checkpoint manager: atomic saves, verified loads with fallback, retention, one timeline.

Layout::

    run_dir/checkpoints/step_00000100/      complete checkpoint (DCP files + marker)
        .metadata, __0_0.distcp, ...
        config.yaml                        the resolved config of the run that saved it
        bigtrain_complete.json             written last: step, run id, parent, file sizes + checksums
    run_dir/checkpoints/.tmp_step_00000200/  a save in progress (never loaded)
    run_dir/checkpoints-aside/             checkpoints moved out of the way (corrupt, abandoned
                                           branch, replaced); never loaded by resume=auto
    run_dir/timeline.json                  the current branch: run id and the checkpoint it started from

A save writes into the temporary directory; after every rank finished writing, rank 0
merges the checksums into the marker, renames the directory, checks the files' sizes and
only then prunes older checkpoints, so a crash at any point leaves the previous complete
checkpoint (and perhaps the new one), never a half-written one that resume picks.

Resuming: ``resume=auto`` walks the checkpoints of the current branch newest first, then
the branch point; each is verified (sizes and checksums, the files split over the ranks)
and loaded, and one that fails is logged, moved aside and skipped. Rank 0 picks the
candidates and every rank follows its choice. ``resume=PATH`` that is not the newest
checkpoint of the current branch starts a new branch: newer checkpoints of the abandoned
branch are moved aside, so a later ``resume=auto`` follows the new branch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from bigtrain import faults
from bigtrain.checkpoint.integrity import (
    CHECKSUM,
    CONFIG_FILE,
    FORMAT_VERSION,
    MARKER,
    METADATA_FILE,
    ChecksummedWriter,
    CheckpointError,
    CorruptCheckpoint,
    IncompatibleCheckpoint,
    SafeFileSystemReader,
    _write_json,
    check_files,
    collect_manifest,
    manifest_names,
    read_marker,
    read_metadata_file,
)
from bigtrain.checkpoint.state import STRICT_KEYS, RNGState, SafeLoadPlanner, StrictLoadPlanner
from bigtrain.config.compat import resume_mismatches

if TYPE_CHECKING:
    from bigtrain.config.schema import Config

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{8})$")
TIMELINE = "timeline.json"
ASIDE_DIR = "checkpoints-aside"


class CheckpointSaveError(CheckpointError):
    """A save could not be written (disk full, permissions); the previous checkpoint is intact."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; single-process DCP is deliberate here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def list_complete(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of every directory with a completion marker, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = STEP_DIR.match(name)
        path = os.path.join(ckpt_root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _failure_of(exc: BaseException) -> BaseException:
    """The first underlying exception of DCP's CheckpointException (a BaseException wrapper)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return next(iter(exc.failures.values()))[0]
    return exc


def _reason(exc: BaseException) -> str:
    inner = _failure_of(exc)
    if isinstance(inner, OSError) and inner.strerror:
        return f"{inner.strerror}" + (f": {inner.filename}" if inner.filename else "")
    return f"{type(inner).__name__}: {inner}" if not isinstance(inner, CheckpointError) else str(inner)


def check_loadable(path: str) -> dict[str, Any]:
    """Cheap checks of an explicitly named checkpoint, before any work and before anything in it is
    parsed (one process, no collectives): it exists, its marker is valid, its files have the recorded
    sizes, the small files that are parsed (``.metadata``, ``config.yaml``) their checksums, and the
    metadata is trusted. The tensor files' checksums are verified by the load itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r}: no such checkpoint directory")
    meta = read_marker(path)
    problems: list[str] = []
    if meta.get("format", 1) >= 2:
        names = manifest_names(path, meta)
        problems = check_files(path, meta["files"], names, checksums=False)
        parsed = [n for n in (METADATA_FILE, CONFIG_FILE) if n in meta["files"]]
        problems = problems or check_files(path, meta["files"], parsed)
        if not problems and os.path.isfile(os.path.join(path, CONFIG_FILE)) and CONFIG_FILE not in meta["files"]:
            problems = [f"{CONFIG_FILE}: not in the checkpoint's manifest"]  # planted after the commit
    _verdict(path, meta, problems)
    read_metadata_file(os.path.join(path, METADATA_FILE))
    return meta


def open_saved_config(path: str, key: str) -> Config:
    """The config checkpoint ``path`` was trained with, for a command that rebuilds its model
    (``key`` names the option in messages). The checkpoint is verified first (:func:`check_loadable`:
    nothing in it is parsed before its marker, sizes and the config's checksum agree); the config is
    then read as data: a family it names by module is not imported unless the user trusted it."""
    from bigtrain.config import load_saved_config

    try:
        check_loadable(path)
    except CheckpointError as exc:
        reason = str(exc).removeprefix(f"{path!r}: ").removeprefix(f"{path}: ")
        raise type(exc)(f"{key}={path}: {reason}") from None
    config = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config):
        raise CheckpointError(f"{key}={path} is not a bigtrain checkpoint with its config (no {CONFIG_FILE})")
    return load_saved_config(config)


def check_resume_config(path: str, config_text: str, allow_changes: list[str]) -> None:
    """Compare the checkpoint's saved config with ``config_text`` (this run's resolved YAML): keys
    that change what the saved state means (see :mod:`bigtrain.config.compat`) must match unless
    ``allow_changes`` names them; IncompatibleCheckpoint lists the differences."""
    saved_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(saved_path):
        log.warning("checkpoint %s has no %s: cannot check that it fits this run's config", path, CONFIG_FILE)
        return
    try:
        with open(saved_path) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise CorruptCheckpoint(f"{saved_path} is unreadable ({exc})") from None
    diffs = resume_mismatches(saved if isinstance(saved, dict) else {}, yaml.safe_load(config_text), allow_changes,
                              saved_path)
    if diffs:
        keys = ", ".join(d.split(":")[0] for d in diffs)
        raise IncompatibleCheckpoint(f"{path} was saved with other settings: {'; '.join(diffs)} "
                                     f"(to accept, set resume_allow_changes=[{keys}])")


def verify_share(path: str, rank: int = 0, world_size: int = 1) -> tuple[dict[str, Any], list[str]]:
    """(marker, problems) of this rank's share of a checkpoint's files (all of them in one process)."""
    try:
        meta = read_marker(path)
        if meta.get("format", 1) < 2:
            return meta, []
        return meta, check_files(path, meta["files"], manifest_names(path, meta)[rank::world_size])
    except CorruptCheckpoint as exc:
        return {}, [str(exc)]


def _verdict(path: str, meta: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptCheckpoint(f"{path}: {problems[0].removeprefix(path + ': ')}{more}")
    if meta.get("format", 1) < 2:
        log.warning("checkpoint %s was written before checksums existed: loading it unverified", path)
    return meta


def verify_checkpoint(path: str) -> dict[str, Any]:
    """One process: every file's size and checksum (export, tools). Raises CorruptCheckpoint."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r}: no such checkpoint directory")
    return _verdict(path, *verify_share(path))


@dataclass
class _PendingSave:
    """An asynchronous save whose files are still being written by a background thread."""

    step: int
    tmp: str
    final: str
    meta: dict[str, Any]
    future: Future[Any]
    t0: float


class Checkpointer:
    """Saves/loads stateful keys under ``run_dir/checkpoints``.

    ``group`` is the process group DCP coordinates on. Asynchronous saves run DCP's
    planning collectives in a background thread, so they need a group of their own
    (a second gloo group), never the one training collectives use at the same time.
    The manager's own small collectives (rank 0's choice, verification results) use it
    too, only while no asynchronous save is in flight.
    """

    def __init__(
        self,
        run_dir: str,
        keep_last: int = 3,
        keep_every: int = 0,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
        group: dist.ProcessGroup | None = None,
        config_text: str = "",
        write_threads: int = 2,
        keep_aside: int = 4,
        allow_changes: list[str] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, "checkpoints")
        self.aside_root = os.path.join(run_dir, ASIDE_DIR)
        self.keep_last, self.keep_every, self.keep_aside = keep_last, keep_every, keep_aside
        self.rank, self.world_size, self.barrier = rank, world_size, barrier
        self.group, self.config_text, self.write_threads = group, config_text, write_threads
        self.allow_changes = list(allow_changes or [])
        self.pending: _PendingSave | None = None
        self.last_blocked_s = 0.0  # how long the last save() call blocked the caller
        self.run_id = ""  # the current branch; set by start_branch / continue_branch
        self.head: str | None = None  # the checkpoint the current state descends from (next save's parent)
        self.events: list[dict[str, Any]] = []  # records for metrics.jsonl (checkpoint_corrupt, ...)
        self._deletions: list[threading.Thread] = []  # pruned checkpoints being removed
        self._stager: Any = None  # the async saves' stager: host buffers kept from save to save
        self._stager_reusable: bool | None = None  # False where torch closes it after each stage

    # --- collectives (identity in one process) ------------------------------------------------------
    def _broadcast(self, obj: Any) -> Any:
        if not _distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _gather(self, obj: Any) -> list[Any]:
        if not _distributed():
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agreed(self, decide: Callable[[], Any]) -> Any:
        """Rank 0's answer of ``decide()``, on every rank (one view of a shared file system)."""
        return self._broadcast(decide() if self.rank == 0 else None)

    # --- save ----------------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Stateful], extra: dict[str, Any] | None = None,
             asynchronous: bool = False) -> str:
        """Write a checkpoint of ``state`` for ``step``; returns its final path.

        Synchronous: returns after the checkpoint is committed. Asynchronous: returns once
        the state is copied to memory; ``commit_pending`` (when every rank's write is done)
        or ``wait`` commits it. Until then it is a temporary directory no resume picks up.
        Raises CheckpointSaveError (temporary directory removed) when the write fails.
        """
        self.wait()  # one save in flight at a time; commits the previous one first
        if not self.run_id:
            self.start_branch(None)  # a caller that never restored: a fresh branch
        t0 = time.perf_counter()
        final = os.path.join(self.root, step_dir_name(step))
        tmp = os.path.join(self.root, ".tmp_" + step_dir_name(step))
        error = None
        if self.rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                if os.path.exists(tmp):  # left over by a crashed save of the same step
                    shutil.rmtree(tmp)
                os.makedirs(tmp)
                if self.config_text:  # the resolved config travels with the weights (export needs it)
                    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                        f.write(self.config_text)
            except OSError as exc:
                error = f"checkpoint of step {step} could not be written: {_reason(exc)}"
                shutil.rmtree(tmp, ignore_errors=True)
        if (error := self._broadcast(error)) is not None:
            raise CheckpointSaveError(error)
        meta = {"format": FORMAT_VERSION, "checksum": CHECKSUM, "step": step, "world_size": self.world_size, "time": time.time(),
                "keys": sorted(state), "run_id": self.run_id, "parent": self.head, **(extra or {})}
        writer = ChecksummedWriter(tmp, self.rank, self.write_threads, on_write=lambda: faults.in_checkpoint_write(step, self.rank))
        try:
            with _single_process_ok():
                if asynchronous:
                    future = dcp.async_save(state, storage_writer=writer, process_group=self.group,
                                            no_dist=not _distributed(), async_stager=self.stager())
                    self._after_staging()
                    self.pending = _PendingSave(step, tmp, final, meta, future, t0)  # type: ignore[arg-type]
                    self.last_blocked_s = time.perf_counter() - t0
                    return final
                dcp.save(state, storage_writer=writer, process_group=self.group, no_dist=not _distributed())
        except (CheckpointException, OSError) as exc:  # DCP raised the same failure on every rank
            self._discard(tmp)
            raise CheckpointSaveError(f"checkpoint of step {step} could not be written: {_reason(exc)}") from None
        faults.maybe_kill("kill_in_save", step, self.rank)
        self.barrier()  # every rank's shard is on disk before the commit
        self._commit(tmp, final, meta, t0)
        self.last_blocked_s = time.perf_counter() - t0
        return final

    def stager(self) -> Any:
        """The stager of every asynchronous save of this run: DCP's ``DefaultStager``, blocking (the
        caller may change the state as soon as ``save`` returns), which allocates its host copy at
        the first save and reuses it (a fresh pageable copy of the whole state per save is what
        made saves block: allocation and page faults, not the copy), pinned on CUDA so the device
        copies run at full bandwidth. The one previous save is always written before it is reused.
        torch 2.11's stager closes itself after each stage (nothing is kept, and a second stage
        fails): there a new, unpinned one per save (the old behaviour; pinning per save would cost more)."""
        if self._stager is None:
            import torch
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            pinned = torch.cuda.is_available() and self._stager_reusable is not False
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=pinned))
        return self._stager

    def _after_staging(self) -> None:
        inner = getattr(self._stager, "_state_dict_stager", None)
        if inner is not None and not getattr(inner, "_deepcopy_dispatch", True):  # closed by this torch version
            self._stager, self._stager_reusable = None, False

    def _discard(self, tmp: str) -> None:
        """A failed save's temporary directory goes at once: it must not keep the disk full."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def pending_write_done(self) -> bool:
        """This rank's part of the in-flight asynchronous save is on disk (or there is none)."""
        return self.pending is None or self.pending.future.done()

    def pending_write_failed(self) -> bool:
        """This rank's background write raised (the save must then be committed nowhere)."""
        p = self.pending
        return p is not None and p.future.done() and p.future.exception() is not None

    def abandon_pending(self) -> str:
        """Give up on a failed asynchronous save (every rank's write has ended): its temporary
        directory is removed, never committed. Returns the reason."""
        p, self.pending = self.pending, None
        if p is None:
            return ""
        exc = p.future.exception() if p.future.done() else None
        reason = _reason(exc) if exc is not None else "failed on another rank"
        log.error("asynchronous save of step %d failed (%s); not committed, its files are removed", p.step, reason)
        self._discard(p.tmp)
        return reason

    def commit_pending(self) -> None:
        """Commit the asynchronous save; call only when every rank reported its write done."""
        p = self.pending
        if p is None:
            return
        self.pending = None
        try:
            p.future.result()  # re-raises a failed write: an incomplete checkpoint is never committed
        except (CheckpointException, OSError) as exc:
            self._discard(p.tmp)
            raise CheckpointSaveError(f"checkpoint of step {p.step} could not be written: {_reason(exc)}") from None
        faults.maybe_kill("kill_in_save", p.step, self.rank)  # written everywhere, not committed
        self._commit(p.tmp, p.final, p.meta, p.t0)

    def wait(self) -> None:
        """Block until the in-flight asynchronous save is written on every rank, then commit it;
        and until pruned checkpoints are removed."""
        for thread in self._deletions:
            thread.join()
        self._deletions.clear()
        if self.pending is not None:
            with contextlib.suppress(Exception, CheckpointException):
                self.pending.future.result()  # the failure, if any, is raised by commit_pending
            self.barrier()
            self.commit_pending()

    def _commit(self, tmp: str, final: str, meta: dict[str, Any], t0: float) -> None:
        error = None
        if self.rank == 0:
            try:
                self._publish(tmp, final, meta)
            except (OSError, CheckpointError) as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                error = f"checkpoint of step {meta['step']} could not be committed: {_reason(exc)}"
        if (error := self._broadcast(error)) is not None:
            raise CheckpointSaveError(error)
        self.head = final
        self.barrier()  # every rank sees the committed checkpoint (a rollback may load it next)
        log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)

    def _publish(self, tmp: str, final: str, meta: dict[str, Any]) -> None:
        """Rank 0: manifest into the marker, rename into place, check sizes, then prune."""
        step = meta["step"]
        meta["files"] = collect_manifest(tmp, self.world_size)
        _write_json(os.path.join(tmp, MARKER), meta)
        _fsync_dir(tmp)
        faults.maybe_kill("kill_after_marker", step, self.rank)  # complete but not yet in place
        if os.path.exists(final):  # the same step saved by an earlier run in this dir: keep it aside
            self._move_aside(final, "replaced")
        os.rename(tmp, final)
        _fsync_dir(self.root)
        problems = check_files(final, meta["files"], sorted(meta["files"]), checksums=False)
        if problems:  # never prune the previous checkpoints for one that is not all there
            self._move_aside(final, "corrupt")
            raise CorruptCheckpoint(f"{final} failed its check right after the save: {problems[0]}")
        try:  # the new checkpoint is published: a failure to clean up older ones must not unsay that
            self._prune()
        except OSError as exc:
            log.warning("pruning old checkpoints failed (%s); they stay until the next save", exc)

    # --- retention and moving aside -----------------------------------------------------------------
    def _delete(self, step: int, path: str) -> None:
        """Rename first, then remove in a background thread: a crash mid-way leaves a '.deleting_'
        directory (removed later), never a half-deleted checkpoint under a step name, and the
        removal of gigabytes is off the save's critical path (``wait`` joins it)."""
        doomed = os.path.join(os.path.dirname(path), f".deleting_{os.path.basename(path)}.{uuid.uuid4().hex[:6]}")
        os.rename(path, doomed)
        faults.maybe_kill("kill_in_prune", step, self.rank)
        thread = threading.Thread(target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True}, daemon=True)
        thread.start()
        self._deletions.append(thread)

    def _prune(self) -> None:
        found = list_complete(self.root)
        if self.keep_last > 0:
            for step, path in found[: -self.keep_last]:
                if self.keep_every and step % self.keep_every == 0:
                    continue
                self._delete(step, path)
        for name in os.listdir(self.root):  # leftovers of crashed saves and deletions
            m = STEP_DIR.match(name[len(".tmp_"):]) if name.startswith(".tmp_") else None
            if m and found and int(m.group(1)) < found[-1][0]:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def _move_aside(self, path: str, reason: str) -> str:
        """Rank 0: keep ``path`` under checkpoints-aside/ (bounded by keep_aside), out of resume's reach."""
        os.makedirs(self.aside_root, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = os.path.join(self.aside_root, f"{os.path.basename(path)}.{reason}.{stamp}.{uuid.uuid4().hex[:6]}")
        os.rename(path, dest)
        if self.keep_aside > 0:
            entries = sorted((e for e in os.scandir(self.aside_root) if e.is_dir()), key=lambda e: e.stat().st_mtime)
            for old in entries[: -self.keep_aside]:
                shutil.rmtree(old.path, ignore_errors=True)
        return dest

    def move_aside(self, path: str, reason: str) -> str | None:
        """Collective: rank 0 moves ``path`` aside if it lies in this run's checkpoints directory
        (a checkpoint elsewhere, e.g. another run's branch point, is left where it is)."""
        dest = None
        if self.rank == 0 and os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.root) and os.path.isdir(path):
            dest = self._move_aside(path, reason)
        self.barrier()
        return dest

    def cleanup_temporaries(self) -> None:
        """Rank 0 at start-up, no save in flight: temporaries of crashed saves and deletions free the disk."""
        if self.rank == 0 and os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name.startswith((".tmp_step_", ".deleting_")):
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    # --- timeline ----------------------------------------------------------------------------------------
    def _timeline_path(self) -> str:
        return os.path.join(self.run_dir, TIMELINE)

    def read_timeline(self) -> dict[str, Any] | None:
        try:
            with open(self._timeline_path()) as f:
                data = json.load(f)
            return data if isinstance(data, dict) and isinstance(data.get("run_id"), str) else None
        except (OSError, ValueError):
            return None

    def _write_timeline(self, run_id: str, parent: dict[str, Any] | None) -> None:
        if self.rank != 0:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        old = self.read_timeline()
        history = (old or {}).get("history", [])[-20:] + ([{k: old[k] for k in ("run_id", "parent")}] if old else [])
        tmp = self._timeline_path() + ".tmp"
        _write_json(tmp, {"run_id": run_id, "parent": parent, "started": time.time(), "history": history})
        os.replace(tmp, self._timeline_path())

    def start_branch(self, parent: dict[str, Any] | None) -> None:
        """A new branch: from ``parent`` (a loaded checkpoint) or from scratch. Checkpoints in this
        run's directory newer than the branch point belong to the abandoned branch: moved aside."""
        run_id = self._broadcast(uuid.uuid4().hex[:12])
        start = parent["step"] if parent else -1
        if self.rank == 0:
            for step, path in list_complete(self.root):
                if step > start and os.path.abspath(path) != os.path.abspath(parent["path"] if parent else ""):
                    dest = self._move_aside(path, "abandoned")
                    log.warning("checkpoint %s belongs to an abandoned branch: moved to %s", path, dest)
        self._write_timeline(run_id, parent)
        self.run_id, self.head = run_id, parent["path"] if parent else None
        self.barrier()

    def continue_branch(self, path: str, meta: dict[str, Any]) -> None:
        timeline = self.read_timeline() if self.rank == 0 else None
        run_id = self._broadcast(timeline["run_id"] if timeline else (meta.get("run_id") or uuid.uuid4().hex[:12]))
        if timeline is None:
            self._write_timeline(run_id, None)
        self.run_id, self.head = run_id, path

    def candidates(self) -> list[str]:
        """Rank 0: checkpoints ``resume=auto`` may use, best first: the current branch's, newest
        first (markers without a run id, from older versions, count as this branch), then the
        branch point and the older checkpoints of its branch."""
        timeline = self.read_timeline()
        found = [p for _, p in reversed(list_complete(self.root))]
        if timeline is None:
            return found
        run_id = timeline["run_id"]
        out = [p for p in found if _run_id(p) in (run_id, None)]
        parent = timeline.get("parent")
        if isinstance(parent, dict) and isinstance(parent.get("path"), str):
            out.append(parent["path"])
            out += [p for s, p in reversed(list_complete(os.path.dirname(parent["path"])))
                    if s < parent.get("step", -1) and _run_id(p) == parent.get("run_id")]
        return list(dict.fromkeys(p for p in out if os.path.isdir(p)))

    def latest(self) -> str | None:
        """Newest checkpoint ``resume=auto`` would try first (unverified)."""
        found = self.candidates()
        return found[0] if found else None

    def resolve(self, resume: str) -> str | None:
        """``auto`` -> latest candidate or None; ``never`` -> None; else a path that must be complete."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        if not os.path.isdir(resume):
            raise CheckpointError(f"resume={resume!r}: no such checkpoint directory")
        if not is_complete(resume):
            raise CheckpointError(f"resume={resume!r} is not a complete checkpoint (no {MARKER}); refusing to load it")
        return resume

    # --- load --------------------------------------------------------------------------------------------
    def verify(self, path: str) -> dict[str, Any]:
        """Collective: marker, sizes and checksums of every file (each rank checks its share).
        Raises CorruptCheckpoint on every rank if any rank found a problem."""
        meta, problems = verify_share(path, self.rank, self.world_size)
        return _verdict(path, meta, [p for rank_problems in self._gather(problems) for p in rank_problems])

    def check_config(self, path: str) -> None:
        """Refuse to resume from a checkpoint saved with settings that change what its state means."""
        if self.config_text:
            check_resume_config(path, self.config_text, self.allow_changes)

    def load(self, path: str, state: dict[str, Stateful], check_config: bool = False) -> dict[str, Any]:
        """Verify, then load ``state`` from a complete checkpoint, re-sharding to this run's layout.

        ``model`` and ``optimizer`` load strictly. Per-rank entries (RNG streams) of ranks the
        saving run did not have, and keys the checkpoint does not have at all (a component
        added since), are left as they are and logged. Raises CorruptCheckpoint (damaged,
        untrusted) or IncompatibleCheckpoint (intact, but not for this run).
        """
        meta = self.verify(path)
        if check_config:
            self.check_config(path)
        saved_keys = set(read_metadata_file(os.path.join(path, METADATA_FILE)).state_dict_metadata)
        keep, absent = {}, []
        for key, obj in state.items():
            if isinstance(obj, RNGState) and not any(k.startswith(f"{key}.{obj.key}.") for k in saved_keys):
                log.warning("checkpoint %s has no RNG state for %s (saved on fewer ranks): keeping this rank's seed", path, obj.key)
            elif key not in STRICT_KEYS and not any(k.startswith(key + ".") for k in saved_keys):
                log.warning("checkpoint %s has no '%s' state (added since it was saved): keeping the fresh one", path, key)
                absent.append(key)
            else:
                keep[key] = obj
        planner = StrictLoadPlanner(tuple(k for k in STRICT_KEYS if k in keep))
        try:
            with _single_process_ok():
                dcp.load(keep, storage_reader=SafeFileSystemReader(path), planner=planner, process_group=self.group,
                         no_dist=not _distributed())
        except (CheckpointException, Exception) as exc:
            inner = _failure_of(exc)
            if isinstance(inner, CheckpointError):
                raise type(inner)(f"{path}: {inner}") from None
            # checksums passed, so the bytes are what was saved: a failure means the state does not fit
            kind = IncompatibleCheckpoint if meta.get("format", 1) >= 2 else CorruptCheckpoint
            raise kind(f"{path} does not load into this run: {_reason(exc)}") from None
        return {**meta, "absent_keys": absent}

    def restore_latest(self, state: dict[str, Stateful], check_config: bool = False) -> tuple[str, dict[str, Any]] | None:
        """``resume=auto`` and rollback: the newest candidate that verifies and loads; None if there
        are no candidates. Candidates that fail (damaged, untrusted) are skipped; once an older one
        loaded, each is logged (a ``checkpoint_corrupt`` event) and moved aside. If none loads,
        nothing is moved and CheckpointError says why: training from scratch after, say, a storage
        outage made every file unreadable must be the user's decision (``resume=never``)."""
        failed: list[tuple[str, CorruptCheckpoint]] = []
        for path in self.agreed(self.candidates):
            try:
                meta = self.load(path, state, check_config)
            except CorruptCheckpoint as exc:
                log.error("checkpoint %s is unusable: %s", path, exc)
                failed.append((path, exc))
                continue
            for bad, exc in failed:
                dest = self.move_aside(bad, "corrupt")
                log.error("fell back past %s to %s%s", bad, path, f"; moved it to {dest}" if dest else "")
                self.events.append({"kind": "checkpoint_corrupt", "path": bad, "reason": str(exc), "moved_to": dest})
            return path, meta
        if failed:
            raise CheckpointError(f"no usable checkpoint: {len(failed)} failed, the newest {failed[0][1]} "
                                  "(resume=never starts over, resume=PATH picks one)")
        return None

    def load_weights(self, path: str, model: nn.Module) -> dict[str, list[str]]:
        """``init=PATH``: model weights only, into a new run (see :func:`load_model_weights`)."""
        return load_model_weights(path, model, self.group, "init", meta=self.verify(path))


def load_model_weights(path: str, model: nn.Module, group: Any = None, key: str = "init",
                       meta: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """A checkpoint's model weights (nothing else) into ``model``, resharded to its layout: each
    rank reads the shards it holds. Tensors whose shapes differ are refused; tensors only one side
    has are returned (``fresh``: the model's, left as they are; ``unused``: the checkpoint's) and
    logged. ``key`` names the config key in messages. Collective over ``group`` (all ranks when
    None) when distributed: each rank checksums its share of the files unless ``meta`` says the
    caller verified them."""
    if meta is None:
        meta, problems = verify_share(path, *((dist.get_rank(group), dist.get_world_size(group)) if _distributed()
                                              else (0, 1)))
        if _distributed():
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, problems, group=group)
            problems = [p for rank_problems in gathered for p in rank_problems]
        meta = _verdict(path, meta, problems)
    saved = read_metadata_file(os.path.join(path, METADATA_FILE)).state_dict_metadata
    local = get_model_state_dict(model)
    prefix = "model."
    mismatched, matched, fresh = [], {}, []
    for name, tensor in local.items():
        entry = saved.get(prefix + name)
        if not isinstance(entry, TensorStorageMetadata):
            fresh.append(name)
        elif tuple(entry.size) != tuple(tensor.shape):
            mismatched.append(f"{name} {tuple(entry.size)} vs {tuple(tensor.shape)}")
        else:
            matched[prefix + name] = tensor
    unused = sorted(k[len(prefix):] for k in saved if k.startswith(prefix) and k[len(prefix):] not in local)
    if mismatched:
        raise IncompatibleCheckpoint(f"{key}={path}: tensor shapes differ: {', '.join(mismatched[:4])}"
                                     + (f" (+{len(mismatched) - 4} more)" if len(mismatched) > 4 else ""))
    if not matched:
        raise IncompatibleCheckpoint(f"{key}={path}: no model tensor of this run is in the checkpoint")
    try:
        with _single_process_ok():
            dcp.load(matched, storage_reader=SafeFileSystemReader(path), planner=_PartialLoadPlanner(),
                     process_group=group, no_dist=not _distributed())
    except (CheckpointException, Exception) as exc:
        raise CorruptCheckpoint(f"{key}={path} does not load: {_reason(exc)}") from None
    set_model_state_dict(model, {k[len(prefix):]: v for k, v in matched.items()}, options=StateDictOptions(strict=False))
    log.info("%s from %s (step %d): %d tensors loaded, %d kept fresh %s, %d in the checkpoint unused %s", key, path,
             meta["step"], len(matched), len(fresh), fresh[:3], len(unused), unused[:3])
    return {"fresh": fresh, "unused": unused}


class _PartialLoadPlanner(SafeLoadPlanner):
    def __init__(self) -> None:
        DefaultLoadPlanner.__init__(self, allow_partial_load=True)


def _run_id(path: str) -> str | None:
    """The run id in a checkpoint's marker; None for markers of older versions or unreadable ones
    (an unreadable one stays a candidate so verification can report and move it)."""
    try:
        return read_marker(path).get("run_id")
    except CorruptCheckpoint:
        return None


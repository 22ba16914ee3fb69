"""Outputs of the commands (prune, export, sample, distill-logits, encode-latents): never over what a
user owns, and never half-written (plus the one argument they share, ``--device``).

* **Checked before work.** An output may not overlap an input (the same path, or one inside the
  other); an existing file or a non-empty directory is refused unless it is the command's own
  previous, complete output (each command says how to recognise it) or ``--force`` is given.
* **Atomic.** The output is built under a temporary sibling (``OUT.partial-HOST-PID``) and renamed
  into place when complete; a previous output it replaces is renamed aside first and removed only
  after the new one is in place. A killed command leaves only its ``.partial-`` sibling, which the
  next run on this host removes once the process that made it is gone.
* **Shared as the user's umask says.** Some writers (safetensors, ``tempfile``) create files 0600;
  a pruned model or an export on a team's file system is meant to be read by others, so before it is
  published every file gets ``0666 & ~umask`` and every directory ``0777 & ~umask`` (0644 / 0755 at
  the usual umask 022). None of these outputs holds a secret.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bigtrain.config.core import ConfigError
from data_pipeline.writer import pid_alive

if TYPE_CHECKING:
    import torch

_PARTIAL = re.compile(r"\.partial-(?P<host>[^/]+)-(?P<pid>\d+)$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def partial_path(out: str) -> str:
    return f"{os.path.abspath(out)}.partial-{_host()}-{os.getpid()}"


def clean_partials(out: str) -> list[str]:
    """Remove the temporary siblings of ``out`` left by killed runs on this host; returns them."""
    parent, base = os.path.split(os.path.abspath(out))
    removed = []
    for name in os.listdir(parent or ".") if os.path.isdir(parent or ".") else []:
        if not name.startswith(base + ".partial-"):
            continue
        m = _PARTIAL.search(name[len(base):])
        if m and m.group("host") == _host() and int(m.group("pid")) != os.getpid() and not pid_alive(int(m.group("pid"))):
            path = os.path.join(parent, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            removed.append(path)
    return removed


def overlaps(a: str, b: str) -> bool:
    """The same path, or one inside the other (after resolving links)."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return ra == rb or ra.startswith(rb.rstrip(os.sep) + os.sep) or rb.startswith(ra.rstrip(os.sep) + os.sep)


def check_output(out: str, flag: str, kind: str, *, force: bool = False, sources: tuple[str, ...] = (),
                 own: Callable[[str], bool] = lambda path: False) -> None:
    """Refuse (ConfigError naming ``flag``) an output ``out`` of ``kind`` 'file' or 'dir' that overlaps
    a source or would replace something that is not ``own`` previous output, unless ``force``."""
    if not out:
        raise ConfigError(f"{flag}: an output path is required")
    for src in sources:
        if src and os.path.exists(src) and overlaps(out, src):
            raise ConfigError(f"{flag} {out}: overlaps the input {src}; write the output elsewhere")
    if not os.path.lexists(out):
        parent = os.path.dirname(os.path.abspath(out))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise ConfigError(f"{flag} {out}: {parent} is not a directory")
        return
    if os.path.islink(out):
        raise ConfigError(f"{flag} {out}: is a symbolic link; name the real path")
    if kind == "file" and os.path.isdir(out):
        raise ConfigError(f"{flag} {out}: is a directory, the output is a file")
    if kind == "dir" and not os.path.isdir(out):
        raise ConfigError(f"{flag} {out}: is an existing file, the output is a directory")
    if kind == "dir" and not os.listdir(out):
        return
    if not (force or own(out)):
        what = "a non-empty directory" if kind == "dir" else "an existing file"
        raise ConfigError(f"{flag} {out}: is {what} that is not this command's own earlier output; "
                          "choose another path or pass --force to replace it")


def publish(tmp: str, out: str) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` (already judged replaceable) is moved
    aside first and removed only once the new one is in place."""
    out = os.path.abspath(out)
    if not os.path.isdir(tmp) and not os.path.isdir(out):
        os.replace(tmp, out)  # a file: replaced in one step
        return
    old = None
    if os.path.lexists(out):
        if os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        else:
            old = f"{out}.replaced-{_host()}-{os.getpid()}"
            os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def share_modes(path: str) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the modes a plain ``open`` /
    ``mkdir`` would under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it; put it back at once
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if not os.path.isdir(path):
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), dir_mode)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), file_mode)


@contextmanager
def atomic_output(out: str, kind: str) -> Iterator[str]:
    """Yield a temporary path to build ``out`` (a 'file' or a 'dir') in; published on success,
    removed on failure. Leftovers of killed earlier runs are cleaned first."""
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    clean_partials(out)
    tmp = partial_path(out)
    if kind == "dir":
        os.makedirs(tmp)
    try:
        yield tmp
        if os.path.lexists(tmp):
            share_modes(tmp)
        publish(tmp, out)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise


def device_arg(value: str, flag: str = "--device") -> "torch.device":
    """A command's ``--device`` value checked before work: a device bigtrain runs on, present here."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise ConfigError(f"{flag} {value!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} {value}: bigtrain runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} {value}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


__all__ = ["atomic_output", "check_output", "clean_partials", "device_arg", "overlaps", "partial_path", "publish",
           "share_modes"]

"""A frozen teacher as a training component.

The teacher is built from the config's ``teacher`` section, loaded from its pretrained source and
parallelized on the student's mesh (FSDP-sharded over data parallel unless
``distill.shard_teacher=false``); it has no optimizer state and its weights never enter the
student's checkpoint. What the checkpoint does keep, under the key ``teacher``, is the teacher's
*identity*: a fingerprint of its source files, so a resume with a different teacher at the same
path is noticed (and logged) rather than silently mixing two teachers into one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)

HEAD_BYTES = 1 << 20  # per file: enough for a safetensors header (tensor names, shapes, offsets)


def fingerprint(path: str) -> bytes:
    """SHA-256 over a model directory's file names, sizes and first MiB each (configs, safetensors
    headers, DCP metadata): cheap for multi-GB weights, and it changes when the model does."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    for file in files:
        rel = os.path.relpath(file, path) if file != path else os.path.basename(file)
        h.update(rel.encode() + b"\0" + str(os.path.getsize(file)).encode() + b"\0")
        with open(file, "rb") as f:
            h.update(f.read(HEAD_BYTES))
    return h.digest()


class Teacher:
    """The frozen teacher: evaluation mode, no gradients, its source's fingerprint as checkpoint state.
    ``model`` None: the teacher's stored logits (``source``, a logit store) stand in for it."""

    name = "teacher"

    def __init__(self, model: nn.Module | None, source: str) -> None:
        self.model = model.eval().requires_grad_(False) if model is not None else None
        self.source = source
        self.fingerprint = torch.frombuffer(bytearray(fingerprint(source)), dtype=torch.uint8).clone()

    def stateful(self) -> Stateful:
        return _TeacherState(self)

    def after_optimizer_step(self, step: int) -> None:
        pass

    def evaluation(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class _TeacherState(Stateful):
    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher

    def state_dict(self) -> dict[str, Any]:
        # a fresh tensor each time: DCP loads in place, and the live fingerprint must survive a load
        return {"fingerprint": self.teacher.fingerprint.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["fingerprint"]
        if not torch.equal(saved.cpu(), self.teacher.fingerprint):
            log.warning("the teacher at %s is not the one this checkpoint was trained with (its files changed): "
                        "distillation continues towards the new one", self.teacher.source)

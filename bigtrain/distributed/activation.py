"""Activation checkpointing of transformer blocks (non-reentrant, composes with FSDP2/TP)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

# Name components the wrappers parallelize adds (activation checkpointing, torch.compile of a
# wrapping module); the model's own names, DCP keys and optimizer groups never contain them.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """Parameter name without activation-checkpointing / compile wrapper components."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def apply_activation_checkpointing(blocks: nn.ModuleDict, mode: str, every: int = 2) -> int:
    """Wrap blocks in place: ``full`` = all, ``selective`` = every ``every``-th block (by its global index).

    Returns how many blocks were wrapped. Checkpoint keys do not change: DCP's
    state-dict helpers strip the wrapper's ``_checkpoint_wrapped_module`` prefix.
    """
    if mode == "none":
        return 0
    wrapped = 0
    for name in list(blocks.keys()):
        if mode == "full" or int(name) % every == every - 1:
            blocks[name] = checkpoint_wrapper(blocks[name], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            wrapped += 1
    return wrapped

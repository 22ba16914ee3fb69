"""A bigtrain checkpoint read as a model: the one place that does it.

* whole, in one process (:func:`model_from_checkpoint`, :func:`load_model_state`): export,
  sampling, sample scoring, pruning;
* sharded, each rank reading only what it holds (:func:`checkpoint_source`): ``model.pretrained``
  / ``teacher.pretrained`` pointing at a checkpoint.

The checkpoint is verified before anything in it is parsed; its config is read as data (a family it
names by module is not imported unless the user trusted it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bigtrain.checkpoint.integrity import CheckpointError, CorruptCheckpoint, SafeFileSystemReader
from bigtrain.checkpoint.manager import _single_process_ok, open_saved_config, verify_checkpoint
from bigtrain.checkpoint.state import SafeLoadPlanner
from bigtrain.config.core import ConfigError
from bigtrain.config.registry import Pretrained, get_family

if TYPE_CHECKING:
    from bigtrain.config.schema import Config

MODEL_PREFIX = "model."
EMA_PREFIX = "ema.params."


def load_model_state(ckpt: str, weights: str = "model") -> dict[str, torch.Tensor]:
    """Every model tensor of a complete checkpoint, unsharded, keyed by parameter name. ``weights``:
    "model" = the trained weights; "ema" = the EMA's average where the checkpoint has one for a
    tensor (every trainable parameter), the trained value otherwise (frozen parameters, buffers);
    "auto" = "ema" when the checkpoint holds an EMA."""
    return _read_model_state(ckpt, weights)[0]


def _read_model_state(ckpt: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """:func:`load_model_state`, and which weights it read ("ema" or "model"), from one metadata read."""
    if weights not in ("model", "ema", "auto"):
        raise ValueError(f"weights must be model, ema or auto, got {weights!r}")
    verify_checkpoint(ckpt)
    reader = SafeFileSystemReader(ckpt)
    saved = reader.read_metadata().state_dict_metadata
    has_ema = any(k.startswith(EMA_PREFIX) for k in saved)
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{ckpt} holds no EMA weights (trained with ema.decay=0): use the model weights")
    use_ema = has_ema and weights != "model"
    state: dict[str, torch.Tensor] = {}
    for key, meta in saved.items():
        if not (key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)):
            continue
        name = key[len(MODEL_PREFIX):]
        source = EMA_PREFIX + name if use_ema and isinstance(saved.get(EMA_PREFIX + name), TensorStorageMetadata) else key
        state[source] = torch.empty(meta.size, dtype=saved[source].properties.dtype)
    if not state:
        raise CheckpointError(f"{ckpt} holds no model tensors")
    try:
        with _single_process_ok():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    except CheckpointException as exc:  # a BaseException: never let it escape as a traceback
        raise CorruptCheckpoint(f"{ckpt} does not load: {next(iter(exc.failures.values()))[0]}") from None
    return ({k[len(EMA_PREFIX if k.startswith(EMA_PREFIX) else MODEL_PREFIX):]: v for k, v in state.items()},
            "ema" if use_ema else "model")


def model_from_checkpoint(path: str, key: str = "checkpoint", weights: str = "auto", strict: bool = False,
                          accept: Callable[[Config, nn.Module], None] | None = None) -> tuple[Config, nn.Module, str]:
    """The whole model of a checkpoint on the CPU, in one process: built on ``meta`` from its verified
    saved config (``key`` names the option in messages), ``accept(cfg, model)`` may refuse it before
    a tensor is read, then filled (``weights`` as :func:`load_model_state`; ``strict``: no tensor may
    be extra either) and its derived buffers recomputed. A parameter or buffer left unfilled is an
    error. Returns the config, the model and which weights it holds ("ema" or "model")."""
    cfg = open_saved_config(path, key)
    with torch.device("meta"):
        model = get_family(cfg.model.family).build(cfg.model)
    if accept is not None:
        accept(cfg, model)
    state, used = _read_model_state(path, weights)
    missing, _ = model.load_state_dict(state, strict=strict, assign=True)
    params = dict(model.named_parameters())
    lacking = [n for n in missing if n in params]
    if lacking:
        raise CheckpointError(f"{path} lacks parameters of its model, e.g. {lacking[0]}")
    if hasattr(model, "reset_buffers"):  # buffers derived from the sizes, never saved
        model.reset_buffers(torch.device("cpu"))
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise CheckpointError(f"{path} does not fill {unfilled[0]} of its model")
    return cfg, model, used


def saved_model_section(path: str, family: str, key: str = "model.pretrained") -> Any:
    """The ``model`` section a bigtrain checkpoint was trained with; refused unless of ``family``."""
    try:
        section = open_saved_config(path, key).model
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    if section.family != family:
        raise ConfigError(f"config key '{key}': {path} holds a model.family={section.family} model, not a {family} one")
    return section


def checkpoint_source(path: str, family: str, size_keys: tuple[str, ...], prepare: Callable[[nn.Module], None] = lambda m: None,
                      finish: Callable[[nn.Module], None] = lambda m: None) -> Pretrained:
    """A bigtrain checkpoint as pretrained weights: its saved section gives ``size_keys``; ``load``
    verifies it and reads, through DCP, the shards of every model tensor this rank holds (any saved
    layout into any current one), between the family's ``prepare`` and ``finish`` (e.g. re-tying
    embeddings, recomputing buffers). A tensor the checkpoint lacks is an error, not a fresh init."""
    saved = saved_model_section(path, family)

    def load(model: nn.Module) -> dict[str, int]:
        from torch.distributed.tensor import DTensor

        from bigtrain.checkpoint.manager import load_model_weights

        prepare(model)
        report = load_model_weights(path, model, key="pretrained")
        if report["fresh"]:
            raise ConfigError(f"pretrained={path} lacks {len(report['fresh'])} tensors of the model, e.g. {report['fresh'][0]}")
        finish(model)
        params = dict(model.named_parameters())
        return {"tensors": len(params),
                "elements": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params.values())}

    return Pretrained(path=path, sizes={k: getattr(saved, k) for k in size_keys}, load=load)

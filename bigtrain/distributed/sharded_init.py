"""Sharded initialisation: build on ``meta``, record the initialisation, replay it tensor by tensor.

A model built under ``torch.device("meta")`` allocates nothing, but its initialisers (``uniform_``,
``normal_``, ``trunc_normal_``'s chain, copies of computed tables) run as ops on meta tensors. A
:class:`InitRecorder` (a dispatch mode) writes them down. :func:`replay` runs them again on the
CPU, one storage at a time: an op whose result no kept tensor needs is skipped, except random ops,
which always run (a dead one into a scratch tensor freed at once) so that the CPU generator draws
exactly the stream ``torch.manual_seed(seed); build()`` would draw. The values are therefore
bit-identical to building the model on the CPU from the same seed, while the host holds only the
tensors in flight. Each finished tensor goes to a *sink* (the caller copies its own shard of it
to the device and drops it).

Not recordable (the caller falls back to a CPU build): a builder that draws random numbers on the
CPU while the model is on meta, reads values (``.item()``) during construction, or ties one
parameter to two names (``to_empty`` would untie them).

:func:`record_build` and :func:`materialize` put it together for a trainer: build on meta while
recording, parallelize the meta model (TP, FSDP: the parameters become DTensors), ``to_empty`` on
the device, then replay, each finished tensor copied into the box of it that this rank holds.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

# In-place ops whose result does not depend on the tensor's previous values.
_OVERWRITES = {"uniform_", "normal_", "fill_", "zero_", "copy_", "random_", "exponential_", "bernoulli_",
               "geometric_", "cauchy_", "log_normal_"}
_META = torch.device("meta")
# Creation ops that leave memory as it was: a tensor only they touched was never initialised.
_UNFILLED = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
# Python-level initialisers that do nothing on meta tensors: (module, attribute) patched while recording.
_PYTHON_INITS = [(torch.nn.init, "trunc_normal_")]


class NotRecordable(RuntimeError):
    """The builder did something a meta-device recording cannot replay."""


@dataclass(frozen=True)
class _Ref:
    """A meta tensor in a recorded op: a view (size, stride, offset, dtype) of a storage."""

    sid: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass
class _Op:
    func: Any
    spec: Any
    leaves: list[Any]
    out_refs: list[_Ref | None]
    reads: set[int]
    writes: set[int]
    creates: set[int]
    kills: set[int]
    random: bool


@dataclass
class InitRecord:
    ops: list[_Op] = field(default_factory=list)
    nbytes: dict[int, int] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)  # storages stay alive: ids are never reused

    def ref(self, t: torch.Tensor) -> _Ref:
        storage = t.untyped_storage()
        sid = storage._cdata
        if sid not in self.nbytes:
            self.nbytes[sid] = storage.nbytes()
            self.keep.append(t)
        return _Ref(sid, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def refs(self, leaves: list[Any]) -> list[Any]:
        """The leaves of an op's arguments with each meta tensor replaced by its :class:`_Ref`."""
        return [self.ref(x) if isinstance(x, torch.Tensor) and x.device == _META else x for x in leaves]


def _covers(t: torch.Tensor) -> bool:
    """Whether the view writes every byte of its storage (so what was there before is dead)."""
    if t.numel() * t.element_size() != t.untyped_storage().nbytes():
        return False
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1)
    expected = 1
    for stride, n in dims:
        if stride != expected:
            return False
        expected *= n
    return True


class InitRecorder(TorchDispatchMode):
    """Records the ops that produce and fill meta tensors (use around a meta-device build)."""

    def __init__(self) -> None:
        super().__init__()
        self.record = InitRecord()
        self._saved: list[tuple[Any, str, Any]] = []
        self._hf_patched = False

    def __enter__(self) -> InitRecorder:
        # Initialisers that return early on meta (torch 2.13's trunc_normal_ rejection-samples, a
        # data-dependent loop) are recorded as one call, replayed as that call on the CPU view.
        for owner, name in _PYTHON_INITS:
            own = getattr(owner, name)
            self._saved.append((owner, name, own))
            setattr(owner, name, self._python_init(own))
        self._run_hf_init_on_meta()
        return super().__enter__()

    def _run_hf_init_on_meta(self) -> None:
        """Hugging Face's ``init_weights`` skips initialisation under a meta device context (there is
        nothing to fill); here the fills are what is recorded, so it runs, at the point of the build
        where a CPU build runs it (same random stream). Patched once transformers is imported (on
        entry or at the first op after a builder imports it: an HF module makes its parameters before
        its ``post_init`` initialises them); never imported here, which would cost seconds."""
        modeling_utils = sys.modules.get("transformers.modeling_utils")
        if self._hf_patched or modeling_utils is None:
            return
        self._hf_patched = True
        if not hasattr(modeling_utils, "get_torch_context_manager_or_global_device"):
            return
        own = modeling_utils.PreTrainedModel.init_weights

        def init_weights(model: Any) -> None:
            device_of = modeling_utils.get_torch_context_manager_or_global_device
            modeling_utils.get_torch_context_manager_or_global_device = lambda: torch.device("cpu")
            try:
                own(model)
            finally:
                modeling_utils.get_torch_context_manager_or_global_device = device_of

        self._saved.append((modeling_utils.PreTrainedModel, "init_weights", own))
        modeling_utils.PreTrainedModel.init_weights = init_weights

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for owner, name, own in reversed(self._saved):
            setattr(owner, name, own)
        self._saved.clear()
        self._hf_patched = False

    def _python_init(self, own: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if tensor.device != _META:
                return own(tensor, *args, **kwargs)
            rec = self.record
            leaves, spec = tree_flatten(((tensor, *args), kwargs))
            target = rec.ref(tensor)
            refs = rec.refs(leaves)
            kills = {target.sid} if _covers(tensor) else set()
            reads = {r.sid for r in refs if isinstance(r, _Ref)} - kills
            rec.ops.append(_Op(own, spec, refs, [], reads, {target.sid}, set(), kills, True))
            return tensor

        return init

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self._run_hf_init_on_meta()
        out = func(*args, **kwargs)
        random = torch.Tag.nondeterministic_seeded in func.tags
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if not any(t.device == _META for t in tensors + outs):
            if random:
                raise NotRecordable(f"the model builder draws random numbers on {outs[0].device if outs else 'cpu'} "
                                    f"({func}) while the model is built on meta")
            return out
        written = self._written(func, args, kwargs)
        rec = self.record
        refs = rec.refs(leaves)
        in_sids = {r.sid for r in refs if isinstance(r, _Ref)}
        writes = {rec.ref(t).sid for t in written if t.device == _META}
        out_refs: list[_Ref | None] = []
        creates: set[int] = set()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device == _META and t.untyped_storage()._cdata not in in_sids:
                ref = rec.ref(t)
                creates.add(ref.sid)
                out_refs.append(ref)
            else:
                out_refs.append(None)
        if not writes and not creates:
            return out  # a view or a metadata query: replayed views are rebuilt from their refs
        kills: set[int] = set()
        if func._overloadpacket.__name__ in _OVERWRITES and written and written[0].device == _META \
                and _covers(written[0]):
            target = rec.ref(written[0]).sid
            others = {rec.ref(t).sid for t in tensors if t.device == _META and t is not written[0]}
            if target not in others:
                kills.add(target)
        rec.ops.append(_Op(func, spec, refs, out_refs, in_sids - kills, writes, creates, kills, random))
        return out

    @staticmethod
    def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            out += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
        return out


def _view(storage: torch.UntypedStorage, ref: _Ref) -> torch.Tensor:
    return torch.empty(0, dtype=ref.dtype).set_(storage, ref.offset, ref.size, ref.stride)


def replay(record: InitRecord, sinks: dict[int, list[tuple[_Ref, Callable[[torch.Tensor], None]]]]) -> dict[str, int]:
    """Run the recorded ops on the CPU; hand each storage in ``sinks`` (storage id -> (view, sink))
    to its sinks once its last op has run, then free it. The caller seeds the CPU generator.
    Returns how many ops ran and the most bytes of replayed storages alive at once."""
    ops = record.ops
    needed, run = set(sinks), [False] * len(ops)
    for i in range(len(ops) - 1, -1, -1):  # liveness: which ops produce something kept
        op = ops[i]
        if op.random or (op.writes | op.creates) & needed:
            run[i] = True
            needed -= op.kills | op.creates
            needed |= op.reads
    order = [i for i in range(len(ops)) if run[i]]
    version: dict[int, int] = defaultdict(int)
    last: dict[tuple[int, int], int] = {}
    for i in order:
        op = ops[i]
        for s in op.reads:
            last[(s, version[s])] = i
        for s in op.kills | op.creates:
            version[s] += 1
        for s in op.writes | op.creates:
            last[(s, version[s])] = i
    final = dict(version)
    bases: dict[int, torch.UntypedStorage] = {}
    current: dict[int, int] = defaultdict(int)

    peak = 0

    def base(sid: int) -> torch.UntypedStorage:
        if sid not in bases:
            bases[sid] = torch.UntypedStorage(record.nbytes[sid])
        return bases[sid]

    def alive() -> int:
        return sum(record.nbytes[s] for s in bases)

    def finish(sid: int) -> None:
        if sid in sinks and current[sid] == final.get(sid, 0):
            for ref, sink in sinks[sid]:
                sink(_view(base(sid), ref))
        bases.pop(sid, None)

    for sid in set(sinks) - set(final):  # never written (torch.empty without an op that fills it)
        finish(sid)
    with torch.no_grad():
        for i in order:
            op = ops[i]
            for s in op.kills:
                bases.pop(s, None)
                current[s] += 1
            leaves = [_view(base(x.sid), x) if isinstance(x, _Ref) else
                      (torch.device("cpu") if x == _META else x) for x in op.leaves]
            args, kwargs = tree_unflatten(leaves, op.spec)
            result = op.func(*args, **kwargs)
            for ref, t in zip(op.out_refs, tree_flatten(result)[0]):
                if ref is None:
                    continue
                current[ref.sid] += 1
                if (tuple(t.shape), tuple(t.stride()), t.storage_offset()) == (ref.size, ref.stride, ref.offset):
                    bases[ref.sid] = t.untyped_storage()
                else:
                    bases.pop(ref.sid, None)
                    _view(base(ref.sid), ref).copy_(t)
            peak = max(peak, alive())
            for s in op.reads | op.writes | op.creates:
                if last.get((s, current[s])) == i:
                    finish(s)
    return {"ops": len(order), "peak_bytes": peak}


def named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name (a tied parameter once per name)."""
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


@dataclass
class MetaBuild:
    """A model built on meta, its recorded initialisation, and the storage view behind each of its
    tensors (by name, before parallelize wraps or shards anything)."""

    model: nn.Module
    record: InitRecord
    refs: dict[str, _Ref]


def record_build(build: Callable[[], nn.Module]) -> MetaBuild:
    """Run ``build`` (which seeds the generator itself) on meta under an :class:`InitRecorder`."""
    with torch.device("meta"), InitRecorder() as rec:
        model = build()
    tensors = named_tensors(model)
    filled: set[int] = set()
    for op in rec.record.ops:
        if getattr(op.func, "_overloadpacket", None) is None or op.func._overloadpacket.__name__ not in _UNFILLED:
            filled |= op.writes | op.creates
    owners: dict[int, str] = {}
    for name, t in tensors:
        if id(t) in owners:  # to_empty makes one new tensor per module: the tie would not survive
            raise NotRecordable(f"{owners[id(t)]} and {name} are one tied tensor")
        owners[id(t)] = name
        if t.device != _META:
            raise NotRecordable(f"{name} was built on {t.device}, not on meta")
        if t.untyped_storage()._cdata not in filled:  # e.g. an initialiser that skips meta tensors
            raise NotRecordable(f"{name} is never initialised while built on meta")
    return MetaBuild(model, rec.record, {name: rec.record.ref(t) for name, t in tensors})


def local_box(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The part of ``t`` this rank holds and its offset in the global tensor (zeros when not a
    DTensor). Every placement bigtrain uses (Shard, _StridedShard, Replicate, over any mesh) holds
    one box of the global tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return t, (0,) * t.ndim
    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"local shard {tuple(local.shape)} differs from its placement's {tuple(shape)}")
    return local, tuple(offset)


def _fill(dest: torch.Tensor, full: torch.Tensor) -> None:
    local, offset = local_box(dest)
    if tuple(full.shape) != tuple(dest.shape):
        raise RuntimeError(f"replayed tensor {tuple(full.shape)} does not match the model's {tuple(dest.shape)}")
    local.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, local.shape))] if local.ndim else full)


@torch.no_grad()
def materialize(built: MetaBuild, model: nn.Module, device: torch.device, seed: int,
                clean: Callable[[str], str] = lambda n: n) -> dict[str, int]:
    """Allocate ``model`` (``built.model`` after parallelize) empty on ``device`` and fill each of
    its tensors, this rank's box of it only, with the values a CPU build from ``seed`` gives.
    ``clean`` maps the parallelized model's names back to the built ones (wrapper prefixes).
    The host holds the tensors in flight, never the model; the CPU generator ends where the CPU
    build leaves it. Returns the replay's figures and the elements written on this rank."""
    model.to_empty(device=device)
    dest = {clean(name): t for name, t in named_tensors(model)}
    if set(dest) != set(built.refs):
        odd = sorted(set(dest) ^ set(built.refs))
        raise RuntimeError(f"parallelize changed the model's tensor names (e.g. {odd[0]}): cannot place the init")
    sinks: dict[int, list[tuple[_Ref, Callable[[torch.Tensor], None]]]] = {}
    for name, ref in built.refs.items():
        sinks.setdefault(ref.sid, []).append((ref, lambda full, t=dest[name]: _fill(t, full)))
    torch.manual_seed(seed)
    stats = replay(built.record, sinks)
    stats["elements"] = sum(local_box(t)[0].numel() for t in dest.values())
    return stats

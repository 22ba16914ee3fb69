"""Per-rank memory estimate of a training run, from the ``meta`` model and one forward on fake
tensors — nothing is allocated.

Rows (bytes on the most loaded rank):

* parameters, gradients: fp32 masters; FSDP (ZeRO-2/3) splits them over dp (the first rank's
  chunk of dim 0, the larger one when it does not divide), TP splits the >= 2-D parameters of the
  blocks (attention/MLP matrices) over tp, a pipeline rank holds its stage;
* optimizer state: what the optimizer declares per parameter (``OptimizerSpec.state_bytes``) on
  the local shard; ZeRO-1 gives each dp rank the parameters bigtrain's partition assigns it;
* gradient all-reduce buckets (ZeRO-0/1 with dp > 1): a flat copy of the gradients while they are
  reduced;
* FSDP buffers: ZeRO-3 gathers one block and prefetches the next (2 blocks of unsharded parameters)
  and reduce-scatters one block of unsharded gradients; ZeRO-2 keeps every block gathered from
  forward to backward;
* activations: measured, not modelled — a forward pass of the model (micro-batch of the family's
  example batch) on fake tensors under ``saved_tensors_hooks`` gives the bytes autograd saves per block
  and outside the blocks (embedding, head, loss). Full activation checkpointing keeps each block's
  input plus one block's saved tensors while it is recomputed; TP splits the saved tensors of the
  blocks except those of hidden width (replicated unless sequence parallel, as Korthikanti et al.);
  backward holds one more block's worth of activation gradients. Fake CPU tensors, unlike ``meta``
  ones, take autocast (``train.dtype=bfloat16``: saved tensors at the dtypes CPU autocast produces)
  and the fused attention kernel (meta decomposes it into the math path, which saves the score
  matrix); where a fake tensor cannot run an op, the forward runs on meta at fp32 sizes (an upper
  bound);
* autocast weight copies (bf16 without FSDP): the bf16 copy of every weight autocast casts, which
  its cache keeps until the forward ends;
* FSDP unsharded gradients (ZeRO-2/3 with several passes per step: gradient accumulation or
  pipeline micro-batches): FSDP2 accumulates unsharded fp32 gradients until the last pass;
* components: the EMA's fp32 shadow (sharded like the parameters), a teacher's parameters;
* optimizer step working set: fp32 temporaries of the largest local parameter;
* on CPU with ``checkpoint.async_save``: the host copy the stager keeps of the saved state;
* on CUDA, stated allowances (not measured): the caching allocator's reserve and NCCL's buffers;
* runtime baseline: the process before any model exists (interpreter, torch, process group; on
  CUDA the context). "Of which tensors" leaves out the last two kinds: what
  ``torch.cuda.max_memory_allocated`` counts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from bigtrain.config import Config, ConfigError
from bigtrain.config.batching import plan_batches
from bigtrain.distributed.mesh import infer_degrees
from bigtrain.families import RunSpec
from bigtrain.optim.builder import get_optimizer

log = logging.getLogger(__name__)
GiB = 2**30
# measured on the reference machine (python 3.11, torch 2.13 CPU): RSS of a rank after
# `import bigtrain`, the gloo process group and the data loader with a tiny model: 336-408 MiB (docs/memory.md)
CPU_BASELINE = int(0.4 * GiB)
# not measured here: the CUDA context and cuBLAS workspaces (outside max_memory_allocated)
CUDA_BASELINE = int(1.0 * GiB)
# Stated allowances on CUDA, not measurements (the GPU check prints max_memory_reserved and
# max_memory_allocated beside them): the caching allocator rounds blocks up and keeps freed ones
# (reserved exceeds allocated by this fraction of the tensors), and each NCCL communicator keeps
# channel buffers (NCCL_BUFFSIZE 4 MiB per channel and peer; tens of channels on NVLink nodes)
ALLOCATOR_RESERVE = 0.10
NCCL_PER_GROUP = int(0.25 * GiB)
ALLOCATOR_ROW = "allocator reserve (allowance)"
NCCL_ROW = "NCCL buffers (allowance)"
BASELINE_ROW = "runtime baseline"


@dataclass
class ActivationProfile:
    """Bytes autograd saves during one forward of the whole model on one micro-batch."""

    micro_batch: int
    block_saved: int  # one (the largest) block's saved tensors
    block_hidden: int  # of which tensors of the hidden width (replicated under TP without SP)
    block_input: int  # one block's input (what full activation checkpointing keeps)
    outside: int  # embedding, final norm, head and loss
    blocks: int
    cast_params: list[str] = field(default_factory=list)  # parameters autocast copied to bf16


@dataclass
class MemoryEstimate:
    world_size: int
    layout: dict[str, int]
    rows: dict[str, int]
    activations: dict[str, Any] = field(default_factory=dict)
    device_bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def tensors(self) -> int:
        """The rows that are tensors (what ``torch.cuda.max_memory_allocated`` counts): the total
        without the runtime baseline and the allowances."""
        return sum(v for k, v in self.rows.items() if k not in (ALLOCATOR_ROW, NCCL_ROW, BASELINE_ROW))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "tensors": self.tensors}

    def table(self) -> str:
        lay = self.layout
        lines = [f"memory estimate per rank: world {self.world_size} = pp{lay['pp']} x dp{lay['dp']} x tp{lay['tp']}, "
                 f"ZeRO-{lay['zero']}, micro-batch {self.activations.get('micro_batch')}, "
                 f"activation checkpointing {self.activations.get('checkpointing')}"]
        for name, nbytes in self.rows.items():
            lines.append(f"  {name:<40} {nbytes / GiB:9.3f} GiB")
        lines.append(f"  {'total':<40} {self.total / GiB:9.3f} GiB")
        if self.total != self.tensors:
            lines.append(f"  {'of which tensors':<40} {self.tensors / GiB:9.3f} GiB")
        if self.activations.get("per_block"):
            lines.append(f"  (activations: {self.activations['per_block'] / 2**20:.1f} MiB saved per block, "
                         f"{self.activations['blocks']} blocks on this rank)")
        if self.device_bytes:
            lines.append(f"  available: {self.device_bytes / GiB:.3f} GiB per rank")
        return "\n".join(lines)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _WeightCasts(TorchDispatchMode):
    """Notes the copies autocast makes of parameters (``_to_copy`` of a parameter's storage): they
    are the bf16 weight copies, one row of their own, not activations of the block that saved them."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params
        self.copies: dict[int, str] = {}  # copy's storage -> parameter name

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and torch.is_tensor(args[0]):
            name = self.params.get(_storage_key(args[0]))
            if name is not None:
                self.copies[_storage_key(out)] = name
        return out


def _traced_model(fake: bool, bf16: bool) -> tuple[Any, Callable[[], Any]]:
    """(tensor mode, autocast) for the profile. Fake CPU tensors by default: autocast acts on them
    (not on meta ones), so under bf16 saved tensors come out at the dtypes it produces, and
    attention takes the fused kernel a CPU or GPU run takes (on meta it decomposes into the math
    path, which saves the whole score matrix). The autocast policy is the CPU one (CUDA's also keeps
    norms and softmax in fp32). ``fake`` False: meta, fp32 sizes (the fallback, an upper bound)."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if fake and bf16 else contextlib.nullcontext
    return (_fake_build() if fake else torch.device("meta")), autocast


@contextlib.contextmanager
def _fake_build() -> Any:
    """Fake CPU tensors; ``trunc_normal_`` (rejection sampling: it reads values) does nothing, as on
    meta: no value is ever read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    own = torch.nn.init.trunc_normal_
    torch.nn.init.trunc_normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        torch.nn.init.trunc_normal_ = own


def profile_activations(run: RunSpec, micro_batch: int) -> ActivationProfile:
    """Saved-tensor bytes of one forward on fake CPU tensors (under autocast for bf16; on ``meta``
    where they cannot run it), attributed to the block that saved them."""
    family = run.family
    if family.example_batch is None:
        raise ConfigError(f"model.family={family.name} declares no example_batch: its activations cannot be profiled")
    try:
        return _profile_in(run, micro_batch, True)
    except Exception as exc:  # an op the fake tensors cannot run (a value read): meta, fp32 sizes, an upper bound
        log.warning("activations not traced on fake tensors (%s: %s): counted on meta, at fp32 size",
                    type(exc).__name__, exc)
    return _profile_in(run, micro_batch, False)


def _profile_in(run: RunSpec, micro_batch: int, fake: bool) -> ActivationProfile:
    from bigtrain.recipes import build_model, make_task

    cfg, family = run.cfg, run.family
    live_teacher = run.uses_teacher and not cfg.distill.logits
    mode, autocast = _traced_model(fake, cfg.train.dtype == "bfloat16")
    with mode:
        model = build_model(run)
        teacher = build_model(run, "teacher").eval().requires_grad_(False) if live_teacher else None
        model.train()
        task = make_task(run, model, teacher)
        batch = {k: torch.empty_like(v, device="cpu" if fake else "meta") if torch.is_tensor(v)
                 else v for k, v in family.example_batch(cfg.model, micro_batch, torch.Generator().manual_seed(0)).items()}
        if cfg.distill.logits:  # the stored targets' fields, as the loader adds them
            from data_pipeline.logits import read_meta

            stored = read_meta(cfg.distill.logits)
            shape = (micro_batch, stored.items, stored.top_k)
            batch.update(t_val=torch.zeros(shape), t_idx=torch.zeros(shape, dtype=torch.long), t_lse=torch.zeros(shape[:2]))
        return _profile(model, task, batch, autocast, micro_batch)


def _profile(model: nn.Module, task: nn.Module, batch: dict[str, Any], autocast: Callable[[], Any],
             micro_batch: int) -> ActivationProfile:
    params = {_storage_key(p): n for n, p in model.named_parameters()}
    skip = set(params) | {_storage_key(t) for t in model.buffers()}
    skip |= {_storage_key(v) for v in batch.values() if torch.is_tensor(v)}
    blocks = dict(model.blocks.items()) if hasattr(model, "blocks") else {}
    current: list[str] = []
    saved: dict[str, dict[int, tuple[int, int]]] = {}  # block ('' = outside) -> storage -> (bytes, last dim)
    inputs: dict[str, int] = {}
    hidden: dict[str, int] = {}
    casts = _WeightCasts(params)

    def pre(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            current.append(name)
            x = args[0] if args and torch.is_tensor(args[0]) else None
            if x is not None:
                inputs[name] = x.numel() * x.element_size()
                hidden[name] = x.shape[-1]
        return hook

    def post(_m: nn.Module, _args: Any, _out: Any) -> None:
        current.pop()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in skip and key not in casts.copies:
            saved.setdefault(current[-1] if current else "", {})[key] = (t.untyped_storage().nbytes(), t.shape[-1] if t.ndim else 0)
        return t

    handles = [h for name, b in blocks.items() for h in (b.register_forward_pre_hook(pre(name)), b.register_forward_hook(post))]
    try:
        with saved_tensors_hooks(pack, lambda t: t), autocast(), casts:
            task(batch)
    finally:
        for h in handles:
            h.remove()
    per_block = {name: sum(b for b, _ in saved.get(name, {}).values()) for name in blocks}
    largest = max(per_block, key=per_block.get) if per_block else ""
    hidden_bytes = sum(b for b, d in saved.get(largest, {}).values() if d == hidden.get(largest))
    return ActivationProfile(micro_batch, per_block.get(largest, 0), hidden_bytes, inputs.get(largest, 0),
                             sum(b for b, _ in saved.get("", {}).values()), len(blocks),
                             cast_params=sorted(set(casts.copies.values())))


def _block_params(model: nn.Module) -> set[int]:
    """The parameters inside ``model.blocks`` (by identity: a family may name its container otherwise)."""
    blocks = getattr(model, "blocks", None)
    return {id(p) for p in blocks.parameters()} if isinstance(blocks, nn.Module) else set()


def _local_numel(p: torch.Tensor, block_params: set[int], dp: int, tp: int, fsdp: bool) -> tuple[int, ...]:
    shape = list(p.shape)
    if tp > 1 and p.ndim >= 2 and id(p) in block_params:
        shape[0] = math.ceil(shape[0] / tp)  # colwise or rowwise: the element count is what matters
    if fsdp and dp > 1 and shape:
        shape[0] = math.ceil(shape[0] / dp)
    return tuple(shape)


def _stage_model(run: RunSpec, pp: int) -> tuple[nn.Module, int]:
    """The meta model of the pipeline rank holding the most parameters — all its stages (interleaved and
    ZBV schedules give a rank several) — and its block count; the whole model when pp == 1."""
    from bigtrain.distributed.pipeline import rank_stage_ids, split_blocks, stages_per_rank
    from bigtrain.recipes import build_model

    cfg = run.cfg
    with torch.device("meta"):
        full = build_model(run)
    if pp == 1:
        return full, len(getattr(full, "blocks", []))
    v = stages_per_rank(cfg.parallel)
    layout = split_blocks(list(full.blocks.keys()), pp * v, cfg.parallel.pp_split)
    best, best_n, best_blocks = full, -1, 0
    for rank in range(pp):
        ids = rank_stage_ids(rank, pp, v, cfg.parallel.pp_schedule)
        keep = [name for i in ids for name in layout[i]]
        with torch.device("meta"):
            stage = build_model(run)
        stage.prune_for_stage(keep, 0 in ids, pp * v - 1 in ids)
        n = sum(p.numel() for p in stage.parameters())
        if n > best_n:
            best, best_n, best_blocks = stage, n, len(keep)
    return best, best_blocks


def estimate(cfg: Config, world_size: int, device: str = "cpu") -> MemoryEstimate:
    """The per-rank estimate of ``cfg`` on ``world_size`` processes (see the module docstring)."""
    pp, dp, tp = infer_degrees(cfg.parallel, world_size)
    zero = cfg.parallel.zero
    fsdp = zero >= 2 and (dp > 1 or world_size == 1)  # as ParallelState.uses_fsdp
    plan = plan_batches(cfg, dp, pp)
    spec = get_optimizer(cfg.optim.name)
    t0 = time.perf_counter()
    run = RunSpec.of(cfg)
    model, nblocks = _stage_model(run, pp)
    # the two slow parts (seconds each for a billion-parameter model) say what they are doing
    log.info("memory estimate: %s built on meta in %.1f s (%.3g parameters); profiling activations (micro-batch %d)",
             cfg.model.family, time.perf_counter() - t0, sum(p.numel() for p in model.parameters()), plan.micro)
    family = run.family
    if family.check_layout is not None:  # what train would refuse for this tp, before any number
        family.check_layout(model, cfg, tp)
    elif tp > 1 and family.parallelize is None:
        raise ConfigError(f"model.family={cfg.model.family} has no tensor-parallel plan: parallel.tp must be 1 (got {tp})")
    block_params = _block_params(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    local = {n: _local_numel(p, block_params, dp, tp, fsdp) for n, p in model.named_parameters()}
    params = sum(4 * math.prod(s) for s in local.values())
    grads = sum(4 * math.prod(local[n]) for n, _ in trainable)
    state = {n: spec.state_bytes(tuple(p.shape), local[n], cfg.optim) for n, p in trainable}
    opt = _zero1_share(state, dp) if zero == 1 and dp > 1 else sum(state.values())
    rows = {"parameters (fp32)": params, "gradients (fp32)": grads, f"optimizer state ({cfg.optim.name})": opt}
    if zero <= 1 and dp > 1:
        # OverlappedAllReduce flattens each bucket of gradients into its own buffer and keeps all of
        # them until the last one is reduced: a second copy of the gradients (DDP avoids it with
        # gradient_as_bucket_view; bigtrain does not yet)
        rows["gradient all-reduce buckets"] = grads
    param_bytes = 2 if cfg.train.dtype == "bfloat16" and fsdp else 4
    blocks = getattr(model, "blocks", None)
    unit = max((sum(p.numel() for p in b.parameters()) // tp for b in blocks.values()), default=0) if blocks is not None else 0
    if fsdp:
        if zero == 3:
            rows["FSDP all-gather buffers"] = unit * param_bytes * 2 + unit * 4
        else:
            rows["FSDP unsharded blocks (ZeRO-2)"] = unit * nblocks * param_bytes + unit * 4
    t0 = time.perf_counter()
    try:
        prof = profile_activations(run, plan.micro)
        log.info("memory estimate: activations profiled in %.1f s", time.perf_counter() - t0)
    except Exception as exc:  # a family without an example batch, or an op with no meta kernel
        log.warning("activations not estimated (%s: %s): the estimate is a lower bound", type(exc).__name__, exc)
        prof = ActivationProfile(plan.micro, 0, 0, 0, 0, nblocks)
    if cfg.train.dtype == "bfloat16" and not fsdp:
        # autocast caches a bf16 copy of each weight it casts until the forward ends (and autograd
        # keeps them to the backward without checkpointing); FSDP's mixed precision gathers bf16
        # parameters instead, already counted in its buffers
        rows["autocast weight copies (bf16)"] = sum(2 * math.prod(local[n]) for n in prof.cast_params if n in local)
    passes = plan.accum_steps if pp == 1 else plan.pipeline_microbatches
    if fsdp and passes > 1:
        # no reduce-scatter before the last pass: FSDP2 accumulates unsharded fp32 gradients (its
        # reduce dtype) of every block of the rank until then
        rows["FSDP unsharded gradients (accumulation)"] = sum(
            4 * math.prod(_local_numel(p, block_params, dp, tp, False)) for _, p in trainable)
    act, act_info = _activations(cfg, prof, nblocks, tp, pp, plan)
    rows["activations"] = act
    if cfg.ema.decay > 0:
        rows["EMA shadow (fp32)"] = params
    if getattr(cfg.teacher, "family", "") and not cfg.distill.logits:  # stored logits: no teacher is built
        from bigtrain.recipes import build_model

        with torch.device("meta"):
            teacher = build_model(run, "teacher")
        t_blocks = _block_params(teacher)
        rows["teacher parameters"] = sum(math.prod(_local_numel(p, t_blocks, dp, tp, cfg.distill.shard_teacher))
                                         * param_bytes for p in teacher.parameters())
    largest = max((math.prod(s) for s in local.values()), default=0)
    rows["optimizer step working set"] = 3 * 4 * largest
    if cfg.checkpoint.async_save and device == "cpu":  # on CUDA the copy is in (pinned) host memory
        rows["async-save host copy"] = params + opt + rows.get("EMA shadow (fp32)", 0)
    if device == "cuda":
        rows[ALLOCATOR_ROW] = int(ALLOCATOR_RESERVE * sum(rows.values()))
        groups = sum(n > 1 for n in (dp, tp, pp))
        if groups:
            rows[NCCL_ROW] = groups * NCCL_PER_GROUP
    rows[BASELINE_ROW] = CUDA_BASELINE if device == "cuda" else CPU_BASELINE
    return MemoryEstimate(world_size, {"pp": pp, "dp": dp, "tp": tp, "zero": zero}, rows, act_info)


def _zero1_share(state: dict[str, int], dp: int) -> int:
    """The most loaded dp rank under bigtrain's ZeRO-1 partition (greedy by size, as DataParallel)."""
    if len(state) <= dp:  # every tensor lands on an empty rank (the greedy rule's first picks)
        return max(state.values(), default=0)
    import heapq

    load = [(0, k) for k in range(dp)]  # (load, rank): the least loaded, lowest rank first, as the greedy rule
    for n in sorted(state, key=lambda k: -state[k]):
        bytes_, rank = heapq.heappop(load)
        heapq.heappush(load, (bytes_ + state[n], rank))
    return max(b for b, _ in load)


def _activations(cfg: Config, prof: ActivationProfile, nblocks: int, tp: int, pp: int, plan: Any) -> tuple[int, dict[str, Any]]:
    sp = cfg.parallel.sequence_parallel and tp > 1
    if tp > 1:  # hidden-width tensors (norm outputs, residual inputs) are replicated without SP
        block = (prof.block_saved - prof.block_hidden) // tp + (prof.block_hidden // tp if sp else prof.block_hidden)
        block_input = prof.block_input // tp if sp else prof.block_input
    else:
        block, block_input = prof.block_saved, prof.block_input
    ac = cfg.parallel.activation_checkpointing
    if ac == "full":
        kept = nblocks * block_input + block
    elif ac == "selective":
        every = cfg.parallel.ac_every
        checkpointed = nblocks // every
        kept = checkpointed * block_input + (nblocks - checkpointed) * block + block
    else:
        kept = nblocks * block
    in_flight = min(pp, plan.pipeline_microbatches) if pp > 1 else 1  # 1F1B: the first stage holds pp micro-batches
    total = (kept + prof.outside) * in_flight + block  # + one block's activation gradients in backward
    return total, {"micro_batch": prof.micro_batch, "per_block": block, "blocks": nblocks, "checkpointing": ac,
                   "outside_blocks": prof.outside, "in_flight": in_flight}


def release_freed_host_memory(threshold_mb: float = 4.0) -> bool:
    """Make glibc return freed large blocks to the OS (Linux): by default its mmap threshold grows
    to the largest block freed so far (up to 32 MiB), after which same-sized temporaries — a
    gradient's square in the optimizer, an activation's gradient — come from the heap and stay
    resident after they are freed. Measured on ViT-G/14 cut to 8 blocks, one optimizer step:
    +0.72 GiB of RSS kept that way, 0 with a fixed 4 MiB threshold; the price is a page fault per
    page of every larger allocation (docs/memory.md). A user's own MALLOC_MMAP_THRESHOLD_ wins.
    Returns whether the threshold was set."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_mb * 2**20)))  # M_MMAP_THRESHOLD (also fixes the trim threshold)
    except (OSError, AttributeError):  # not glibc (musl): keep the C library's behaviour
        log.debug("mallopt unavailable; host memory release left to the C library")
        return False


def prepare_memory(cfg: Config, world_size: int, local_world_size: int, device: torch.device,
                   refuse: bool = True) -> MemoryEstimate | None:
    """Before any allocation: estimate (train.memory_check / host_memory_release=auto), refuse a run
    that cannot fit (``refuse``: training runs), and release freed host memory where memory is tight. The rule for ``auto``:
    below half of the memory per rank, even the allocator's retention (at most 29% over the fixed-
    threshold peak, measured) leaves the run far from an OOM, and small models keep their faster steps."""
    mode = cfg.train.host_memory_release
    check = refuse and cfg.train.memory_check
    need = check or (mode == "auto" and device.type == "cpu")
    est = None
    if need:
        try:
            est = estimate(cfg, world_size, device.type)
        except ConfigError:
            raise  # the config itself is wrong: the run would fail the same way a moment later
        except Exception as exc:  # a model the estimator cannot walk must not stop a run that may fit
            log.warning("memory estimate failed (%s: %s): memory not checked", type(exc).__name__, exc)
            return None
        est.device_bytes = device_memory(device, local_world_size)
        if check and est.total > est.device_bytes:
            raise ConfigError(fits_message(est))
    if releases_host_memory(mode, est, device):
        release_freed_host_memory()
    return est


def releases_host_memory(mode: str, est: MemoryEstimate | None, device: torch.device) -> bool:
    """train.host_memory_release: on, off, or auto = a CPU run whose estimate exceeds half of its memory."""
    tight = est is not None and device.type == "cpu" and est.total > est.device_bytes / 2
    return mode == "on" or (mode == "auto" and tight)


def device_memory(device: torch.device, local_world_size: int) -> int:
    """What one rank may use: the GPU's memory, or host RAM divided by the ranks on this node."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages // max(local_world_size, 1)


def fits_message(est: MemoryEstimate) -> str:
    biggest = sorted(est.rows, key=est.rows.get, reverse=True)[:3]
    return (f"estimated {est.total / GiB:.1f} GiB per rank exceeds the {est.device_bytes / GiB:.1f} GiB available "
            f"(largest: {', '.join(f'{k} {est.rows[k] / GiB:.1f} GiB' for k in biggest)}); reduce it with "
            "parallel.zero=3, more ranks, parallel.activation_checkpointing=full, a smaller train.micro_batch_size "
            "or optim.name=factored/adamw8bit — or set train.memory_check=false to try anyway "
            "(`bigtrain estimate` shows every row)")

"""The one object that owns the process group and the ``(pp, dp, tp)`` DeviceMesh.

Everything parallel asks this object for its groups and ranks; there are no
process-group globals elsewhere. Degrees are validated against the world size
(and the model / batch shapes) before any model is built.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bigtrain.config import ConfigError
from bigtrain.config.schema import ParallelConfig

log = logging.getLogger(__name__)


@dataclass
class LaunchEnv:
    """Rank / world / rendezvous as given by torchrun, Slurm (srun) or nothing (one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @classmethod
    def detect(cls, environ: dict[str, str] | None = None) -> LaunchEnv:
        env = dict(os.environ if environ is None else environ)
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.run
            return cls(
                int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun",
            )
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per rank
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
            job = int(env.get("SLURM_JOB_ID", "0"))
            return cls(
                int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                env.get("MASTER_ADDR") or first_host(nodes),
                int(env.get("MASTER_PORT") or 20000 + job % 20000),  # per-job port: jobs sharing a node don't collide
                "slurm",
            )
        return cls()


def pick_device(cfg: ParallelConfig, env: LaunchEnv) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is wanted and present (made this process's current device), else cpu."""
    available = torch.cuda.is_available()
    if cfg.device == "cuda" and not available:
        raise ConfigError("config key 'parallel.device' is cuda but no CUDA device is available")
    if cfg.device == "cpu" or not available:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    # One visible device: Slurm (--gpus-per-task, --gpu-bind) or the user bound a GPU to each rank.
    index = env.local_rank if count > 1 else 0
    if index >= count:
        raise ConfigError(f"local rank {env.local_rank} has no CUDA device (this node has {count} visible)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist (``node[01-04],gpu7`` -> ``node01``); scontrol if available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^(.*)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def infer_degrees(cfg: ParallelConfig, world_size: int) -> tuple[int, int, int]:
    """(pp, dp, tp) with unset (0) degrees inferred.

    Exactly one unset degree is inferred as world / (product of the others);
    with more than one unset, tp and pp default to 1 and dp takes the rest.
    """
    degrees = {"pp": cfg.pp, "dp": cfg.dp, "tp": cfg.tp}
    unset = [k for k, v in degrees.items() if v == 0]
    if len(unset) > 1:
        for k in ("tp", "pp"):
            if degrees[k] == 0:
                degrees[k] = 1
        unset = [k for k, v in degrees.items() if v == 0]
    if unset:
        known = 1
        for v in degrees.values():
            known *= v or 1
        if world_size % known:
            others = " x ".join(f"{k}={v}" for k, v in degrees.items() if v)
            raise ConfigError(
                f"cannot infer parallel.{unset[0]}: {others} = {known} does not divide the world size {world_size}"
            )
        degrees[unset[0]] = world_size // known
    pp, dp, tp = degrees["pp"], degrees["dp"], degrees["tp"]
    if pp * dp * tp != world_size:
        raise ConfigError(
            f"parallel layout pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp} processes, but the world size is "
            f"{world_size} (set parallel.dp/tp/pp so that their product equals the number of processes)"
        )
    return pp, dp, tp


@dataclass
class ParallelState:
    """Owns the mesh. Single process: every degree 1 and no process group at all."""

    cfg: ParallelConfig
    env: LaunchEnv
    pp: int = 1
    dp: int = 1
    tp: int = 1
    mesh: DeviceMesh | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _side_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @classmethod
    def create(cls, cfg: ParallelConfig, env: LaunchEnv | None = None) -> ParallelState:
        """Validate degrees first (cheap, clear errors), then initialise the process group and mesh."""
        env = env or LaunchEnv.detect()
        pp, dp, tp = infer_degrees(cfg, env.world_size)
        state = cls(cfg, env, pp, dp, tp, device=pick_device(cfg, env))
        # ZeRO-2/3 in one process: FSDP2 over a 1-rank mesh (legal in torch; what a one-GPU check of
        # the FSDP + DCP paths needs) instead of silently training unsharded
        if env.world_size > 1 or cfg.zero >= 2:
            state._init_process_group()
            state.mesh = init_device_mesh(state.device.type, (pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        return state

    def _init_process_group(self) -> None:
        cuda = self.device.type == "cuda"
        backend = self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        if backend == "nccl" and not cuda:
            raise ConfigError("config key 'parallel.backend' is nccl but this process trains on the CPU "
                              "(parallel.device / no CUDA device)")
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", self.env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(self.env.master_port))
            # device_id binds the process to its GPU and creates NCCL's communicator now (eagerly), not at
            # the first collective, where a slow or failing NCCL start would look like a hung step
            alone = {"store": dist.HashStore()} if self.env.world_size == 1 else {}  # no port for a 1-rank group
            dist.init_process_group(
                backend, rank=self.env.rank, world_size=self.env.world_size,
                timeout=timedelta(seconds=self.cfg.timeout_s),
                **({"device_id": self.device} if backend == "nccl" else {}), **alone,
            )
        log.info("process group: %s, %d ranks (%s), layout pp%d x dp%d x tp%d",
                 backend, self.env.world_size, self.env.source, self.pp, self.dp, self.tp)

    # --- coordinates ----------------------------------------------------------------
    def _local(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(dim)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def dp_rank(self) -> int:
        return self._local("dp")

    @property
    def tp_rank(self) -> int:
        return self._local("tp")

    @property
    def pp_rank(self) -> int:
        return self._local("pp")

    def uses_fsdp(self, zero: int) -> bool:
        """Whether ZeRO stage ``zero`` shards with FSDP2 here: over dp > 1 ranks, or over the one
        rank of a single-process run (see ``create``)."""
        return zero >= 2 and self.mesh is not None and (self.dp > 1 or self.world_size == 1)

    def submesh(self, *dims: str) -> DeviceMesh | None:
        if self.mesh is None:
            return None
        return self.mesh[dims if len(dims) > 1 else dims[0]]

    def group(self, dim: str) -> dist.ProcessGroup | None:
        return None if self.mesh is None else self.mesh.get_group(dim)

    def barrier(self) -> None:
        if self.mesh is not None:
            dist.barrier()

    def side_group(self) -> dist.ProcessGroup | None:
        """A second all-ranks gloo group, for work on a background thread (asynchronous
        checkpoint writes) that must not interleave with the training collectives."""
        if self.mesh is None:
            return None
        if self._side_group is None:
            self._side_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.cfg.timeout_s))
        return self._side_group

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def destroy(self, together: bool = False) -> None:
        """Tear the process groups down. ``together`` (a run that ended normally): every rank first
        waits for the others (rank 0 may still be writing results), so no rank exits while a peer
        still talks to it; a failing run leaves at once (its peers may be stuck elsewhere)."""
        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()

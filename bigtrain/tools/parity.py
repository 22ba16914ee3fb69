"""Layout parity harness: train one config under several parallel layouts and compare.

``python -m bigtrain.tools.parity --config C --layouts '[["parallel.zero=1"], ...]' --out R.json``
run under ``torchrun --nproc_per_node=N`` trains every layout (all using the same
N processes, one process group) and writes, per layout, the losses and the full
(unsharded) final parameters' distance to a single-process reference trained
first by the same command with ``--reference REF.pt`` and no torchrun.

Used by the parity tests and handy for users checking their own layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from bigtrain.config import load_config
from bigtrain.config.core import help_text
from bigtrain.distributed.mesh import LaunchEnv, ParallelState


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters (gathered from FSDP/TP shards) as plain CPU tensors."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    local = {k: v.detach().clone() for k, v in full.items()}
    if not dist.is_initialized():
        return local
    parts: list = [None] * dist.get_world_size()  # pipeline stages hold different keys: union them
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def full_ema(trainer: object) -> dict[str, torch.Tensor]:
    """The EMA component's shadow weights, unsharded (empty without an EMA)."""
    from torch.distributed.tensor import DTensor

    ema = next((c for c in getattr(trainer, "components", []) if c.name == "ema"), None)
    if ema is None:
        return {}
    local = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in ema.shadow.items()}
    if not dist.is_initialized():
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def train_once(config: str, overrides: list[str]) -> dict:
    """Train; return per-step losses and gradient norms, initial and final full parameters."""
    from bigtrain.run import prepare_run

    cfg = load_config(config, overrides)
    ps = ParallelState.create(cfg.parallel, LaunchEnv.detect())  # the process group outlives each layout
    prepared = prepare_run(cfg, ps)
    trainer, metrics = prepared.trainer, prepared.metrics
    assert metrics is not None
    trainer.evaluator = None
    run: dict = {"losses": [], "grad_norms": [], "rank": ps.rank}
    log = metrics.log

    def capture(record: dict) -> None:
        if record.get("kind") == "train":  # every rank sees the same (reduced) values
            run["losses"].append(float(record["loss"]))
            run["grad_norms"].append(float(record["grad_norm"]))
        log(record)

    metrics.log = capture  # type: ignore[method-assign]
    run["initial"] = full_params(trainer.model)
    trainer.fit(metrics)
    metrics.close()
    run["params"] = full_params(trainer.model)
    run["ema"] = full_ema(trainer)
    return run


def compare(ref: dict, run: dict) -> dict:
    """Loss and gradient-norm differences per step, and how far the final parameters are from the reference's.

    ``param_update_rel_diff`` = ||P - P_ref|| / ||P_ref - P_0|| over all parameters:
    the parameter difference relative to how far training moved them. (Per-tensor
    relative errors mislead where a tensor barely moves.) ``param_rel_diff`` = ||P - P_ref|| / ||P_ref||.
    """
    losses, initial, params = run["losses"], run["initial"], run["params"]

    def rel(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))

    keys = sorted(ref["params"])
    diff = sum(float((params[k] - ref["params"][k]).double().pow(2).sum()) for k in keys if k in params) ** 0.5
    moved = sum(float((ref["params"][k] - ref["initial"][k]).double().pow(2).sum()) for k in keys) ** 0.5
    norm = sum(float(ref["params"][k].double().pow(2).sum()) for k in keys) ** 0.5
    per_key = {k: float((params[k] - ref["params"][k]).norm()) for k in keys if k in params}
    worst = sorted(per_key, key=per_key.get, reverse=True)[:3]
    return {
        "steps": len(losses), "ref_steps": len(ref["losses"]), "losses": losses, "same_keys": keys == sorted(params),
        "max_loss_rel_diff": rel(losses, ref["losses"]),
        "max_grad_norm_rel_diff": rel(run["grad_norms"], ref["grad_norms"]),
        "initial_param_max_abs_diff": max(float((initial[k] - ref["initial"][k]).abs().max()) for k in keys if k in initial),
        "max_param_abs_diff": max(per_key.values()),
        "param_update_rel_diff": diff / max(moved, 1e-30),
        "param_rel_diff": diff / max(norm, 1e-30),
        "worst_tensors": {k: per_key[k] for k in worst},
        "missing_keys": sorted(set(keys) - set(params))[:5], "extra_keys": sorted(set(params) - set(keys))[:5],
        **_compare_ema(ref.get("ema") or {}, run.get("ema") or {}),
    }


def _compare_ema(ref: dict, ema: dict) -> dict:
    """How far the EMA weights are from the reference's EMA, relative to its distance from the
    reference's raw weights' start (``ema_rel_diff``), and whether every tensor is there."""
    if not ref:
        return {}
    keys = sorted(ref)
    diff = sum(float((ema[k] - ref[k]).double().pow(2).sum()) for k in keys if k in ema) ** 0.5
    norm = sum(float(ref[k].double().pow(2).sum()) for k in keys) ** 0.5
    return {"ema_same_keys": keys == sorted(ema), "ema_rel_diff": diff / max(norm, 1e-30),
            "ema_max_abs_diff": max((float((ema[k] - ref[k]).abs().max()) for k in keys if k in ema), default=float("inf"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--override", action="append", default=[], help="key=value applied to every run")
    ap.add_argument("--reference", help="write the single-process reference here (run without torchrun)")
    ap.add_argument("--against", help="reference file to compare layouts with")
    ap.add_argument("--layouts", default="[]", help="JSON list of override lists, one per layout")
    ap.add_argument("--out", help="JSON results (rank 0)")
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    if args.reference:
        run = train_once(args.config, [*args.override, f"run.dir={args.workdir}/reference"])
        torch.save({k: run[k] for k in ("losses", "grad_norms", "initial", "params", "ema")}, args.reference)
        return 0
    ref = torch.load(args.against, weights_only=True)
    results = {}
    for i, layout in enumerate(json.loads(args.layouts)):
        name = " ".join(layout) or "default"
        run = train_once(args.config, [*args.override, *layout, f"run.dir={args.workdir}/layout{i}"])
        if run["rank"] == 0:
            results[name] = compare(ref, run)
            print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'losses'})}", flush=True)
        dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    if args.out and int(os.environ.get("RANK", 0)) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

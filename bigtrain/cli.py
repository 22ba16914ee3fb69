"""``bigtrain`` command line: train, eval, data, config.

Exit codes (also in USAGE): 0 success; 1 crash (a bug: traceback); 2 bad input (config, data,
a checkpoint that is damaged, untrusted or does not fit) with a one-line reason; 3 training
diverged; 4 a checkpoint could not be saved; 5 the final evaluation failed after the final
checkpoint was committed; 75 stopped early after saving (time budget / preemption): resubmit
to continue.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

# Only torch-free modules at the top: `bigtrain --help`, `bigtrain config ...` and a bad config
# answer in a fraction of a second; each command imports what it runs.
from bigtrain.config import Config, ConfigError, describe, dump_yaml, load_config
from bigtrain.config.registry import lazy
from bigtrain.exits import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_EVAL_FAILED, EXIT_SAVE_FAILED, FinalEvalFailed
from bigtrain.optional import missing_optional

if TYPE_CHECKING:
    from bigtrain.distributed import ParallelState
    from bigtrain.trainer import Trainer

USAGE = """bigtrain <command> ...

commands:
  train CONFIG [key=value ...]    train (resumes from run.dir/checkpoints with resume=auto)
  eval CONFIG [key=value ...]     evaluate the checkpoint chosen by `resume` (default: latest in run.dir)
  data ...                        write/inspect webdataset shards (see `bigtrain data --help`)
  report RUN_DIR                  draw RUN_DIR/metrics.jsonl into RUN_DIR/report.png
  estimate CONFIG [key=value ...] [--world-size N] [--device cpu|cuda] [--json]
                                  memory per rank (parameters, gradients, optimizer state, activations,
                                  FSDP buffers, EMA/teacher, runtime) from the meta model, no allocation
  config describe [--family F]    list every config key with type, default and meaning
  families                        list the model families (presets, tasks, data sources, commands)
  bench [NAME [args]]             list / run the benchmarks families registered
  config show CONFIG [key=value]  print the resolved config
  export CKPT --format safetensors|hf --out PATH [--force] [--trust-family MODULE:ATTR]
                                  consolidate a sharded checkpoint into one model file (any world size)
  sample CKPT --out grid.png [--n 64 --steps 50 --cfg 1.5 --seed 0 --classifier CKPT] [--force]
                                  samples of a diffusion checkpoint (EMA weights by default) as a grid
  (outputs are written atomically and never replace a file or directory the command did not write
   unless --force; a checkpoint naming a module:ATTRIBUTE family needs --trust-family to be read)
  encode-latents CONFIG [key=value ...] --out DIR
                                  store a latent-diffusion config's VAE latents as shards (data.dir=DIR)
  distill-logits CONFIG [key=value ...] --out DIR [--top-k K]
                                  run a distillation config's teacher once, store its top-k logits for
                                  the student (distill.logits=DIR)
  NAME ...                        a subcommand a model family registered (see `bigtrain families`)

exit codes: 0 done, 1 crash, 2 bad input (config, data, or a checkpoint that is damaged,
untrusted or does not fit this run), 3 training diverged (numerical guard gave up),
4 a checkpoint could not be saved (disk full, permissions; the previous one is intact),
5 final evaluation failed (the trained state was saved first), 75 stopped early after
saving (preemption signal or train.max_minutes): resubmit the same command to continue.
"""


def _split_args(argv: list[str], cmd: str) -> tuple[str, list[str]]:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: bigtrain {cmd} CONFIG [key=value ...]")
        raise SystemExit(0 if argv else EXIT_BAD_INPUT)
    return argv[0], argv[1:]


def check_before_work(cfg: Config) -> None:
    """What ``train`` checks beyond the config itself before any work, in one process (also run by
    the launchers before anything is submitted): the optimizer exists, and a checkpoint named by
    ``resume=`` / ``init=`` is complete, intact and (resume) fits the run."""
    from bigtrain.checkpoint import check_loadable
    from bigtrain.checkpoint.manager import check_resume_config
    from bigtrain.optim import get_optimizer

    get_optimizer(cfg.optim.name)  # the layout is checked against its capabilities once the degrees are known
    for key, ckpt in (("resume", cfg.resume), ("init", cfg.init)):  # a named checkpoint that cannot load fails now
        if ckpt and ckpt not in ("auto", "never"):
            _checked(key, ckpt, check_loadable)
    if cfg.resume not in ("auto", "never"):
        _checked("resume", cfg.resume, lambda p: check_resume_config(p, dump_yaml(cfg), cfg.resume_allow_changes))


def cmd_train(argv: list[str]) -> int:
    from bigtrain.distributed import ParallelState
    from bigtrain.resilience import settle

    path, overrides = _split_args(argv, "train")
    cfg = load_config(path, overrides)  # all validation happens before any work
    check_before_work(cfg)
    ps = ParallelState.create(cfg.parallel)  # validates the layout before initialising anything
    ended = False
    try:
        status = _train(cfg, ps)
        ended = True
        settle(status, [*cfg.train.preempt_signals, "SIGTERM"])
        return status
    finally:
        ps.destroy(together=ended)


def _checked(key: str, path: str, check: Callable[[str], object]) -> None:
    from bigtrain.checkpoint import CheckpointError

    try:
        check(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{key}={path}: {exc}") from None


def _train(cfg: Config, ps: ParallelState) -> int:
    from bigtrain.run import prepare_run

    run = prepare_run(cfg, ps)
    assert run.metrics is not None
    try:
        status = run.trainer.fit(run.metrics)
    except FinalEvalFailed:
        _write_results(cfg, run.trainer, EXIT_EVAL_FAILED, ps.rank)
        raise
    finally:
        run.close()
    _write_results(cfg, run.trainer, status, ps.rank)
    return status


def _write_results(cfg: Config, trainer: Trainer, status: int, rank: int) -> None:
    if rank == 0:
        summary = {"step": trainer.state.step, "status": status, "train_seconds": round(trainer.state.train_seconds, 2)}
        summary.update(trainer.last_eval)
        with open(os.path.join(cfg.run.dir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        from bigtrain.report import make_report

        make_report(cfg.run.dir)
        print(json.dumps(summary))


def cmd_eval(argv: list[str]) -> int:
    from bigtrain.checkpoint import CheckpointError
    from bigtrain.run import prepare_run

    path, overrides = _split_args(argv, "eval")
    cfg = load_config(path, overrides)
    run = prepare_run(cfg, training=False)
    trainer, ps = run.trainer, run.ps
    ck = trainer.checkpointer
    ckpt = ck.agreed(ck.latest) if cfg.resume in ("auto", "never") else ck.resolve(cfg.resume)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint in {cfg.run.dir}/checkpoints to evaluate (set resume=PATH)")
    ck.load(ckpt, {"model": trainer.stateful()["model"]})  # verified first; a damaged one exits 2
    results = {"checkpoint": ckpt, **trainer.evaluate()}
    if ps.rank == 0:
        print(json.dumps(results))
    ps.destroy(together=True)
    return 0


def cmd_config(argv: list[str]) -> int:
    from bigtrain.config import Config
    from bigtrain.families import all_families, get_family

    if argv[:1] == ["describe"]:
        only = argv[argv.index("--family") + 1] if "--family" in argv[:-1] else None
        families = [get_family(only)] if only else all_families()
        sections = [("", describe(Config))] + [
            (f"\n# model.* keys of model.family={f.name} (also teacher.* when teacher.family={f.name})",
             [row for row in describe(f.config, "model.") if row[0] not in ("model.family",)]) for f in families]
        for header, rows in sections:
            if header:
                print(header)
            for key, tp, default, help_ in rows:
                print(f"{key:32s} {tp:28s} default={default!r}\n    {help_}")
        return 0
    if argv[:1] == ["show"] and len(argv) >= 2:
        print(dump_yaml(load_config(argv[1], argv[2:])), end="")
        return 0
    print("usage: bigtrain config describe [--family F] | bigtrain config show CONFIG [key=value ...]")
    return EXIT_BAD_INPUT


MAX_WORLD = 2**20  # ranks: beyond any cluster; a typo would otherwise plan a billion ranks


def cmd_estimate(argv: list[str]) -> int:
    import argparse

    from bigtrain.memory import GiB, device_memory, estimate

    ap = argparse.ArgumentParser(prog="bigtrain estimate", description="Memory per rank of a training run, "
                                 "estimated from the meta model (nothing is allocated).")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--world-size", type=int, default=1, help="processes of the run (parallel.dp/tp/pp divide it)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the ranks train")
    ap.add_argument("--ranks-per-node", type=int, default=0,
                    help="cpu: ranks sharing this host's RAM for the fits/does-not-fit line (default: all)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_intermixed_args(argv)  # overrides may follow the options
    if not 1 <= args.world_size <= MAX_WORLD:
        raise ConfigError(f"--world-size must be between 1 and {MAX_WORLD:,} (got {args.world_size})")
    if args.ranks_per_node < 0:
        raise ConfigError(f"--ranks-per-node must be >= 0 (got {args.ranks_per_node})")
    from bigtrain.metrics import setup_logging

    setup_logging(0)  # the estimate's progress lines (building, profiling) on stderr
    est = estimate(load_config(args.config, args.overrides), args.world_size, args.device)
    cores = os.cpu_count() or 1
    unplaced = args.device == "cpu" and not args.ranks_per_node and args.world_size > cores
    if args.device == "cpu" and not unplaced:
        import torch

        est.device_bytes = device_memory(torch.device("cpu"), args.ranks_per_node or args.world_size)
    if args.json:
        print(json.dumps(est.to_json(), indent=1))
        return 0
    print(est.table())
    if est.device_bytes:
        verdict = "fits" if est.total <= est.device_bytes else "does NOT fit (bigtrain train refuses it)"
        print(f"  {verdict}: {est.total / GiB:.2f} of {est.device_bytes / GiB:.2f} GiB")
    elif unplaced:  # a cluster config: this host's RAM split 64 ways says nothing about it
        print(f"  not compared: {args.world_size} ranks cannot all run on this {cores}-core host; pass "
              "--ranks-per-node N (CPU ranks per host) or --device cuda (compared with a GPU when one is here)")
    return 0


def cmd_families(argv: list[str]) -> int:
    from bigtrain.families import all_families

    for f in all_families():
        print(f"{f.name}: {f.description}" if f.description else f.name)
        print(f"    presets: {', '.join(f.presets)}; tasks: {', '.join(f.tasks)} (default {f.default_task}); "
              f"data sources: {', '.join(f.data_sources) or 'none'}")
        print(f"    pipeline stages: {'yes' if f.pipeline else 'no'}; HF export: {'yes' if f.export_hf else 'no'}"
              + (f"; commands: {', '.join(f.commands)}" if f.commands else "")
              + (f"; benchmarks: {', '.join(f.benchmarks)}" if f.benchmarks else ""))
    return 0


# benchmarks of bigtrain's own that are commands (``bigtrain bench NAME``): name -> (module, what it checks);
# the rest of bigtrain/bench/ runs as ``python -m bigtrain.bench.NAME``
BUILTIN_BENCHMARKS = {"scalelong": ("bigtrain.bench.scalelong", "the ScaleLong recipe check (model.family=unet)")}


def cmd_bench(argv: list[str]) -> int:
    import importlib

    from bigtrain.families import all_families, find_command

    if not argv or argv[0] in ("-h", "--help"):
        for name, (_, what) in BUILTIN_BENCHMARKS.items():
            print(f"{name}  ({what})")
        for f in all_families():
            for name in f.benchmarks:
                print(f"{name}  (model.family={f.name})")
        return 0
    if argv[0] in BUILTIN_BENCHMARKS:
        return importlib.import_module(BUILTIN_BENCHMARKS[argv[0]][0]).main(argv[1:])
    run = find_command(argv[0], "benchmarks")
    if run is None:
        raise ConfigError(f"unknown benchmark {argv[0]!r} (`bigtrain bench` lists them)")
    return run(argv[1:])


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    ranks = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1"  # torchrun, or srun's tasks
    if int(ranks) > 1 and argv is None:
        # A multi-process run whose work is done (results, checkpoints and logs written, process
        # groups destroyed) leaves without interpreter finalization: under load, torch 2.13 +
        # gloo occasionally aborted there ("terminate called without an active exception", about
        # 1 run in 12 of a 2-rank asynchronous-save run), turning a finished run into a failure.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


# Errors that are the user's to fix, by where they are defined: (module, class, exit code, prefix).
# Looked up in sys.modules when an error arrives (a module never imported cannot have raised it),
# so the CLI imports none of them at start-up; the first match wins (a save error is a checkpoint error).
_USER_ERRORS = [
    ("bigtrain.checkpoint.manager", "CheckpointSaveError", EXIT_SAVE_FAILED, ""),
    ("bigtrain.exits", "FinalEvalFailed", EXIT_EVAL_FAILED, "final evaluation failed: "),
    ("bigtrain.exits", "TrainingDiverged", EXIT_DIVERGED, "training diverged: "),
    ("bigtrain.config.core", "ConfigError", EXIT_BAD_INPUT, ""),
    ("data_pipeline.index", "DataError", EXIT_BAD_INPUT, ""),
    ("bigtrain.checkpoint.integrity", "CheckpointError", EXIT_BAD_INPUT, ""),
    ("builtins", "FileNotFoundError", EXIT_BAD_INPUT, ""),
]


def exit_code_for(exc: BaseException, cmd: str = "") -> tuple[int, str] | None:
    """(exit code, one-line message) for an error the user can fix; None for a bug (traceback, exit 1)."""
    for module, name, code, prefix in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return code, f"error: {prefix}{exc}"
    missing = missing_optional(exc, f"bigtrain {cmd}" if cmd else "this")  # imported where a command uses it
    return (EXIT_BAD_INPUT, f"error: {missing}") if missing else None


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else EXIT_BAD_INPUT
    cmd, rest = argv[0], argv[1:]
    try:
        return _dispatch(cmd, rest)
    except Exception as exc:
        known = exit_code_for(exc, cmd)
        if known is None:
            raise
        print(known[1], file=sys.stderr)
        return known[0]


# Commands in their own modules, imported when run (``--help`` and ``config`` stay free of torch).
MODULE_COMMANDS = {"export": lazy("bigtrain.export:main"), "sample": lazy("bigtrain.sample:main"),
                   "encode-latents": lazy("bigtrain.encode_latents:main"),
                   "distill-logits": lazy("bigtrain.distill_logits:main")}


def cmd_report(argv: list[str]) -> int:
    from bigtrain.report import make_report

    if len(argv) != 1:
        raise ConfigError("usage: bigtrain report RUN_DIR")
    print(make_report(argv[0]))
    return 0


def cmd_data(argv: list[str]) -> int:
    from data_pipeline.cli import main as data_main

    return data_main(argv, prog="bigtrain data")


def _dispatch(cmd: str, rest: list[str]) -> int:
    local = {"train": cmd_train, "eval": cmd_eval, "config": cmd_config, "report": cmd_report, "data": cmd_data,
             "families": cmd_families, "estimate": cmd_estimate, "bench": cmd_bench}
    if cmd in local:
        return local[cmd](rest)
    if cmd in MODULE_COMMANDS:
        return MODULE_COMMANDS[cmd](rest)
    from bigtrain.families import find_command

    family_cmd = find_command(cmd)
    if family_cmd is not None:
        return family_cmd(rest)
    print(f"error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr, end="")
    return EXIT_BAD_INPUT

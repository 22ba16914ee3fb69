"""Where a single-process training step spends its time, and bigtrain's step vs plain PyTorch's.

``python -m bigtrain.bench.step_profile [--model vit|llama] [--steps 10]``

On the benchmark model of ``bigtrain.bench.parallel`` (one process, all cores, fp32):

* bigtrain's ``Trainer.train_step`` and a plain PyTorch step (same model, batches,
  AdamW groups, clipping) timed alternately in one process, so machine-speed drift
  hits both equally; medians printed;
* a ``torch.profiler`` breakdown of the plain step's self CPU time into GEMMs,
  GELU, attention and the rest;
* the tanh-approximate GELU against the exact (erf) GELU, forward + backward, on
  the MLP activation shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bigtrain.config.core import help_text

GROUPS = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "attention": ("scaled_dot_product",),
}


def _median_ms(fn: Callable[[], object], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    from bigtrain.bench.parallel import MODELS
    from bigtrain.config import load_config
    from bigtrain.optim import build_optimizer
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model, load_splits, make_task, train_dataset
    from bigtrain.run import prepare_run

    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="vit")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    config, common = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*common, f"data.dir={tmp}/data", f"run.dir={tmp}/run", "resume=never",
                                   f"train.steps={2 * args.steps + 10}", "schedule.warmup_steps=1",
                                   "schedule.cooldown_steps=0"])
        trainer = prepare_run(cfg, training=False).trainer
        run = RunSpec.of(cfg)
        model = build_model(run)
        task, optimizer = make_task(run, model), build_optimizer(model, cfg.optim)
        dataset = train_dataset(run, load_splits(cfg)[0])
        gbs, step = cfg.train.global_batch_size, [0]

        def plain() -> None:
            batch = dataset[list(range(step[0] * gbs, (step[0] + 1) * gbs))]
            step[0] += 1
            optimizer.zero_grad(set_to_none=True)
            task(batch)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            optimizer.step()

        ours, theirs = [], []
        for i in range(args.steps + 2):  # alternate, first two of each untimed
            a, b = _median_ms(trainer.train_step, 1), _median_ms(plain, 1)
            if i >= 2:
                ours.append(a)
                theirs.append(b)
        print(f"# {args.model}, one process, {torch.get_num_threads()} threads, global batch {gbs}, fp32")
        print(f"bigtrain train_step {statistics.median(ours):.1f} ms, plain PyTorch step {statistics.median(theirs):.1f} ms "
              f"(medians of {args.steps}, alternating): ratio {statistics.median(theirs) / statistics.median(ours):.2f}x")
        with torch.profiler.profile() as prof:
            for _ in range(3):
                plain()
        totals = {k: 0.0 for k in [*GROUPS, "other"]}
        for ev in prof.key_averages():
            group = next((g for g, names in GROUPS.items() if any(n in ev.key for n in names)), "other")
            totals[group] += ev.self_cpu_time_total
        whole = sum(totals.values())
        print("plain step, share of self CPU time: " + ", ".join(f"{k} {v / whole:.0%}" for k, v in totals.items()))
    m = cfg.model
    if hasattr(m, "patch_size") and getattr(m, "mlp_dim", 0):  # an image transformer: its MLP activation shape
        x = torch.randn(gbs * m.image_size**2 // m.patch_size**2, m.mlp_dim, requires_grad=True)
        g = torch.randn_like(x)
        for name, approx in (("tanh", "tanh"), ("erf", "none")):
            ms = _median_ms(lambda a=approx: F.gelu(x, approximate=a).backward(g), 20)
            print(f"GELU {name}: forward + backward on {tuple(x.shape)}: {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

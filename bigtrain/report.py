"""``bigtrain report RUN_DIR``: draw metrics.jsonl as a PNG (loss, LR, eval accuracy).

The sheet is headed by the run's name and its final numbers (step, training loss, the last
evaluation), so a picture pasted into a chat or a paper draft says what it shows; every panel
names its quantity and says when its axis is logarithmic, and the x axis is the step. Drawn with
Pillow (already a dependency) so a report never needs matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import yaml
from PIL import Image, ImageDraw

PANEL_W, PANEL_H, PAD, HEADER_H = 520, 312, 48, 40
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (is {run_dir} a bigtrain run directory?)")
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _short(key: str) -> str:
    """eval/fewshot_10shot_top1 -> fewshot_10shot; eval/top1 -> top1."""
    key = key.replace("eval/", "")
    return key if key == "top1" else key.replace("_top1", "")


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def draw_panel(title: str, series: dict[str, Sequence[tuple[float, float]]], log_y: bool = False) -> Image.Image:
    """One line chart; ``series`` maps a label to (x, y) points."""
    img = Image.new("RGB", (PANEL_W, PANEL_H), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, 8), f"{title} (log scale)" if log_y else title, fill="black")
    pts = [(x, y) for s in series.values() for x, y in s if isinstance(y, (int, float)) and math.isfinite(y)]
    if log_y:
        pts = [(x, y) for x, y in pts if y > 0]
    if not pts:
        d.text((PAD, PANEL_H // 2), "no data", fill="gray")
        return img
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(tf(p[1]) for p in pts), max(tf(p[1]) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    left, top, right, bottom = PAD, 28, PANEL_W - 12, PANEL_H - 40

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (tf(y) - y0) / (y1 - y0) * (bottom - top)

    d.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        label = _fmt(10**yv if log_y else yv)
        py = bottom - frac * (bottom - top)
        d.text((4, py - 6), label, fill="black")
        d.line([left, py, right, py], fill=(230, 230, 230))
    d.text((left, bottom + 4), _fmt(x0), fill="black")
    d.text((right - 40, bottom + 4), _fmt(x1), fill="black")
    d.text(((left + right) // 2 - 12, bottom + 4), "step", fill="black")
    legend_x = left  # legend on its own row under the axis: never over a curve
    for i, (name, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        line = [to_px(x, y) for x, y in s if isinstance(y, (int, float)) and math.isfinite(y) and (y > 0 or not log_y)]
        if len(line) > 1:
            d.line(line, fill=color, width=2)
        for px, py in line if len(line) <= 30 else []:
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        d.text((legend_x, bottom + 20), name, fill=color)
        legend_x += 6 * len(name) + 14
    return img


def _latest_samples(run_dir: str) -> Image.Image | None:
    """The newest sample grid, titled with its step and scaled to the sheet's width at most."""
    folder = os.path.join(run_dir, "samples")
    grids = sorted(f for f in os.listdir(folder) if f.startswith("step_") and f.endswith(".png")) \
        if os.path.isdir(folder) else []
    if not grids:
        return None
    img = Image.open(os.path.join(folder, grids[-1])).convert("RGB")
    scale = min(1.0, 2 * PANEL_W / img.width)
    img = img.resize((int(img.width * scale), int(img.height * scale)), Image.NEAREST)
    framed = Image.new("RGB", (img.width, img.height + 20), "white")
    ImageDraw.Draw(framed).text((4, 4), f"samples at step {int(grids[-1][5:-4])}", fill="black")
    framed.paste(img, (0, 20))
    return framed


def _run_name(run_dir: str) -> tuple[str, int | None]:
    """The run's name (``run.name``, else the directory's name) and its ``train.steps``, from the
    run's resolved config.yaml when it is readable."""
    name, steps = os.path.basename(os.path.abspath(run_dir)), None
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
        name = (cfg.get("run") or {}).get("name") or name
        steps = (cfg.get("train") or {}).get("steps")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        pass
    return name, steps if isinstance(steps, int) else None


def summary_lines(run_dir: str, train: list[dict], evals: list[dict]) -> list[str]:
    """The sheet's heading: the run's name and directory, then its final numbers."""
    name, steps = _run_name(run_dir)
    head = f"{name}   ({os.path.abspath(run_dir)})"
    final = []
    if train:
        last = train[-1]
        final.append(f"step {last.get('step')}" + (f"/{steps}" if steps else ""))
        if isinstance(last.get("loss"), (int, float)):
            final.append(f"training loss {_fmt(last['loss'])}")
    if evals:
        last = evals[-1]
        shown = [k for k in sorted(last) if k.startswith("eval/") and isinstance(last[k], (int, float))
                 and not k.endswith(("seconds", "num_samples", "samples_lost"))]
        final += [f"eval {k[5:]} {_fmt(last[k])}" for k in shown[:6]] + ([f"(eval at step {last.get('step')})"] if shown else [])
    return [head, "final: " + ", ".join(final) if final else "no records yet"]


def make_report(run_dir: str, out: str | None = None) -> str:
    """Write ``run_dir/report.png``: a heading (run name, final numbers), training loss, learning
    rate, evaluation accuracies (or losses), throughput, and below them the newest sample grid of a
    diffusion run (``run_dir/samples/``)."""
    recs = read_metrics(run_dir)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    acc_keys = sorted({k for r in evals for k in r if "top1" in k})
    # models without accuracies (LMs, diffusion) show their evaluation losses instead
    eval_keys, eval_title = (acc_keys, "evaluation accuracy") if acc_keys else (["eval/loss"], "evaluation loss")
    panels = [
        draw_panel("training loss", {"loss": [(r["step"], r["loss"]) for r in train if "loss" in r]}, log_y=True),
        draw_panel("learning rate", {"lr": [(r["step"], r["lr"]) for r in train if "lr" in r]}),
        draw_panel(eval_title, {_short(k): [(r["step"], r[k]) for r in evals if k in r] for k in eval_keys}),
        draw_panel("throughput (samples/s)", {"samples/s": [(r["step"], r["samples_per_s"]) for r in train if "samples_per_s" in r]}),
    ]
    grid = _latest_samples(run_dir)
    extra = grid.height if grid is not None else 0
    sheet = Image.new("RGB", (2 * PANEL_W, HEADER_H + 2 * PANEL_H + extra), "white")
    draw = ImageDraw.Draw(sheet)
    for i, text in enumerate(summary_lines(run_dir, train, evals)):
        draw.text((PAD, 6 + 16 * i), text, fill="black")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % 2) * PANEL_W, HEADER_H + (i // 2) * PANEL_H))
    if grid is not None:
        sheet.paste(grid, ((2 * PANEL_W - grid.width) // 2, HEADER_H + 2 * PANEL_H))
    out = out or os.path.join(run_dir, "report.png")
    sheet.save(out)
    return out

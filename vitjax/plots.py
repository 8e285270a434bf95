"""PNG plots: training curves, and the size/speed vs accuracy Pareto plot."""

from __future__ import annotations

import pathlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history: dict[str, list[tuple[int, float]]], path: str | pathlib.Path,
                    title: str) -> pathlib.Path:
  """One panel per metric (e.g. loss, accuracy, agreement) against step.

  `history[name]` holds (step, value) pairs; several runs can share a panel by
  naming metrics "<run>/<metric>".
  """
  metrics = sorted({name.split("/")[-1] for name in history})
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for name, points in sorted(history.items()):
      if name.split("/")[-1] != metric or not points:
        continue
      steps, values = zip(*points)
      label = name.rsplit("/", 1)[0] if "/" in name else metric
      ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    if any("/" in n for n in history):
      ax.legend(fontsize=8)
  return _save(fig, title, path)


def _save(fig: plt.Figure, title: str, path: str | pathlib.Path) -> pathlib.Path:
  fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def pareto_front(points: Sequence[tuple[float, float]], lower_x_better: bool = True
                 ) -> list[int]:
  """Indices of the points no other point beats in both x and accuracy (y)."""
  front = []
  for i, (xi, yi) in enumerate(points):
    dominated = False
    for j, (xj, yj) in enumerate(points):
      better_x = xj <= xi if lower_x_better else xj >= xi
      strictly = (xj < xi if lower_x_better else xj > xi) or yj > yi
      if j != i and better_x and yj >= yi and strictly:
        dominated = True
        break
    if not dominated:
      front.append(i)
  return front


def pareto(rows: dict[str, dict[str, float]], path: str | pathlib.Path,
           title: str) -> pathlib.Path:
  """Two panels: size ratio vs top-1 and speedup vs top-1, fronts highlighted.

  `rows[name]` needs "size_ratio", "throughput_ratio" and "accuracy" (in %).
  """
  names = list(rows)
  acc = [rows[n]["accuracy"] for n in names]
  fig, axes = plt.subplots(1, 2, figsize=(12, 5))
  for ax, key, lower, label in (
      (axes[0], "size_ratio", True, "checkpoint bytes / teacher (log)"),
      (axes[1], "throughput_ratio", False, "throughput / teacher (batch 256, log)")):
    xs = [rows[n][key] for n in names]
    front = set(pareto_front(list(zip(xs, acc)), lower_x_better=lower))
    for i, name in enumerate(names):
      on = i in front
      ax.scatter(xs[i], acc[i], s=60 if on else 30, color="tab:red" if on else "tab:blue",
                 zorder=3, edgecolor="black" if on else "none")
      ax.annotate(name, (xs[i], acc[i]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    order = sorted(front, key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [acc[i] for i in order], color="tab:red", alpha=0.5,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  return _save(fig, title, path)

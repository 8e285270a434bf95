"""PNG plots: training curves, the size/speed vs accuracy Pareto plot, and the
auto-tuner's sensitivity heat map and search front."""

from __future__ import annotations

import pathlib
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.ticker  # noqa: E402
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


FAMILY_COLORS = {"reference": "black", "quantization": "tab:blue", "low-rank": "tab:green",
                 "pruning": "tab:orange", "distillation": "tab:purple",
                 "combination": "tab:red", "auto-tuner": "tab:brown"}


def pareto(rows: dict[str, dict[str, float]], path: str | pathlib.Path,
           title: str) -> pathlib.Path:
  """Two panels: size ratio vs top-1 and throughput ratio vs top-1.

  Points are coloured by family (legend); the Pareto front of each panel is
  drawn as a line and only its points are labelled, placed by adjustText so
  that labels do not overlap. `rows[name]` needs "size_ratio",
  "throughput_ratio", "accuracy" (in %) and may give "family".
  """
  from adjustText import adjust_text  # noqa: PLC0415 (matplotlib-only helper)

  names = list(rows)
  acc = [rows[n]["accuracy"] for n in names]
  families = [rows[n].get("family", "reference") for n in names]
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
  for ax, key, lower, label in (
      (axes[0], "size_ratio", True, "checkpoint bytes / teacher (log)"),
      (axes[1], "throughput_ratio", False, "throughput / teacher (batch 256, log)")):
    xs = [rows[n][key] for n in names]
    front = set(pareto_front(list(zip(xs, acc)), lower_x_better=lower))
    for family in dict.fromkeys(families):
      idx = [i for i, f in enumerate(families) if f == family]
      ax.scatter([xs[i] for i in idx], [acc[i] for i in idx], s=40, zorder=3,
                 color=FAMILY_COLORS.get(family, "tab:gray"), label=family)
    order = sorted(front, key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [acc[i] for i in order], color="0.3", alpha=0.6,
            linestyle="--", zorder=2, label="Pareto front")
    ax.scatter([xs[i] for i in order], [acc[i] for i in order], s=110, facecolor="none",
               edgecolor="black", zorder=4)
    texts = [ax.text(xs[i], acc[i], names[i], fontsize=8) for i in order]
    ax.set_xscale("log")
    ratio = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_major_formatter(ratio)
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.xaxis.set_minor_formatter(ratio)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    adjust_text(texts, x=xs, y=acc, ax=ax, expand=(1.3, 1.6),
                arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6))
  axes[0].legend(fontsize=8, loc="lower right")
  return _save(fig, title + "\n(circled and labelled: the Pareto front of each panel)", path)


def heatmap(values: np.ndarray, rows: Sequence[str], columns: Sequence[str],
            path: str | pathlib.Path, title: str, label: str) -> pathlib.Path:
  """A rows x columns heat map of `values` (NaN cells blank), each cell
  annotated with its value; the colour scale stops at the 98th percentile,
  so one extreme cell does not wash out the rest."""
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  low = min(0.0, float(finite.min())) if finite.size else 0.0
  high = max(float(np.percentile(finite, 98)) if finite.size else 1.0, low + 1e-9)
  fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(columns), 1.2 + 0.26 * len(rows)))
  image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="magma_r", vmin=low,
                    vmax=high)
  ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  for (i, j), v in np.ndenumerate(values):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6,
              color="white" if v > low + 0.6 * (high - low) else "black")
  fig.colorbar(image, ax=ax, label=label, extend="max" if finite.size and
               finite.max() > high else "neither")
  return _save(fig, title, path)


def tuning_front(points: Sequence[tuple[float, float]], front: Sequence[int],
                 chosen: int | None, path: str | pathlib.Path, title: str, *,
                 max_drop: float | None = None, max_ratio: float | None = None,
                 references: dict[str, tuple[float, float]] | None = None
                 ) -> pathlib.Path:
  """Every evaluated policy as (size ratio, accuracy drop), the Pareto front
  as a line, the chosen policy starred, the constraints as dashed lines, and
  optional labelled reference points."""
  fig, ax = plt.subplots(figsize=(7.5, 5))
  xs, ys = [p[0] for p in points], [p[1] for p in points]
  ax.scatter(xs, ys, s=12, color="0.65", label="evaluated policies", zorder=2)
  order = sorted(front, key=lambda i: xs[i])
  ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:blue", ms=4,
          label="Pareto front", zorder=3)
  if chosen is not None:
    ax.scatter([xs[chosen]], [ys[chosen]], marker="*", s=260, color="tab:red", zorder=5,
               label="chosen")
  for name, (x, y) in (references or {}).items():
    ax.scatter([x], [y], marker="s", s=30, color="black", zorder=4)
    ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
  if max_drop is not None:
    ax.axhline(max_drop, color="tab:red", ls="--", lw=0.8, label=f"max drop {max_drop:g} pt")
  if max_ratio is not None:
    ax.axvline(max_ratio, color="tab:green", ls="--", lw=0.8,
               label=f"max size {max_ratio:g}x")
  ax.set_xscale("log")
  ax.set_xlabel("stored bytes / fp32 model (log)")
  ax.set_ylabel("validation accuracy drop (pt)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return _save(fig, title, path)

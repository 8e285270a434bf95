"""Histograms of activation magnitudes and the clipping bound a calibrator
picks from one (minmax, percentile, or the bound minimizing the expected
squared error of a histogram model)."""

from __future__ import annotations

import dataclasses

import numpy as np

CALIBRATORS = ("minmax", "percentile", "mse")
BINS = 2048


def quant_bound(bits: int) -> float:
  """Largest |q| AQT maps a bound to (2^(bits-1) - 0.5, values clip at 2^(bits-1) - 1)."""
  return 2.0 ** (bits - 1) - 0.5


@dataclasses.dataclass(frozen=True)
class Histogram:
  """Counts of |x| in `len(counts)` equal bins over [0, hi]."""

  counts: np.ndarray
  hi: float

  @property
  def edges(self) -> np.ndarray:
    return np.linspace(0.0, self.hi, len(self.counts) + 1)

  @classmethod
  def of(cls, samples: np.ndarray, bins: int = BINS) -> Histogram:
    """Histogram of |samples| over [0, max |samples|]."""
    mags = np.abs(np.asarray(samples, np.float64)).reshape(-1)
    hi = float(mags.max()) or 1.0
    counts, _ = np.histogram(mags, bins=bins, range=(0.0, hi))
    return cls(counts.astype(np.float64), hi)


def choose_bound(hist: Histogram, calibrator: str, *, percentile: float = 99.99,
                 bits: int = 8) -> float:
  """The clipping bound `calibrator` picks from `hist` (scale = bound / quant_bound).

  Raises:
    ValueError: unknown calibrator, percentile outside (0, 100], empty histogram.
  """
  if calibrator not in CALIBRATORS:
    raise ValueError(f"calibrator={calibrator!r}; choose one of {CALIBRATORS}")
  total = hist.counts.sum()
  if total <= 0:
    raise ValueError("calibration histogram is empty")
  edges = hist.edges
  if calibrator == "minmax":
    return float(hist.hi)
  if calibrator == "percentile":
    if not 0 < percentile <= 100:
      raise ValueError(f"percentile={percentile} is outside (0, 100]")
    cdf = np.cumsum(hist.counts) / total
    i = int(np.searchsorted(cdf, percentile / 100.0 - 1e-12))
    return float(edges[min(i, len(hist.counts) - 1) + 1])
  # mse: expected error of every candidate bound, over bin centers.
  centers = (edges[:-1] + edges[1:]) / 2
  candidates = edges[len(edges) // 64:][1:]
  step = candidates[:, None] / quant_bound(bits)
  clipped = np.maximum(centers[None, :] - candidates[:, None], 0.0) ** 2
  rounding = np.where(centers[None, :] < candidates[:, None], step ** 2 / 12, 0.0)
  errors = ((clipped + rounding) * hist.counts[None, :]).sum(1)
  return float(candidates[int(np.argmin(errors))])

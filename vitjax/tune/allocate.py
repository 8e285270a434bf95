"""Choosing one setting per layer under a budget: an integer program, and a
greedy fallback.

Both take a cost table (layers x options: the measured sensitivity, e.g. the
accuracy drop when only that layer takes that option; NaN where an option
does not apply) and a size table of the same shape (stored bytes, or
measured latency), and minimize the summed cost with the summed size within
`budget`, one option per layer: HAWQ-V3's formulation. `ilp` solves it
exactly with `scipy.optimize.milp` (HiGHS); `greedy` starts from the
cheapest-cost option of every layer and repeatedly takes the move that saves
the most size per unit of added cost until the budget holds.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse


def _check(costs: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  costs, sizes = np.asarray(costs, np.float64), np.asarray(sizes, np.float64)
  if costs.ndim != 2 or costs.shape != sizes.shape:
    raise ValueError(f"costs {costs.shape} and sizes {sizes.shape} must be equal 2-D "
                     "(layers x options) tables")
  allowed = ~np.isnan(costs) & ~np.isnan(sizes)
  empty = np.flatnonzero(~allowed.any(axis=1))
  if empty.size:
    raise ValueError(f"layers {empty.tolist()} have no allowed option (all NaN)")
  return costs, sizes


def minimum_size(sizes: np.ndarray) -> float:
  """The smallest total size any choice reaches."""
  return float(np.nansum(np.nanmin(np.asarray(sizes, np.float64), axis=1)))


def total(table: np.ndarray, choice: np.ndarray) -> float:
  """Sum over layers of the chosen entries."""
  return float(np.asarray(table)[np.arange(len(choice)), choice].sum())


def _infeasible(budget: float, sizes: np.ndarray) -> ValueError:
  return ValueError(f"budget={budget:g} is below the smallest reachable total "
                    f"{minimum_size(sizes):g}; raise the budget")


def ilp(costs: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
  """Option index per layer minimizing total cost with total size <= budget.

  Raises:
    ValueError: tables of different shapes, a layer with no allowed option,
      or a budget no choice meets.
  """
  costs, sizes = _check(costs, sizes)
  if budget < minimum_size(sizes) - 1e-9:
    raise _infeasible(budget, sizes)
  n, k = costs.shape
  allowed = (~np.isnan(costs) & ~np.isnan(sizes)).reshape(-1)
  c = np.where(allowed, np.nan_to_num(costs.reshape(-1)), 0.0)
  one_per_layer = scipy.sparse.kron(scipy.sparse.eye(n), np.ones((1, k)))
  constraints = [scipy.optimize.LinearConstraint(one_per_layer, 1, 1),
                 scipy.optimize.LinearConstraint(
                     np.nan_to_num(sizes.reshape(1, -1)), -np.inf, budget)]
  bounds = scipy.optimize.Bounds(np.zeros(n * k), allowed.astype(np.float64))
  result = scipy.optimize.milp(c, constraints=constraints, integrality=np.ones(n * k),
                               bounds=bounds)
  if result.status != 0 or result.x is None:
    raise ValueError(f"the integer program found no choice within budget={budget:g}: "
                     f"{result.message}")
  return np.asarray(result.x).reshape(n, k).argmax(axis=1)


def greedy(costs: np.ndarray, sizes: np.ndarray, budget: float) -> np.ndarray:
  """A feasible, usually good choice (see the module docstring).

  Raises:
    ValueError: as `ilp`.
  """
  costs, sizes = _check(costs, sizes)
  if budget < minimum_size(sizes) - 1e-9:
    raise _infeasible(budget, sizes)
  c = np.where(np.isnan(costs) | np.isnan(sizes), np.inf, costs)
  s = np.where(np.isnan(costs) | np.isnan(sizes), np.inf, sizes)
  rows = np.arange(len(c))
  # Cheapest cost first, smaller size breaking ties.
  choice = np.array([np.lexsort((s[i], c[i]))[0] for i in rows])
  while s[rows, choice].sum() > budget + 1e-9:
    finite = np.isfinite(s)
    saved = np.where(finite, s[rows, choice][:, None] - np.where(finite, s, 0.0), 0.0)
    added = np.maximum(np.where(finite, c, 0.0) - c[rows, choice][:, None], 0.0)
    ratio = np.where(saved > 0, saved / (added + 1e-12), -np.inf)
    i, j = np.unravel_index(np.argmax(ratio), ratio.shape)
    choice[i] = j
  return choice

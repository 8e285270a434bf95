"""Multi-objective search over genomes (NSGA-II), with an on-disk history.

A genome is a tuple of option indices, one per gene; `choices[g]` lists the
options gene g may take. `nsga2` minimizes a vector of objectives: a
population seeded by the caller (e.g. integer-program solutions), binary
tournaments on (front rank, crowding distance), uniform crossover, per-gene
mutation, and elitist survival by non-dominated sorting (Deb et al. 2002).
Every seed genome is evaluated first. It draws every random number from one
`numpy` generator seeded by `seed`,
and objectives are deterministic, so the same seed gives the same sequence
of genomes and the same front; a stop by time ends that sequence early.

`History` appends every evaluation to a JSON-lines file; a resumed search
reads it back and answers repeated genomes from it instead of evaluating
them again, so a killed run continues where it stopped and ends with the
same front as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np

Genome = tuple[int, ...]


class OutOfTime(Exception):
  """Raised by an evaluation callback when the time budget is spent."""


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
  """True if `a` is no worse than `b` in every objective and better in one."""
  return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def non_dominated_sort(objectives: Sequence[Sequence[float]]) -> list[list[int]]:
  """Indices grouped into fronts: front 0 is dominated by nobody, front 1
  only by front 0, and so on."""
  n = len(objectives)
  beaten_by = [0] * n
  beats: list[list[int]] = [[] for _ in range(n)]
  for i in range(n):
    for j in range(i + 1, n):
      if dominates(objectives[i], objectives[j]):
        beats[i].append(j)
        beaten_by[j] += 1
      elif dominates(objectives[j], objectives[i]):
        beats[j].append(i)
        beaten_by[i] += 1
  fronts, current = [], [i for i in range(n) if beaten_by[i] == 0]
  while current:
    fronts.append(current)
    following = []
    for i in current:
      for j in beats[i]:
        beaten_by[j] -= 1
        if beaten_by[j] == 0:
          following.append(j)
    current = sorted(following)
  return fronts


def crowding(objectives: Sequence[Sequence[float]], front: Sequence[int]) -> dict[int, float]:
  """Crowding distance of each member of `front` (boundary points: inf)."""
  distance = {i: 0.0 for i in front}
  if len(front) <= 2:
    return {i: float("inf") for i in front}
  for m in range(len(objectives[front[0]])):
    order = sorted(front, key=lambda i: (objectives[i][m], i))
    lo, hi = objectives[order[0]][m], objectives[order[-1]][m]
    distance[order[0]] = distance[order[-1]] = float("inf")
    if hi == lo:
      continue
    for k in range(1, len(order) - 1):
      distance[order[k]] += (objectives[order[k + 1]][m] - objectives[order[k - 1]][m]) / (hi - lo)
  return distance


def pareto_front(objectives: Sequence[Sequence[float]]) -> list[int]:
  """Indices of the non-dominated points (first occurrence of duplicates)."""
  seen, front = set(), []
  for i in non_dominated_sort(objectives)[0] if objectives else []:
    key = tuple(objectives[i])
    if key not in seen:
      seen.add(key)
      front.append(i)
  return sorted(front, key=lambda i: tuple(objectives[i]))


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """NSGA-II settings.

  Attributes:
    population: individuals per generation (>= 4).
    evaluations: distinct genomes to evaluate in all (>= population).
    crossover: probability of uniform crossover per child.
    mutation: per-gene mutation probability (None: 1 / number of genes).
    seed: the generator's seed.
  """

  population: int = 16
  evaluations: int = 96
  crossover: float = 0.9
  mutation: float | None = None
  seed: int = 0

  def __post_init__(self) -> None:
    if self.population < 4:
      raise ValueError(f"population={self.population} must be >= 4")
    if self.evaluations < self.population:
      raise ValueError(f"evaluations={self.evaluations} must be >= population="
                       f"{self.population}")
    if not 0 <= self.crossover <= 1:
      raise ValueError(f"crossover={self.crossover} is outside [0, 1]")
    if self.mutation is not None and not 0 < self.mutation <= 1:
      raise ValueError(f"mutation={self.mutation} is outside (0, 1]")


def nsga2(choices: Sequence[Sequence[int]], evaluate: Callable[[Genome], Sequence[float]],
          config: SearchConfig, seeds: Sequence[Genome] = ()) -> dict[Genome, tuple[float, ...]]:
  """Every genome evaluated (in order) -> its objectives (all minimized).

  `evaluate` may raise `OutOfTime`; the search then returns what it has.

  Raises:
    ValueError: a gene with no options, or a seed genome of the wrong length
      or with an option its gene does not allow.
  """
  for g, options in enumerate(choices):
    if not options:
      raise ValueError(f"gene {g} has no options")
  for s in seeds:
    if len(s) != len(choices) or any(v not in choices[g] for g, v in enumerate(s)):
      raise ValueError(f"seed genome {s} does not fit the genes' options")
  rng = np.random.default_rng(config.seed)
  rate = config.mutation or 1.0 / len(choices)
  seen: dict[Genome, tuple[float, ...]] = {}
  stalls = 0

  def random_genome() -> Genome:
    return tuple(int(options[rng.integers(len(options))]) for options in choices)

  def run(genome: Genome) -> bool:
    """Evaluates a new genome; False when it was seen (nothing done)."""
    if genome in seen:
      return False
    seen[genome] = tuple(float(v) for v in evaluate(genome))
    return True

  try:
    population: list[Genome] = []
    for genome in dict.fromkeys(tuple(s) for s in seeds):
      if len(seen) >= config.evaluations:
        break
      run(genome)
      population.append(genome)
    while len(population) < config.population and len(seen) < config.evaluations:
      genome = random_genome()
      if run(genome):
        population.append(genome)
    population = _survivors(population, seen, config.population)
    while len(seen) < config.evaluations and stalls < 50:
      objectives = [seen[g] for g in population]
      rank, distance = {}, {}
      for r, front in enumerate(non_dominated_sort(objectives)):
        for i in front:
          rank[i] = r
        distance.update(crowding(objectives, front))

      def pick() -> Genome:
        a, b = rng.integers(len(population), size=2)
        better = a if (rank[a], -distance[a]) <= (rank[b], -distance[b]) else b
        return population[better]

      children: list[Genome] = []
      attempts = 0
      while len(children) < config.population and len(seen) < config.evaluations:
        attempts += 1
        mother, father = pick(), pick()
        if rng.random() < config.crossover:
          take = rng.random(len(choices)) < 0.5
          child = [m if t else f for m, f, t in zip(mother, father, take)]
        else:
          child = list(mother)
        for g, options in enumerate(choices):
          if len(options) > 1 and rng.random() < rate:
            child[g] = int(options[rng.integers(len(options))])
        if run(tuple(child)):
          children.append(tuple(child))
        elif attempts > 20 * config.population:
          break
      stalls = stalls + 1 if not children else 0
      population = _survivors(population + children, seen, config.population)
  except OutOfTime:
    pass
  return seen


def _survivors(pool: list[Genome], seen: dict[Genome, tuple[float, ...]], n: int
               ) -> list[Genome]:
  """NSGA-II's elitist selection of n genomes: whole fronts in rank order,
  the last one cut by crowding distance."""
  objectives = [seen[g] for g in pool]
  chosen: list[int] = []
  for front in non_dominated_sort(objectives):
    if len(chosen) + len(front) <= n:
      chosen += front
    else:
      d = crowding(objectives, front)
      chosen += sorted(front, key=lambda i: (-d[i], i))[:n - len(chosen)]
      break
  return [pool[i] for i in chosen]


class History:
  """Evaluations on disk (JSON lines), read back on resume.

  Each line is an object with at least "genome"; `record` appends and
  flushes one, so a killed run loses at most the evaluation in progress.
  """

  def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any], *,
               replace_other: bool = False):
    """Opens (or starts) the history at `path` for a search described by
    `fingerprint` (what makes its evaluations comparable: model digest,
    data, menu...); with `replace_other`, a history of another search there
    is started over instead of refused.

    Raises:
      ValueError: the file belongs to a search with another fingerprint (and
        not `replace_other`), or a line is not valid JSON.
    """
    self.path = pathlib.Path(path)
    self.entries: dict[Genome, dict[str, Any]] = {}
    if self.path.exists():
      lines = self.path.read_text().splitlines()
      for n, line in enumerate(lines):
        try:
          entry = json.loads(line)
        except json.JSONDecodeError as e:
          if n == len(lines) - 1:  # a line cut short by a kill
            break
          raise ValueError(f"history {self.path} line {n + 1} is not JSON: {e}") from e
        if n == 0:
          if entry.get("fingerprint") != fingerprint and replace_other:
            break
          if entry.get("fingerprint") != fingerprint:
            raise ValueError(f"history {self.path} belongs to another search (its "
                             f"fingerprint {entry.get('fingerprint')} differs from "
                             f"{fingerprint}); use another output directory or remove it")
          continue
        self.entries[tuple(entry["genome"])] = entry
      self._rewrite(fingerprint)
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._rewrite(fingerprint)
    self.resumed = len(self.entries)

  def _rewrite(self, fingerprint: dict[str, Any]) -> None:
    tmp = self.path.with_name(self.path.name + ".tmp")
    lines = [json.dumps({"fingerprint": fingerprint})] + [
        json.dumps(e) for e in self.entries.values()]
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, self.path)

  def get(self, genome: Genome) -> dict[str, Any] | None:
    return self.entries.get(tuple(genome))

  def record(self, entry: dict[str, Any]) -> None:
    self.entries[tuple(entry["genome"])] = entry
    with self.path.open("a") as f:
      f.write(json.dumps(entry) + "\n")
      f.flush()
      os.fsync(f.fileno())


class Deadline:
  """`check()` raises `OutOfTime` once `seconds` (None: never) have passed."""

  def __init__(self, seconds: float | None):
    self.end = None if seconds is None else time.monotonic() + seconds

  def check(self) -> None:
    if self.end is not None and time.monotonic() > self.end:
      raise OutOfTime()

"""The auto-tuner: the best compression policy under a size / accuracy /
latency budget.

`tune` runs, writing everything under its output directory:
  1. sensitivity (`sensitivity.measure`) of every layer, block and setting
     on the validation split, the Hessian-trace proxy and how well it ranks
     the layers -> sensitivity.json, sensitivity.png;
  2. mixed-precision allocation by integer program (and greedy, compared)
     at several byte budgets, whose solutions seed the search;
  3. NSGA-II over per-layer settings and per-block head/neuron keep ratios,
     minimizing (validation accuracy drop, stored bytes), every evaluation
     appended to history.jsonl (a killed run resumes from it) and the best
     policy meeting the budget (or, while none does, the closest) written to
     best_policy.json after every improvement;
  4. the choice: the evaluated policies that meet the budget, in order of
     preference, are built for real (`policy.apply_policy`), measured on
     the same validation images (and, with a latency budget, timed against
     the uncompressed model; timings go to latency.jsonl, apart from the
     accuracy objectives, which stay deterministic) until one passes ->
     policy.json, model/ (the compressed checkpoint), front.json, front.png.

Objectives use validation images only; the test split is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import statistics
import time
import typing
from typing import Any, Literal

import jax
import numpy as np

from vitjax import data as data_lib
from vitjax import evaluate, export, plots
from vitjax import model as model_lib
from vitjax import progress as progress_lib
from vitjax.model import Model
from vitjax.transforms.select import get_kernel
from vitjax.tune import allocate, policy as policy_lib, search, sensitivity, space
from vitjax.tune.emulate import Emulator, Plan
from vitjax.tune.space import LayerSetting

Preference = Literal["smallest", "most-accurate"]
PREFERENCES: tuple[str, ...] = typing.get_args(Preference)


@dataclasses.dataclass(frozen=True)
class Budget:
  """What the chosen policy must meet.

  Attributes:
    max_drop: validation accuracy drop in points, at most.
    max_bytes_ratio: stored bytes / the uncompressed model's, at most.
    max_latency_ratio: batch-1 latency / the uncompressed model's, at most
      (measured on the real compressed model; above 1 allows a slower one).
    prefer: among policies that meet the budget, "smallest" bytes or
      "most-accurate"; None: "smallest" when `max_drop` is given, else
      "most-accurate".
  """

  max_drop: float | None = None
  max_bytes_ratio: float | None = None
  max_latency_ratio: float | None = None
  prefer: Preference | None = None

  def __post_init__(self) -> None:
    if self.max_drop is None and self.max_bytes_ratio is None:
      raise ValueError("a tuning budget needs max_drop or max_bytes_ratio (or both)")
    if self.max_drop is not None and self.max_drop < 0:
      raise ValueError(f"max_drop={self.max_drop} must be >= 0 points")
    if self.max_bytes_ratio is not None and not 0 < self.max_bytes_ratio <= 1:
      raise ValueError(f"max_bytes_ratio={self.max_bytes_ratio} is outside (0, 1] (a "
                       "fraction of the uncompressed model's stored bytes)")
    if self.max_latency_ratio is not None and not self.max_latency_ratio > 0:
      raise ValueError(f"max_latency_ratio={self.max_latency_ratio} must be > 0 (a "
                       "multiple of the uncompressed model's latency; above 1 allows slower)")
    if self.prefer is not None and self.prefer not in PREFERENCES:
      raise ValueError(f"prefer={self.prefer!r}; choose one of {PREFERENCES}")

  @property
  def preference(self) -> Preference:
    if self.prefer is not None:
      return self.prefer
    return "smallest" if self.max_drop is not None else "most-accurate"

  def violation(self, drop: float, ratio: float) -> float:
    """0 when (drop, ratio) meets the accuracy and size budget; else how far
    it misses, relative to each limit."""
    miss = 0.0
    if self.max_drop is not None and drop > self.max_drop:
      miss += (drop - self.max_drop) / max(self.max_drop, 0.1)
    if self.max_bytes_ratio is not None and ratio > self.max_bytes_ratio:
      miss += (ratio - self.max_bytes_ratio) / self.max_bytes_ratio
    return miss


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  """How the tuner searches.

  Attributes:
    menu: per-layer settings (`space` names) the search may use.
    keeps: structured keep ratios for each block's heads and neurons (1.0,
      keeping all, is always allowed).
    a_bits: activation bits of every layer's input in every policy (static
      per-tensor ranges), or None for float activations.
    sensitivity_a_bits: activation bits measured in the sensitivity table.
    eval_images: validation images every policy is scored on.
    sensitivity_images: the first this many of them score the sensitivity
      table (one evaluation per place and setting).
    calibration: training images for activation ranges and the Hessian.
    hessian_probes: Rademacher vectors of the Hutchinson estimate.
    search: NSGA-II settings (population, evaluations, seed).
    time_budget_s: start no new evaluation this long after `tune` began
      (the sensitivity table counts; None: run all the evaluations; at least
      one policy is always evaluated); the front so far is used.
    ilp_budgets: byte budgets whose integer-program solutions seed the search
      (with every uniform setting of the menu).
    candidates: at most this many policies are built for real before
      the tuner settles for the closest one.
  """

  menu: tuple[str, ...] = space.DEFAULT_MENU
  keeps: tuple[float, ...] = (0.75, 0.5)
  a_bits: int | None = None
  sensitivity_a_bits: tuple[int, ...] = space.ACTIVATION_BITS
  eval_images: int = 5000
  sensitivity_images: int = 1000
  calibration: int = 256
  hessian_probes: int = 8
  search: search.SearchConfig = search.SearchConfig()
  time_budget_s: float | None = None
  ilp_budgets: int = 8
  candidates: int = 6

  def __post_init__(self) -> None:
    for name in self.menu:
      space.parse(name)
    if "fp32" not in self.menu:
      raise ValueError(f"menu={self.menu} must include 'fp32' (a layer left alone)")
    for k in self.keeps:
      if not 0 < k < 1:
        raise ValueError(f"keeps: {k} is outside (0, 1)")
    if self.a_bits is not None:
      space.LayerSetting(a_bits=self.a_bits)
    for name in ("eval_images", "sensitivity_images", "calibration", "hessian_probes",
                 "ilp_budgets", "candidates"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.time_budget_s is not None and self.time_budget_s <= 0:
      raise ValueError(f"time_budget_s={self.time_budget_s} must be > 0")


@dataclasses.dataclass
class Result:
  """What `tune` chose and measured (everything is also on disk)."""

  model: Model
  policy: policy_lib.CompressionPolicy
  chosen: dict[str, Any]
  front: list[dict[str, Any]]
  feasible: bool
  evaluations: int
  disk_bytes: int


def model_digest(model: Model) -> str:
  """SHA-256 over the parameter arrays (and the config), for history files."""
  h = hashlib.sha256(repr(model.config).encode())
  for leaf in jax.tree_util.tree_leaves(model.params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


class Space:
  """Genes of the search: one per linear layer (an index into the menu,
  limited to settings that apply to its shape), then one per block for
  heads and one for MLP neurons (an index into (1.0,) + keeps)."""

  def __init__(self, emulator: Emulator, config: TuneConfig):
    self.emulator = emulator
    self.menu = [space.parse(n) for n in config.menu]
    self.a_bits = config.a_bits
    self.ratios = (1.0,) + tuple(config.keeps)
    cfg = emulator.model.config
    self.depth = cfg.depth
    self.heads = [cfg.heads(i) for i in range(cfg.depth)]
    self.widths = [cfg.mlp_width(i) for i in range(cfg.depth)]
    self.choices: list[list[int]] = []
    for layer in emulator.layers:
      shape = tuple(np.shape(get_kernel(emulator.model.params, layer)))
      self.choices.append([i for i, s in enumerate(self.menu) if space.applies_to(s, shape)])
    self.choices += [list(range(len(self.ratios)))] * (2 * cfg.depth)

  def plan(self, genome: search.Genome) -> Plan:
    n = len(self.emulator.layers)
    settings = {}
    for layer, index in zip(self.emulator.layers, genome[:n]):
      setting = dataclasses.replace(self.menu[index], a_bits=self.a_bits)
      if setting != LayerSetting():
        settings[layer] = setting
    h = genome[n:n + self.depth]
    m = genome[n + self.depth:]
    heads = tuple(max(1, round(self.ratios[i] * c)) for i, c in zip(h, self.heads))
    mlp = tuple(max(1, round(self.ratios[i] * c)) for i, c in zip(m, self.widths))
    return Plan(settings, None if heads == tuple(self.heads) else heads,
                None if mlp == tuple(self.widths) else mlp)

  def genome(self, layer_options: list[int]) -> search.Genome:
    return tuple(layer_options) + (0,) * (2 * self.depth)


def _layer_tables(table: sensitivity.Table, emulator: Emulator, tspace: Space
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(costs, sizes) per layer x menu option for the integer program: cost is
  the measured disagreement with the uncompressed model (%), size the stored
  bytes the option adds (negative: saves) to the fp32 model."""
  fp32 = emulator.stored_bytes(Plan({}))
  n = len(emulator.layers)
  costs = np.full((n, len(tspace.menu)), np.nan)
  sizes = np.full_like(costs, np.nan)
  for j, setting in enumerate(tspace.menu):
    if setting == LayerSetting():
      costs[:, j], sizes[:, j] = 0.0, 0.0
      continue
    col = table.settings.index(setting.name)
    costs[:, j] = 100.0 - table.agreement[:n, col]
    sizes[:, j] = table.bytes[:n, col] - fp32
  return costs, sizes


def tune(model: Model, dataset: data_lib.Dataset, budget: Budget,
         out: str | pathlib.Path, config: TuneConfig = TuneConfig(), *,
         replace_other: bool = False, progress: bool = True) -> Result:
  """Searches, chooses, builds and saves the policy (see the module docstring).

  A history in `out` of the same search (model, data, settings) is resumed;
  one of another search is refused, or with `replace_other` started over.

  Raises:
    ValueError: a compressed model or a CNN, a dataset without validation
      images, another search's history in `out`, a search that evaluated no
      policy that compresses anything, what `Emulator`, `Budget` and
      `TuneConfig` refuse.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.monotonic()
  deadline = search.Deadline(config.time_budget_s)
  if len(dataset.validation) == 0:
    raise ValueError("the tuner needs validation images (Dataset.validation is empty)")
  validation = dataset.validation.take(slice(0, config.eval_images))
  calibration = dataset.calibration.take(slice(0, config.calibration))
  a_bits = tuple(sorted(set(config.sensitivity_a_bits) |
                        ({config.a_bits} if config.a_bits else set())))
  say = print if progress else (lambda *a, **k: None)
  say(f"tune: scoring policies on {len(validation)} validation images")
  emulator = Emulator(model, validation, calibration, a_bits=a_bits)
  fp32_bytes = emulator.stored_bytes(Plan({}))
  tspace = Space(emulator, config)

  fingerprint = {"model": model_digest(model), "eval_images": len(validation),
                 "sensitivity_images": config.sensitivity_images,
                 "calibration": len(calibration), "menu": list(config.menu),
                 "keeps": list(config.keeps), "a_bits": config.a_bits,
                 "sensitivity_a_bits": list(config.sensitivity_a_bits),
                 "hessian_probes": config.hessian_probes}
  table = _sensitivity(model, emulator, validation, calibration, config, fingerprint, out,
                       progress)
  # A run with more evaluations replays a shorter one's genomes first, so the
  # history of either serves the other.
  fingerprint["search"] = {k: v for k, v in dataclasses.asdict(config.search).items()
                           if k != "evaluations"}

  costs, sizes = _layer_tables(table, emulator, tspace)
  seeds, allocation = _ilp_seeds(costs, sizes, fp32_bytes, budget, config, tspace)
  if budget.max_latency_ratio is not None:
    latency_seeds, allocation["latency"] = _latency_seeds(model, costs, emulator, budget,
                                                          config, tspace)
    seeds = list(dict.fromkeys(latency_seeds + seeds))
  (out / "allocation.json").write_text(json.dumps(allocation, indent=1))

  history = search.History(out / "history.jsonl", fingerprint, replace_other=replace_other)
  if history.resumed:
    say(f"tune: resuming, {history.resumed} evaluations read from {history.path}")
  reference = emulator.reference_accuracy
  best = {"entry": None}
  for entry in history.entries.values():
    _keep_best(best, entry, budget, tspace, out)
  bar = progress_lib.bar(config.search.evaluations, "search", enabled=progress)
  bar.update(min(history.resumed, config.search.evaluations))

  def evaluate(genome: search.Genome) -> tuple[float, float]:
    entry = history.get(genome)
    if entry is None:
      if history.entries:  # at least one policy is always evaluated
        deadline.check()
      t = time.perf_counter()
      plan = tspace.plan(genome)
      outcome = emulator.evaluate(plan)
      size = emulator.stored_bytes(plan)
      entry = {"genome": list(genome), "accuracy": outcome.accuracy,
               "agreement": outcome.agreement, "drop": reference - outcome.accuracy,
               "bytes": size, "bytes_ratio": size / fp32_bytes,
               "seconds": round(time.perf_counter() - t, 3),
               "evaluation": len(history.entries)}
      history.record(entry)
      _keep_best(best, entry, budget, tspace, out)
      bar.update(1)
      bar.set_postfix_str(_best_text(best))
    return entry["drop"], float(entry["bytes"])

  seen = search.nsga2(tspace.choices, evaluate, config.search, seeds)
  bar.close()
  # Timings stay in the history; what is compared and chosen is deterministic.
  entries = [{k: v for k, v in history.get(g).items() if k != "seconds"} for g in seen]
  front = [entries[i] for i in search.pareto_front([(e["drop"], e["bytes"]) for e in entries])]
  chosen, real_model, feasible = _choose(model, entries, budget, tspace, emulator, fp32_bytes,
                                         calibration, validation, config, out, say)
  plan = tspace.plan(tuple(chosen["genome"]))
  chosen["policy"] = _describe(plan)
  about = {"reference_accuracy": reference, "validation_images": len(validation),
           "evaluations": len(entries), "feasible": feasible,
           "budget": dataclasses.asdict(budget),
           **{k: chosen[k] for k in ("accuracy", "drop", "bytes", "bytes_ratio",
                                     "real_accuracy", "real_drop", "real_bytes")
              if k in chosen}}
  if "latency_ratio" in chosen:
    about["latency_ratio"] = chosen["latency_ratio"]
  chosen_policy = policy_lib.policy_of(plan, about)
  policy_lib.save(chosen_policy, out / "policy.json")
  disk = export.save_model(real_model, out / "model", overwrite=True,
                           metadata={"tuned_policy": "policy.json"})
  front_doc = [{**e, "policy": _describe(tspace.plan(tuple(e["genome"])))} for e in front]
  (out / "front.json").write_text(json.dumps({
      "reference_accuracy": reference, "fp32_bytes": fp32_bytes,
      "budget": dataclasses.asdict(budget), "chosen": chosen, "feasible": feasible,
      "chosen_disk_bytes": disk,
      "evaluations": len(entries), "seconds": round(time.monotonic() - started, 1),
      "front": front_doc}, indent=1))
  points = [(e["bytes_ratio"], e["drop"]) for e in entries]
  plots.tuning_front(points, [entries.index(e) for e in front],
                     entries.index(next(e for e in entries if e["genome"] == chosen["genome"])),
                     out / "front.png",
                     f"vitjax tune: {len(entries)} policies, validation drop vs size",
                     max_drop=budget.max_drop, max_ratio=budget.max_bytes_ratio)
  say(f"tune: chose {_describe(plan)['summary']}: validation drop "
      f"{chosen.get('real_drop', chosen['drop']):.2f} pt at {chosen['bytes_ratio']:.3f}x bytes"
      f"{'' if feasible else ' (NO policy met the budget; this is the closest)'}")
  return Result(real_model, chosen_policy, chosen, front_doc, feasible, len(entries), disk)


def _sensitivity(model: Model, emulator: Emulator, validation: data_lib.Split,
                 calibration: data_lib.Split, config: TuneConfig,
                 fingerprint: dict[str, Any], out: pathlib.Path, progress: bool
                 ) -> sensitivity.Table:
  """The sensitivity table, read back from sensitivity.json when an earlier
  run of the same search wrote it, else measured and written with its heat
  map."""
  path = out / "sensitivity.json"
  if path.exists():
    doc = json.loads(path.read_text())
    if doc.get("fingerprint") == fingerprint:
      return sensitivity.Table.from_dict(doc)
  probe = emulator if config.sensitivity_images >= len(validation) else emulator.on(
      validation.take(slice(0, config.sensitivity_images)))
  table = sensitivity.measure(probe, config.menu, a_bits=config.sensitivity_a_bits,
                              keeps=config.keeps, progress=progress)
  report = _sensitivity_report(model, table, emulator, calibration, config)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps({"fingerprint": fingerprint,
                             "validation_images": len(probe.evaluation), **report}, indent=1))
  tmp.replace(path)
  short = [p.replace("Transformer/encoderblock_", "b").replace(
      "MultiHeadDotProductAttention_1/", "attn/").replace("MlpBlock_3/", "mlp/")
      for p in table.places]
  plots.heatmap(100.0 - table.agreement, short, table.settings, out / "sensitivity.png",
                "predictions changed (% of validation images) when only one place is "
                "compressed", "disagreement with fp32 (%)")
  return table


def _describe(plan: Plan) -> dict[str, Any]:
  counts: dict[str, int] = {}
  for s in plan.settings.values():
    counts[s.name] = counts.get(s.name, 0) + 1
  parts = [f"{n}x{name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])]
  if plan.heads is not None:
    parts.append(f"heads {list(plan.heads)}")
  if plan.mlp is not None:
    parts.append(f"mlp {list(plan.mlp)}")
  return {"summary": ", ".join(parts) or "fp32",
          "layers": {k: v.name for k, v in plan.settings.items()},
          "heads": None if plan.heads is None else list(plan.heads),
          "mlp": None if plan.mlp is None else list(plan.mlp)}


def _compresses(plan: Plan) -> bool:
  """Whether `plan` changes the model: a layer not fp32, or a head or neuron
  count given."""
  return (any(s != LayerSetting() for s in plan.settings.values())
          or plan.heads is not None or plan.mlp is not None)


def _best_text(best: dict[str, Any]) -> str:
  e = best["entry"]
  if e is None:
    return "no policy yet"
  return (f"best {e['bytes_ratio']:.3f}x, drop {e['drop']:.2f}"
          f"{'' if best['feasible'] else ' (closest, infeasible)'}")


def _rank_key(entry: dict[str, Any], budget: Budget) -> tuple:
  """Sort key: feasible first, then by the preference (then the other
  objective, then the genome, so ties are broken the same way every run)."""
  miss = budget.violation(entry["drop"], entry["bytes_ratio"])
  if budget.preference == "smallest":
    order = (entry["bytes"], entry["drop"])
  else:
    order = (entry["drop"], entry["bytes"])
  return (miss > 0, miss, *order, tuple(entry["genome"]))


def _keep_best(best: dict[str, Any], entry: dict[str, Any], budget: Budget, tspace: Space,
               out: pathlib.Path) -> None:
  """Writes best_policy.json when `entry` beats the best so far (a policy
  that compresses nothing never does)."""
  if not _compresses(tspace.plan(tuple(entry["genome"]))):
    return
  if best["entry"] is not None and _rank_key(entry, budget) >= _rank_key(best["entry"], budget):
    return
  best["entry"] = entry
  best["feasible"] = budget.violation(entry["drop"], entry["bytes_ratio"]) == 0
  about = {k: entry[k] for k in ("accuracy", "drop", "bytes", "bytes_ratio", "evaluation")}
  about["feasible"] = best["feasible"]
  about["measured_on"] = "emulated (fast path); policy.json holds the real measurement"
  policy_lib.save(policy_lib.policy_of(tspace.plan(tuple(entry["genome"])), about),
                  out / "best_policy.json")


def _ilp_seeds(costs: np.ndarray, sizes: np.ndarray, fp32_bytes: int, budget: Budget,
               config: TuneConfig, tspace: Space) -> tuple[list[search.Genome], dict]:
  """Integer-program (and greedy) allocations at several byte budgets."""
  smallest = fp32_bytes + allocate.minimum_size(sizes)
  targets = list(np.linspace(smallest, fp32_bytes * 0.3, config.ilp_budgets))
  if budget.max_bytes_ratio is not None:
    targets.append(max(budget.max_bytes_ratio * fp32_bytes, smallest))
  seeds, rows = [], []
  for target in sorted(set(float(t) for t in targets)):
    limit = target - fp32_bytes
    exact = allocate.ilp(costs, sizes, limit)
    rough = allocate.greedy(costs, sizes, limit)
    rows.append({"bytes_budget": round(target), "bytes_ratio": target / fp32_bytes,
                 "ilp_cost": allocate.total(costs, exact),
                 "greedy_cost": allocate.total(costs, rough),
                 "ilp_bytes": fp32_bytes + allocate.total(sizes, exact),
                 "greedy_bytes": fp32_bytes + allocate.total(sizes, rough)})
    for choice in (exact, rough):
      seeds.append(tspace.genome([int(c) for c in choice]))
  # Every uniform setting of the menu (a layer it does not fit keeps the
  # setting's weight bits alone, else fp32), so the search starts from each.
  for j, setting in enumerate(tspace.menu):
    bits_only = LayerSetting(w_bits=setting.w_bits)
    fallback = tspace.menu.index(bits_only) if bits_only in tspace.menu else 0
    seeds.append(tspace.genome([j if j in ch else (fallback if fallback in ch else 0)
                                for ch in tspace.choices[:len(costs)]]))
  note = ("cost: summed single-layer disagreement with the fp32 model (%), the additive "
          "sensitivity model both solvers minimize; the ILP's is never above greedy's")
  return list(dict.fromkeys(seeds)), {"note": note, "budgets": rows}


def _latency_seeds(model: Model, costs: np.ndarray, emulator: Emulator, budget: Budget,
                   config: TuneConfig, tspace: Space) -> tuple[list[search.Genome], dict]:
  """Integer-program allocation under the latency budget, on measured
  per-layer matmul times (`sensitivity.layer_latency`, batch 1): the layers'
  summed time may be at most `max_latency_ratio` of their fp32 sum."""
  times = sensitivity.layer_latency(model, emulator.layers, config.menu, a_bits=config.a_bits)
  fp32 = config.menu.index("fp32")
  base = float(times[:, fp32].sum())
  sizes = np.where(np.isnan(costs), np.nan, times - times[:, fp32:fp32 + 1])
  limit = (budget.max_latency_ratio - 1.0) * base
  reachable = allocate.minimum_size(sizes)
  doc = {"layer_seconds": np.where(np.isnan(times), None, times).tolist(),
         "menu": list(config.menu), "fp32_layer_sum_s": base,
         "note": "per-layer matmul seconds at batch 1 (median of rounds); the model's "
                 "latency also holds attention, norms and GELU, so the chosen policy is "
                 "timed whole"}
  if limit < reachable:
    doc["solution"] = (f"no per-layer choice reaches {budget.max_latency_ratio:g}x of the "
                       f"layers' fp32 time (at best {1 + reachable / base:.3f}x); the "
                       "fastest choice seeds the search instead")
    limit = reachable
  choice = allocate.ilp(costs, sizes, limit)
  doc["ilp_cost"] = allocate.total(costs, choice)
  doc["ilp_layer_time_ratio"] = 1 + allocate.total(sizes, choice) / base
  return [tspace.genome([int(c) for c in choice])], doc


def _sensitivity_report(model: Model, table: sensitivity.Table, emulator: Emulator,
                        calibration: data_lib.Split, config: TuneConfig) -> dict[str, Any]:
  """The table, the Hessian traces, and the proxy's rank agreement with the
  measured drops per weight setting."""
  traces = sensitivity.hessian_traces(model, calibration, emulator.layers,
                                      probes=config.hessian_probes)
  n = len(emulator.layers)
  ranking = {}
  for name in config.menu:
    if name == "fp32" or name not in table.settings:
      continue
    setting = space.parse(name)
    col = table.settings.index(name)
    measured = {layer: 100.0 - table.agreement[i, col] for i, layer in enumerate(
        emulator.layers) if np.isfinite(table.agreement[i, col])}
    ranking[name] = sensitivity.rank_agreement(sensitivity.proxy(model, traces, setting),
                                               measured)
  finite = [v for v in ranking.values() if np.isfinite(v)]
  return {**table.to_dict(), "hessian_traces": traces,
          "proxy_spearman": {k: None if not np.isfinite(v) else round(v, 3)
                             for k, v in ranking.items()},
          "proxy_spearman_median": round(statistics.median(finite), 3) if finite else None,
          "note": "Spearman correlation, over layers, of HAWQ-V2's proxy tr(H)/n * "
                  "||W_hat - W||^2 with the measured disagreement with the fp32 model "
                  "when only that layer is compressed"}


def _latency_ratio(model: Model, candidate: Model) -> tuple[float, list[float]]:
  """Median and per-round batch-1 latency ratios candidate / model."""
  times = evaluate.round_times({"fp32": model, "candidate": candidate}, 1, rounds=5, calls=5)
  ratios = [c / f for c, f in zip(times["candidate"], times["fp32"])]
  return statistics.median(ratios), ratios


def _choose(model: Model, entries: list[dict], budget: Budget, tspace: Space,
            emulator: Emulator, fp32_bytes: int, calibration: data_lib.Split,
            validation: data_lib.Split, config: TuneConfig, out: pathlib.Path, say: Any
            ) -> tuple[dict[str, Any], Model, bool]:
  """The first candidate (feasible ones by preference) whose real model
  meets the budget; else the closest one measured. Policies that compress
  nothing (every layer fp32, all heads and neurons kept) are not candidates:
  when only those meet the budget, the closest compressing one is returned,
  marked infeasible.

  Raises:
    ValueError: no evaluated policy compresses anything.
  """
  entries = [e for e in entries if _compresses(tspace.plan(tuple(e["genome"])))]
  if not entries:
    raise ValueError("the search evaluated no policy that compresses anything; give the "
                     "tuner more evaluations or time (TuneConfig.search.evaluations, "
                     "TuneConfig.time_budget_s)")
  ranked = sorted(entries, key=lambda e: _rank_key(e, budget))
  candidates = [e for e in ranked if budget.violation(e["drop"], e["bytes_ratio"]) == 0]
  candidates = candidates[:config.candidates] or ranked[:1]
  reference = emulator.reference_accuracy
  measured = []
  for entry in candidates:
    plan = tspace.plan(tuple(entry["genome"]))
    real = policy_lib.apply_policy(policy_lib.policy_of(plan), model, calibration)
    accuracy = evaluate.accuracy(real, validation) * 100
    entry = {**entry, "real_accuracy": accuracy, "real_drop": reference - accuracy,
             "real_bytes": model_lib.stored_bytes(real)}
    miss = budget.violation(entry["real_drop"], entry["real_bytes"] / fp32_bytes)
    if miss == 0 and budget.max_latency_ratio is not None:
      entry["latency_ratio"], rounds = _latency_ratio(model, real)
      with (out / "latency.jsonl").open("a") as f:
        f.write(json.dumps({"genome": entry["genome"], "latency_ratio_rounds": rounds}) + "\n")
      if entry["latency_ratio"] > budget.max_latency_ratio:
        miss = entry["latency_ratio"] / budget.max_latency_ratio - 1
    measured.append((miss, entry, real))
    say(f"tune: candidate {entry['bytes_ratio']:.3f}x: real validation drop "
        f"{entry['real_drop']:.2f} pt" + (f", latency {entry['latency_ratio']:.2f}x"
                                          if "latency_ratio" in entry else "")
        + ("" if miss == 0 else " (misses the budget)"))
    if miss == 0:
      return entry, real, True
  miss, entry, real = min(measured, key=lambda m: m[0])
  return entry, real, False

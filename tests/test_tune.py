"""The auto-tuner: settings, exact emulation, policies, allocation, search,
Hessian traces, and `tune` end to end (determinism, resume, refusals)."""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY, noisy_model, synthetic_dataset
from vitjax import cli, evaluate, export, losses
from vitjax import model as model_lib
from vitjax.models.cnn import CNNConfig
from vitjax.models.inputs import preprocess
from vitjax.transforms.select import get_kernel, linear_layers
from vitjax.tune import allocate, emulate, policy as policy_lib, search, sensitivity, space
from vitjax.tune import tuner
from vitjax.tune.space import LayerSetting


@pytest.fixture(scope="module")
def model():
  return noisy_model(TINY, seed=3, scale=0.4)


@pytest.fixture(scope="module")
def dataset():
  return synthetic_dataset(512, 128)


@pytest.fixture(scope="module")
def emulator(model, dataset):
  return emulate.Emulator(model, dataset.validation, dataset.calibration, a_bits=(8, 4))


# ---------------------------------------------------------------- settings


def test_setting_names_round_trip_and_refusals():
  for name in ("fp32", "w8", "2:4+w4", "50%+w8", "r0.5+w4", "w4+a8", "75%+w4+a6"):
    assert space.parse(name).name == name
    assert space.from_dict(space.parse(name).to_dict(), "x") == space.parse(name)
  with pytest.raises(ValueError, match="one of sparsity, n_m and rank"):
    space.parse("2:4+r0.5")
  with pytest.raises(ValueError, match="w_bits=9"):
    space.parse("w9")
  with pytest.raises(ValueError, match="part 'q4'"):
    space.parse("q4")
  with pytest.raises(ValueError, match="unknown keys"):
    space.from_dict({"bits": 4}, "layers[0]")


def test_compress_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(16, 12)).astype(np.float32)
  # int4, per output channel, symmetric, AQT's int numerics: scale = max|w| / 7.5,
  # codes rounded and clipped to [-7, 7].
  scale = np.abs(w).max(axis=0) / 7.5
  expected = np.clip(np.round(w / scale), -7, 7) * scale
  np.testing.assert_allclose(space.dense(space.compress(w, space.parse("w4"))), expected,
                             rtol=1e-5, atol=1e-6)
  # 50%: the largest half of |w| survive, in float.
  pruned = space.dense(space.compress(w, space.parse("50%")))
  keep = np.abs(w) >= np.median(np.abs(w))
  np.testing.assert_allclose(pruned, np.where(keep, w, 0), atol=1e-6)
  # 2:4 keeps exactly 2 of every 4 consecutive inputs, the two largest.
  nm = space.dense(space.compress(w, space.parse("2:4")))
  groups = np.abs(w).reshape(4, 4, 12)
  top2 = np.sort(groups, axis=1)[:, 2:, :]
  assert ((nm != 0).reshape(4, 4, 12).sum(axis=1) == 2).all()
  np.testing.assert_allclose(np.sort(np.abs(nm).reshape(4, 4, 12), axis=1)[:, 2:], top2,
                             atol=1e-6)
  # r0.5: the best rank-r approximation (Eckart-Young) with r = floor(0.5*16*12/28).
  r = space.factor_rank(0.5, w.shape)
  assert r == 3
  u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  np.testing.assert_allclose(space.dense(space.compress(w, space.parse("r0.5"))),
                             (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5)
  with pytest.raises(ValueError, match="does not apply"):
    space.compress(np.ones((10, 4), np.float32), space.parse("2:4"), "embedding")


# ---------------------------------------------------------------- emulation


def _mixed_plan(model):
  layers = linear_layers(model.params)
  names = ["w8", "w4+a8", "2:4+w4", "50%+w8", "r0.5+w8", "w6+a4", "fp32", "75%+w4"]
  settings = {}
  for layer, name in zip(layers, itertools.cycle(names)):
    s = space.parse(name)
    if space.applies_to(s, np.shape(get_kernel(model.params, layer))) and name != "fp32":
      settings[layer] = s
  return emulate.Plan(settings, heads=(1, 2), mlp=(16, 24))


def test_emulator_computes_what_the_real_policy_builds(model, dataset, emulator):
  plan = _mixed_plan(model)
  weight_only = emulate.Plan({k: v for k, v in plan.settings.items() if v.a_bits is None},
                             plan.heads, plan.mlp)
  real = policy_lib.apply_policy(policy_lib.policy_of(weight_only), model, dataset.calibration)
  assert model_lib.stored_bytes(real) == emulator.stored_bytes(weight_only)
  images = preprocess(jnp.asarray(dataset.validation.images), model.config)
  np.testing.assert_allclose(model_lib.apply(real, images),
                             model_lib.apply(emulator.emulated_model(weight_only), images),
                             rtol=1e-4, atol=1e-4)
  # With activation quantizers the real model calibrates on its compressed
  # weights, the emulator on the float ones: predictions still agree.
  real = policy_lib.apply_policy(policy_lib.policy_of(plan), model, dataset.calibration)
  same = np.mean(evaluate.predictions(real, dataset.validation) ==
                 evaluate.predictions(emulator.emulated_model(plan), dataset.validation))
  assert same >= 0.9
  assert abs(model_lib.stored_bytes(real) - emulator.stored_bytes(plan)) <= 8 * 4
  # The emulator's fp32 plan is the model itself, and compression changes it.
  assert emulator.evaluate(emulate.Plan({})).agreement == 100.0
  assert emulator.evaluate(plan).agreement < 100.0


def test_emulator_refuses_test_images_and_compressed_models(model, dataset):
  with pytest.raises(ValueError, match="test split"):
    emulate.Emulator(model, dataset.test, dataset.calibration)
  with pytest.raises(ValueError, match="training split"):
    emulate.Emulator(model, dataset.validation, dataset.test)
  compressed = policy_lib.apply_policy(policy_lib.CompressionPolicy(
      (policy_lib.LayerRule("head", LayerSetting(w_bits=8)),)), model, dataset.calibration)
  with pytest.raises(ValueError, match="uncompressed"):
    emulate.Emulator(compressed, dataset.validation, dataset.calibration)
  cnn = model_lib.init(CNNConfig(image_size=8, channels=1, num_classes=4, widths=(4,),
                                 blocks=(1,), groups=2), 0)
  with pytest.raises(ValueError, match="auto-tuner needs a ViT"):
    emulate.Emulator(cnn, dataset.validation, dataset.calibration)


# ---------------------------------------------------------------- policies


def test_policy_file_round_trip_and_compress_cli(model, dataset, tmp_path):
  policy = policy_lib.CompressionPolicy(
      (policy_lib.LayerRule(r".*/MlpBlock_3/.*", space.parse("2:4+w8")),
       policy_lib.LayerRule(".*", space.parse("w4"))), heads=(2, 1), mlp=None,
      sites=(("recipe", "fqvit"), ("a_bits", 8)))
  path = policy_lib.save(policy, tmp_path / "p.json")
  assert policy_lib.load(path) == policy
  built = policy_lib.apply_policy(policy, model, dataset.calibration)
  # The op-level recipe ran: fqvit's log2 probabilities feed probs.v.
  assert any(a.endswith("/pv") and type(q.lhs).__name__ == "Logarithmic"
             for a, q in built.sites.items())
  assert built.config.block_heads == (2, 1)
  ckpt = tmp_path / "run" / "model"
  export.save_model(model, ckpt)
  npz = tmp_path / "data"
  npz.mkdir()
  _write_npz(dataset, npz)
  assert cli.main(["compress", str(ckpt), "--policy", str(path), "--out",
                   str(tmp_path / "out"), "--dataset", "npz", "--data-dir", str(npz),
                   "--calib", "16"]) == 0
  loaded = export.load_model(tmp_path / "out")
  assert model_lib.stored_bytes(loaded) == model_lib.stored_bytes(
      policy_lib.apply_policy(policy, model, dataset.calibration.take(slice(0, 16))))


def test_policy_refusals(model, dataset, tmp_path):
  with pytest.raises(ValueError, match="changes nothing"):
    policy_lib.CompressionPolicy()
  rule = lambda p, n="w8": policy_lib.LayerRule(p, space.parse(n))  # noqa: E731
  with pytest.raises(ValueError, match="matches no linear layer"):
    policy_lib.apply_policy(policy_lib.CompressionPolicy((rule("blocks/.*"),)), model,
                            dataset.calibration)
  with pytest.raises(ValueError, match="decides no layer"):
    policy_lib.apply_policy(policy_lib.CompressionPolicy((rule(".*"), rule("head"))), model,
                            dataset.calibration)
  bad = tmp_path / "bad.json"
  for doc, message in (({"format": "x", "version": 1}, "format"),
                       ({"format": "vitjax-policy", "version": 1, "extra": 1}, "keys"),
                       ({"format": "vitjax-policy", "version": 1,
                         "layers": [{"pattern": ".*", "bits": 4}]}, "unknown keys"),
                       ({"format": "vitjax-policy", "version": 1,
                         "sites": {"recipe": "nope"}}, "sites.recipe")):
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
      policy_lib.load(bad)


# ---------------------------------------------------------------- allocation


def test_ilp_is_optimal_and_never_worse_than_greedy():
  rng = np.random.default_rng(0)
  for _ in range(40):
    n, k = int(rng.integers(2, 5)), int(rng.integers(2, 4))
    costs = rng.random((n, k))
    costs[:, 0] = 0.0
    sizes = rng.random((n, k)) * 10
    costs[rng.random((n, k)) < 0.2] = np.nan
    costs[:, 0] = 0.0
    sizes = np.where(np.isnan(costs), np.nan, sizes)
    budget = allocate.minimum_size(sizes) + rng.random() * 8
    exact, rough = allocate.ilp(costs, sizes, budget), allocate.greedy(costs, sizes, budget)
    feasible = [c for c in itertools.product(range(k), repeat=n)
                if not any(np.isnan(costs[i, j]) for i, j in enumerate(c))
                and sum(sizes[i, j] for i, j in enumerate(c)) <= budget]
    best = min(sum(costs[i, j] for i, j in enumerate(c)) for c in feasible)
    assert allocate.total(costs, exact) == pytest.approx(best)
    assert allocate.total(sizes, exact) <= budget + 1e-9
    assert allocate.total(sizes, rough) <= budget + 1e-9
    assert allocate.total(costs, exact) <= allocate.total(costs, rough) + 1e-12
  # Two layers, one sensitive and one not, room to compress only one: the
  # insensitive one is compressed, and the budget holds exactly.
  costs = np.array([[0.0, 5.0], [0.0, 0.1]])
  sizes = np.array([[0.0, -10.0], [0.0, -10.0]])
  for solve in (allocate.ilp, allocate.greedy):
    choice = solve(costs, sizes, -10.0)
    assert list(choice) == [0, 1] and allocate.total(sizes, choice) == -10.0
  with pytest.raises(ValueError, match="below the smallest"):
    allocate.ilp(np.zeros((2, 2)), np.ones((2, 2)), 1.0)
  with pytest.raises(ValueError, match="no allowed option"):
    allocate.greedy(np.array([[np.nan, np.nan]]), np.ones((1, 2)), 5.0)


# ---------------------------------------------------------------- search


def test_non_dominated_sort_and_crowding_by_hand():
  points = [(1, 5), (2, 3), (3, 4), (4, 1), (5, 5), (2, 3)]
  assert search.non_dominated_sort(points) == [[0, 1, 3, 5], [2], [4]]
  assert search.pareto_front(points) == [0, 1, 3]
  d = search.crowding(points, [0, 1, 3])
  assert d[0] == d[3] == float("inf") and d[1] == pytest.approx((4 - 1) / 3 + (5 - 1) / 4)


def _toy(genome):
  """Two objectives over 6 genes of 3 options: sum and the sum of (2 - g)."""
  return float(sum(genome)), float(sum((2 - g) ** 2 for g in genome))


def test_nsga2_is_deterministic_and_finds_the_true_front():
  choices = [[0, 1, 2]] * 6
  config = search.SearchConfig(population=12, evaluations=300, seed=0)
  a = search.nsga2(choices, _toy, config)
  b = search.nsga2(choices, _toy, config)
  assert list(a) == list(b)
  everything = [_toy(g) for g in itertools.product(range(3), repeat=6)]
  true_front = {everything[i] for i in search.pareto_front(everything)}
  found = {list(a.values())[i] for i in search.pareto_front(list(a.values()))}
  assert found == true_front
  assert list(search.nsga2(choices, _toy, search.SearchConfig(12, 300, seed=5))) != list(a)


def test_history_resume_gives_the_uninterrupted_result(tmp_path):
  choices = [[0, 1, 2]] * 5
  config = search.SearchConfig(population=6, evaluations=40, seed=1)
  full = search.nsga2(choices, _toy, config)

  def run(limit):
    history = search.History(tmp_path / "h.jsonl", {"toy": 1})
    done = []

    def evaluate(genome):
      hit = history.get(genome)
      if hit is None:
        if len(done) >= limit:
          raise search.OutOfTime()
        done.append(genome)
        hit = {"genome": list(genome), "objectives": _toy(genome)}
        history.record(hit)
      return hit["objectives"]
    return search.nsga2(choices, evaluate, config), done

  first, done = run(15)  # "killed" after 15 evaluations
  assert len(first) == 15
  with (tmp_path / "h.jsonl").open("a") as f:
    f.write('{"genome": [0, 1')  # the line a kill cut short
  second, done2 = run(1000)
  assert list(second) == list(full) and len(done2) == len(full) - 15
  with pytest.raises(ValueError, match="another search"):
    search.History(tmp_path / "h.jsonl", {"toy": 2})


# ---------------------------------------------------------------- sensitivity


def test_hutchinson_trace_matches_the_exact_hessian_trace(model, dataset):
  calibration = dataset.calibration
  layer = "head"
  traces = sensitivity.hessian_traces(model, calibration, [layer], probes=200,
                                      batch_size=32)
  kernel = get_kernel(model.params, layer)
  images = preprocess(jnp.asarray(calibration.images[:32]), model.config)
  labels = jnp.asarray(calibration.labels[:32])

  def loss(flat):
    params = jax.tree_util.tree_map(lambda a: a, model.params)
    params["head"] = dict(params["head"], kernel=flat.reshape(kernel.shape))
    return losses.cross_entropy(model_lib.apply(model.replace(params=params), images), labels)

  exact = float(jnp.trace(jax.hessian(loss)(kernel.reshape(-1))))
  assert exact > 0
  assert traces[layer] == pytest.approx(exact, rel=0.15)


def test_sensitivity_table_covers_places_and_settings(model, emulator):
  table = sensitivity.measure(emulator, ("fp32", "w4", "2:4+w8"), a_bits=(4,), keeps=(0.5,))
  layers = linear_layers(model.params)
  assert table.places[:len(layers)] == tuple(layers)
  assert table.settings == ("w4", "2:4+w8", "a4", "keep0.5")
  assert np.isnan(table.accuracy[:len(layers), 3]).all()  # keep ratios: blocks only
  assert np.isfinite(table.accuracy[len(layers):, 3]).all()
  plan = emulate.Plan({layers[1]: space.parse("w4")})
  assert table.agreement[1, 0] == emulator.evaluate(plan).agreement
  assert table.bytes[1, 0] == emulator.stored_bytes(plan)
  assert sensitivity.rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 30, "c": 20}) \
      == pytest.approx(0.5)


# ---------------------------------------------------------------- tune


SMALL = tuner.TuneConfig(menu=("fp32", "w8", "w4", "50%+w4"), keeps=(0.5,),
                         sensitivity_a_bits=(8,), eval_images=32, sensitivity_images=32,
                         calibration=32, hessian_probes=2, ilp_budgets=2,
                         search=search.SearchConfig(population=4, evaluations=10, seed=0))


def test_tune_writes_everything_deterministically(model, dataset, tmp_path):
  budget = tuner.Budget(max_drop=5.0)
  a = tuner.tune(model, dataset, budget, tmp_path / "a", SMALL, progress=False)
  b = tuner.tune(model, dataset, budget, tmp_path / "b", SMALL, progress=False)
  for name in ("sensitivity.json", "sensitivity.png", "allocation.json", "front.json",
               "front.png", "policy.json", "best_policy.json", "history.jsonl"):
    assert (tmp_path / "a" / name).exists(), name
  assert a.front == b.front and a.chosen == b.chosen
  assert a.feasible and a.chosen["real_drop"] <= 5.0
  # The saved policy rebuilds the saved model, bit for bit.
  saved = export.load_model(tmp_path / "a" / "model")
  rebuilt = policy_lib.apply_policy(policy_lib.load(tmp_path / "a" / "policy.json"), model,
                                    dataset.calibration.take(slice(0, 32)))
  images = jnp.asarray(dataset.validation.images)
  np.testing.assert_array_equal(evaluate.predictor()(saved, images),
                                evaluate.predictor()(rebuilt, images))
  # The front is non-dominated, and it dominates every other evaluated policy.
  history = [json.loads(line) for line in
             (tmp_path / "a" / "history.jsonl").read_text().splitlines()[1:]]
  points = [(e["drop"], e["bytes"]) for e in history]
  front = [(e["drop"], e["bytes"]) for e in a.front]
  assert not any(search.dominates(p, q) for p in front for q in front)
  assert all(p in front or any(search.dominates(q, p) or q == p for q in front)
             for p in points)
  # The chosen policy is the smallest on the front within the drop.
  feasible = [e for e in a.front if e["drop"] <= 5.0]
  assert a.chosen["bytes"] == min(e["bytes"] for e in feasible)
  allocation = json.loads((tmp_path / "a" / "allocation.json").read_text())
  assert all(r["ilp_cost"] <= r["greedy_cost"] + 1e-9 for r in allocation["budgets"])


def test_tune_resumes_a_stopped_search_to_the_same_front(model, dataset, tmp_path):
  budget = tuner.Budget(max_bytes_ratio=0.3)
  whole = tuner.tune(model, dataset, budget, tmp_path / "whole", SMALL, progress=False)
  stopped = dataclasses.replace(SMALL, time_budget_s=1e-6)
  first = tuner.tune(model, dataset, budget, tmp_path / "r", stopped, progress=False)
  assert first.evaluations < whole.evaluations
  assert (tmp_path / "r" / "best_policy.json").exists()
  resumed = tuner.tune(model, dataset, budget, tmp_path / "r", SMALL, progress=False)
  assert resumed.front == whole.front and resumed.chosen == whole.chosen


def test_tune_reports_the_closest_policy_when_none_meets_the_budget(model, dataset,
                                                                    tmp_path):
  result = tuner.tune(model, dataset, tuner.Budget(max_drop=0.0, max_bytes_ratio=0.01),
                      tmp_path / "t", SMALL, progress=False)
  assert not result.feasible
  about = json.loads((tmp_path / "t" / "policy.json").read_text())["about"]
  assert about["feasible"] is False
  assert (tmp_path / "t" / "model").exists()


def test_a_policy_that_compresses_nothing_is_never_chosen(model, dataset, emulator,
                                                          tmp_path):
  # Only the uncompressed policy meets this budget (as emulated); the tuner
  # must not return (or fail on) it, but the closest compressing policy.
  tspace = tuner.Space(emulator, SMALL)
  n = len(emulator.layers)
  fp32, w4 = tspace.genome([0] * n), tspace.genome([SMALL.menu.index("w4")] * n)
  assert not tuner._compresses(tspace.plan(fp32)) and tuner._compresses(tspace.plan(w4))
  fp32_bytes = emulator.stored_bytes(emulate.Plan({}))
  entries = [{"genome": list(g), "drop": drop, "accuracy": 90.0 - drop, "bytes": b,
              "bytes_ratio": b / fp32_bytes, "evaluation": i}
             for i, (g, drop, b) in enumerate(((fp32, 0.0, fp32_bytes),
                                               (w4, 30.0, fp32_bytes // 7)))]
  budget = tuner.Budget(max_drop=0.5)
  best = {"entry": None}
  for entry in entries:
    tuner._keep_best(best, entry, budget, tspace, tmp_path)
  assert best["entry"]["genome"] == list(w4) and not best["feasible"]
  calibration = dataset.calibration.take(slice(0, 32))
  validation = dataset.validation.take(slice(0, 32))
  chosen, real, feasible = tuner._choose(model, entries, budget, tspace, emulator,
                                         fp32_bytes, calibration, validation, SMALL,
                                         tmp_path, lambda *a: None)
  # Ranked first by its emulated drop, the uncompressed policy is passed over;
  # the compressing one is built and measured for real.
  assert chosen["genome"] == list(w4) and feasible == (chosen["real_drop"] <= 0.5)
  assert model_lib.stored_bytes(real) < fp32_bytes / 2
  with pytest.raises(ValueError, match="no policy that compresses anything"):
    tuner._choose(model, entries[:1], budget, tspace, emulator, fp32_bytes, calibration,
                  validation, SMALL, tmp_path, lambda *a: None)


def test_tune_refusals(model, dataset, tmp_path):
  with pytest.raises(ValueError, match="max_drop or max_bytes_ratio"):
    tuner.Budget()
  for ratio in (0.0, 1.5):
    with pytest.raises(ValueError, match=r"max_bytes_ratio=.* is outside \(0, 1\]"):
      tuner.Budget(max_bytes_ratio=ratio)
  with pytest.raises(ValueError, match="must include 'fp32'"):
    tuner.TuneConfig(menu=("w8",))
  with pytest.raises(ValueError, match="part 'int8'"):
    tuner.TuneConfig(menu=("fp32", "int8"))
  no_validation = dataclasses.replace(dataset, validation=dataset.validation.take(slice(0, 0)))
  with pytest.raises(ValueError, match="validation images"):
    tuner.tune(model, no_validation, tuner.Budget(max_drop=1), tmp_path, SMALL,
               progress=False)


def _write_npz(dataset, directory):
  """The dataset's images as an npz directory the CLI loads (its split of
  validation and calibration images is the loader's own)."""
  train = dataset.train.concat(dataset.validation)
  np.savez(directory / "train.npz", images=train.images, labels=train.labels)
  np.savez(directory / "test.npz", images=dataset.test.images, labels=dataset.test.labels)


def test_tune_cli(model, dataset, tmp_path, capsys):
  ckpt = tmp_path / "run" / "model"
  export.save_model(model, ckpt)
  npz = tmp_path / "data"
  npz.mkdir()
  _write_npz(dataset, npz)
  args = ["tune", str(ckpt), "--max-drop", "50", "--evals", "6", "--population", "4",
          "--menu", "fp32", "w8", "w4", "--keeps", "--eval-images", "32",
          "--sensitivity-images", "32", "--calib", "32", "--dataset", "npz", "--data-dir",
          str(npz), "--out", str(tmp_path / "tuned")]
  assert cli.main(args) == 0
  assert (tmp_path / "tuned" / "policy.json").exists()
  assert export.load_model(tmp_path / "tuned" / "model")
  assert cli.main(args[:2] + ["--evals", "6"]) == 2  # no budget given
  for bad, message in ((["--evals", "0"], "0 is outside [1, inf]"),
                       (["--max-bytes-ratio", "1.5"], "1.5 is outside (0, 1]")):
    with pytest.raises(SystemExit):
      cli.main(args + bad)
    assert message in capsys.readouterr().err
  assert cli.main(args + ["--menu", "fp32", "int8"]) == 2
  assert "part 'int8'" in capsys.readouterr().err


def test_latency_budget_seeds_the_search_from_measured_layer_times(model, dataset, tmp_path):
  layers = linear_layers(model.params)
  times = sensitivity.layer_latency(model, layers, ("fp32", "w8", "2:4+w8"), rounds=2,
                                    calls=3)
  assert times.shape == (len(layers), 3) and (times[np.isfinite(times)] > 0).all()
  result = tuner.tune(model, dataset, tuner.Budget(max_drop=50.0, max_latency_ratio=100.0),
                      tmp_path / "lat", SMALL, progress=False)
  allocation = json.loads((tmp_path / "lat" / "allocation.json").read_text())
  assert allocation["latency"]["ilp_layer_time_ratio"] <= 100.0
  assert "latency_ratio" in result.chosen and result.chosen["latency_ratio"] <= 100.0
  assert (tmp_path / "lat" / "latency.jsonl").exists()

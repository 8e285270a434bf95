"""A small mutation test of vitjax's suite: how many deliberate bugs it catches.

Each mutant replaces one snippet of `vitjax/` (found in exactly one file) by a
wrong variant: a swapped weight, a dropped term, a wrong axis, a skipped
check. For each mutant the script copies the tree to a scratch directory,
applies the change, and runs the suite there with `-x` (stopping at the first
failure), skipping the multi-process and miniature-survey tests, which take
minutes and guard plumbing rather than arithmetic. A mutant the suite still
passes "survives".

  .venv/bin/python tools/mutants.py                 # this checkout
  .venv/bin/python tools/mutants.py --tree DIR      # another checkout (e.g. an
                                                    # older commit, for before/after)

Prints one line per mutant and the count killed / total. The first 22
mutants were written for the code before the test-strength work of
2026-11-25 and scored it before and after; since the whole-ViT quantization
work three of them follow the code they mutate (the calibration shift, the
masked forward pass) or were replaced (the histogram of the unshifted input,
whose code is gone, by the Hessian weights of site calibration). The "new
check:" ones break checks added on 2026-11-25, and are skipped in a tree
without them. `--match TEXT` runs only
the mutants whose name contains TEXT.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

# (name, original snippet, mutated snippet)
MUTANTS: list[tuple[str, str, str]] = [
    ("distill: ce weight on the hard term",
     'terms["hard"] = cfg.hard * hard_label(dist_logits, teacher_top1)',
     'terms["hard"] = cfg.ce * hard_label(dist_logits, teacher_top1)'),
    ("distill: hard label read from the class head",
     'terms["hard"] = cfg.hard * hard_label(dist_logits, teacher_top1)',
     'terms["hard"] = cfg.hard * hard_label(cls_logits, teacher_top1)'),
    ("distill: soft KL without the T^2 factor",
     "log_q = jax.nn.log_softmax(student / temperature, axis=-1)\n"
     "  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)\n  return temperature ** 2 *",
     "log_q = jax.nn.log_softmax(student / temperature, axis=-1)\n"
     "  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)\n  return"),
    ("vit: distillation head reads the class token",
     "dist_token = x[:, cfg.num_prefix_tokens - 1]", "dist_token = x[:, 0]"),
    ("data: flip is a no-op",
     "img = jnp.where(jax.random.bernoulli(flip_key), img[:, ::-1, :], img)",
     "img = jnp.where(jax.random.bernoulli(flip_key), img, img)"),
    ("data: crops never move",
     "off = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)",
     "off = jnp.full((2,), pad)"),
    ("data: every epoch has the same order",
     "order = np.random.default_rng([seed, epoch]).permutation(len(split))",
     "order = np.random.default_rng([seed, 0]).permutation(len(split))"),
    ("export: int4 nibbles swapped",
     "return (lo | (hi << 4)).astype(np.uint8)", "return (hi | (lo << 4)).astype(np.uint8)"),
    ("export: buffer checksum not verified",
     "if hashlib.sha256(buffers[name].tobytes()).hexdigest() != digest:",
     "if False:"),
    ("calibrate: shift of a quarter range",
     "shift = 0.0 if symmetric else -(lo + hi) / 2\n",
     "shift = 0.0 if symmetric else -(lo + hi) / 4\n"),
    ("calibrate: percentile off by a bin",
     "return float(edges[min(i, len(hist.counts) - 1) + 1])",
     "return float(edges[min(i + 1, len(hist.counts) - 1) + 1])"),
    ("calibrate: Hessian weights are gradients, not squared gradients",
     '"g2": None if g is None else jnp.square(_rows(g)[idx])}',
     '"g2": None if g is None else _rows(g)[idx]}'),
    ("quantized: asymmetric shift added back with the wrong sign",
     "y = y - w.act_shift.astype(y.dtype) * colsum",
     "y = y + w.act_shift.astype(y.dtype) * colsum"),
    ("quantized: static activations not shifted",
     "x = x + w.act_shift.astype(x.dtype)", "x = x"),
    ("quantize: QAT without activation bits serves dynamic int8",
     'activations="float" if x.act_bits is None else "dynamic"',
     'activations="dynamic"'),
    ("train: resume restarts the step count",
     "start = int(latest)", "start = 0"),
    ("train: weight average ignores the decay",
     "optax.tree_utils.tree_update_moment(new, state.average, decay, 1)",
     "optax.tree_utils.tree_update_moment(new, state.average, 0.5, 1)"),
    ("lowrank: unbalanced factors",
     "return LowRank(jnp.asarray(self.u[:, :r] * root, jnp.float32),",
     "return LowRank(jnp.asarray(self.u[:, :r] * root * root, jnp.float32),"),
    ("select: exclude ignored",
     "if all(_match(group, layer) for group in include) and not _match(exclude, layer)]",
     "if all(_match(group, layer) for group in include)]"),
    ("evaluate: accuracy of the first half only",
     "return float((predictions(model, split, batch_size) == split.labels).mean())",
     "return float((predictions(model, split, batch_size) == split.labels)"
     "[: max(1, len(split) // 2)].mean())"),
    ("model: FLOPs count one MAC as one FLOP",
     "total += 2 * prod(lhs, lb) * prod(lhs, lc) * prod(lhs, free_l) * prod(rhs, free_r)",
     "total += prod(lhs, lb) * prod(lhs, lc) * prod(lhs, free_l) * prod(rhs, free_r)"),
    ("prune: masked weights not zeroed in the forward pass",
     "return matmul(x, apply_mask(w.w, w.mask))", "return matmul(x, w.w)"),
    # Checks that exist only since 2026-11-25 (absent, and skipped, in older trees).
    ("new check: a failed final rename loses the old checkpoint",
     "  except BaseException:\n    old.rename(path)\n    raise",
     "  except BaseException:\n    raise"),
    ("new check: description digest not verified",
     "if meta[DIGEST_KEY] != description_digest(meta):", "if False:"),
    ("new check: array offsets not verified",
     "if info[\"offset\"] != ends[buffer]:", "if False:"),
    ("new check: an empty selection passes",
     "  if not chosen:\n    raise ValueError(f\"the layer patterns select no layer together",
     "  if False:\n    raise ValueError(f\"the layer patterns select no layer together"),
    ("new check: resume ignores the starting weights",
     "\"initial_weights\": fingerprint(model.params, extra),",
     "\"initial_weights\": \"\","),
    ("new check: --overwrite keeps the old run",
     "    shutil.rmtree(out)\n", "    pass\n"),
    ("new check: pixel statistics ignored",
     "x = (x - jnp.asarray(config.pixel_mean, jnp.float32))",
     "x = (x - jnp.asarray(0.0, jnp.float32))"),
]

SLOW_TESTS = ("test_two_processes", "test_survey_writes_every_method")


def present(tree: pathlib.Path, original: str) -> bool:
  """Whether `original` occurs anywhere under tree/vitjax."""
  return any(original in p.read_text() for p in (tree / "vitjax").rglob("*.py"))


def apply(tree: pathlib.Path, original: str, mutated: str) -> pathlib.Path:
  """Replaces `original` (found in exactly one file under tree/vitjax) by `mutated`.

  Raises:
    ValueError: the snippet is in no file, or in more than one place.
  """
  hits = [p for p in (tree / "vitjax").rglob("*.py") if original in p.read_text()]
  if len(hits) != 1 or hits[0].read_text().count(original) != 1:
    raise ValueError(f"snippet {original!r} found {len(hits)} times in {tree}/vitjax")
  hits[0].write_text(hits[0].read_text().replace(original, mutated))
  return hits[0]


def run(tree: pathlib.Path, python: str, timeout: int, match: str = ""
        ) -> list[tuple[str, bool, float]]:
  """Runs each mutant whose name contains `match` against the suite of `tree`;
  returns (name, killed, seconds). A "new check:" mutant whose snippet the
  tree lacks is skipped (and said); any other missing snippet is an error."""
  results = []
  for name, original, mutated in MUTANTS:
    if match not in name:
      continue
    if name.startswith("new check:") and not present(tree, original):
      print(f"n/a              {name} (not in this tree)", flush=True)
      continue
    with tempfile.TemporaryDirectory() as scratch:
      copy = pathlib.Path(scratch) / "tree"
      shutil.copytree(tree, copy, ignore=shutil.ignore_patterns(
          ".git", ".venv", "checkpoints", "__pycache__", ".pytest_cache", "results"))
      apply(copy, original, mutated)
      start = time.perf_counter()
      try:
        done = subprocess.run(
            [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
             "-k", " and ".join(f"not {t}" for t in SLOW_TESTS)],
            cwd=copy, env={**_env(copy)}, capture_output=True, text=True, timeout=timeout)
        killed = done.returncode != 0
      except subprocess.TimeoutExpired:
        killed = True  # a hang is a failure the suite reports
      seconds = time.perf_counter() - start
    results.append((name, killed, seconds))
    print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:6.0f} s  {name}", flush=True)
  return results


def _env(copy: pathlib.Path) -> dict[str, str]:
  import os
  env = dict(os.environ)
  env["PYTHONPATH"] = str(copy)  # the mutated package, not the installed one
  return env


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tree", default=str(pathlib.Path(__file__).parents[1]),
                      help="the checkout whose vitjax/ and tests/ are mutated and run")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
  parser.add_argument("--match", default="", help="only mutants whose name contains this")
  args = parser.parse_args()
  results = run(pathlib.Path(args.tree).resolve(), sys.executable, args.timeout, args.match)
  killed = sum(k for _, k, _ in results)
  print(f"{killed} killed / {len(results)} mutants ({len(results) - killed} survived)")


if __name__ == "__main__":
  main()

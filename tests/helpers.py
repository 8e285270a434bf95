"""Shared test helpers: tiny configs and learnable synthetic data."""

import numpy as np
import pytest

from vitjax import data as data_lib
from vitjax.models.config import ViTConfig

# A model small enough that a training step compiles and runs in about a second.
TINY = ViTConfig(image_size=8, patch_size=4, channels=1, num_classes=4, dim=16,
                 depth=2, num_heads=2, mlp_dim=32)


# The survey's presets shrunk to models that train in seconds.
MINI_TEACHER = TINY.replace(dim=16, depth=2, num_heads=2, mlp_dim=32)
MINI_STUDENT = MINI_TEACHER.replace(dim=8, mlp_dim=16, distilled=True)


def synthetic_split(n: int, config: ViTConfig = TINY, seed: int = 0) -> data_lib.Split:
  """Learnable synthetic images: class k lights up quadrant k (plus noise)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, config.num_classes, n).astype(np.int32)
  s = config.image_size
  images = rng.integers(0, 60, (n, s, s, config.channels)).astype(np.uint8)
  half = s // 2
  for i, k in enumerate(labels):
    r, c = divmod(int(k) % 4, 2)
    images[i, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
  return data_lib.Split(images, labels)


def synthetic_dataset(n_train: int = 512, n_test: int = 128,
                      config: ViTConfig = TINY) -> data_lib.Dataset:
  return data_lib.make_dataset(synthetic_split(n_train + 64, config, 0),
                               synthetic_split(n_test, config, 1), "synthetic",
                               validation=32, calibration=32)


def noisy_model(config: ViTConfig = TINY, seed: int = 0, scale: float = 0.3):
  """A model whose every weight is non-trivial (the init zeroes the head and
  biases): the init plus Gaussian noise of std `scale`."""
  from vitjax import model as model_lib
  m = model_lib.init(config, seed)
  return m.replace(params=with_noise(m.params, seed + 1000, scale))


def fashion_available() -> bool:
  try:
    data_lib.find_fashion_dir(None)
    return True
  except data_lib.DatasetError:
    return False


needs_fashion = pytest.mark.skipif(not fashion_available(),
                                   reason="Fashion-MNIST files not installed")


def assert_params_close(a, b, atol: float = 1e-5) -> None:
  """Leaf-by-leaf |a - b| <= atol, except attention key biases.

  A key bias shifts every attention logit of a query by the same amount, which
  softmax ignores: its true gradient is exactly zero, and Adam's first step
  turns the rounding noise of that zero (which differs with the reduction
  order, e.g. across device counts) into steps of up to lr. Every other
  parameter must agree.
  """
  import jax
  from vitjax import model as model_lib
  flat_a = jax.tree_util.tree_flatten_with_path(a.params)[0]
  flat_b = jax.tree_util.tree_leaves(b.params)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    name = model_lib.path_str(path)
    if name.endswith("key/bias"):
      continue
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=name)


def multiprocess_run_setup():
  """(teacher, student, split, TrainConfig, DistillConfig) of the 2-process
  run in multiprocess_run_worker.py; the single-process reference uses the same."""
  from vitjax import distill, train
  from vitjax import model as model_lib
  from vitjax.models.cnn import CNNConfig
  teacher = model_lib.init(CNNConfig(image_size=8, channels=1, num_classes=4, widths=(8, 16),
                                     blocks=(1, 1), groups=4), 1)
  teacher = teacher.replace(params=with_noise(teacher.params, 3))
  student = model_lib.init(TINY.replace(dim=8, num_heads=2, mlp_dim=16, distilled=True), 2)
  cfg = train.TrainConfig(steps=6, batch_size=16, warmup_steps=1, fsdp=True,
                          checkpoint_every=2, log_every=1)
  return teacher, student, synthetic_split(64), cfg, distill.DistillConfig(ce=0.5, hard=0.5)


def with_noise(params, seed: int, scale: float = 0.3):
  """`params` plus Gaussian noise of std `scale` (non-trivial weights), drawn
  by NumPy: `jax.random.normal` would compile a program per leaf shape."""
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape),
                            np.float32), params)


def count_model_writes() -> list[int]:
  """Makes `export._write_model` count its calls in this process: returns a
  one-item list whose item is the count so far (the multi-process workers
  print it, to show that only process 0 writes the export)."""
  from vitjax import export
  count = [0]
  write_model = export._write_model

  def counting_write(*args, **kwargs):
    count[0] += 1
    return write_model(*args, **kwargs)

  export._write_model = counting_write
  return count

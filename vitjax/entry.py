"""Console entry point: prepares XLA's CPU devices, then runs `vitjax.cli`.

On a CPU host, data-parallel training over several XLA CPU devices (one per
core, up to 8, a power of two so batches split evenly) is about 25% faster than
one device using all cores (measured on this project's 2-core machines), and
single-device inference is unchanged. The split is made only when XLA_FLAGS
does not already set a host device count and VITJAX_CPU_DEVICES is not "1";
it has no effect on GPU or TPU, whose devices JAX uses instead.

The entry point also turns on JAX's persistent compilation cache in
`~/.cache/vitjax/xla` (at most 2 GB, least recently used first out): the
survey compiles many identical programs (prune-50% and prune-2:4 fine-tune
the same masked structure; student rows share a forward pass), and a second
run of any command skips XLA's compile time. JAX_COMPILATION_CACHE_DIR names
another directory; VITJAX_COMPILE_CACHE=off turns the cache off.
"""

from __future__ import annotations

import os
import sys


def cpu_device_flag(cores: int | None) -> str:
  """The XLA flag splitting the host into a power-of-two number of devices (<= 8)."""
  n = 1
  while n * 2 <= min(cores or 1, 8):
    n *= 2
  return f"--xla_force_host_platform_device_count={n}"


def with_cpu_devices(flags: str, cores: int | None) -> str:
  """`flags` (an `XLA_FLAGS` value) with `cpu_device_flag(cores)` appended,
  or unchanged when it already sets the host device count."""
  if "xla_force_host_platform_device_count" in flags:
    return flags
  return f"{flags} {cpu_device_flag(cores)}".strip()


CACHE_DIR = os.path.join("~", ".cache", "vitjax", "xla")
CACHE_BYTES = 2 * 1024**3


def compile_cache_env(environ: dict[str, str]) -> dict[str, str]:
  """The JAX settings (environment variables) of the persistent compilation
  cache to add to `environ`: empty when VITJAX_COMPILE_CACHE is "off" or the
  user set JAX_COMPILATION_CACHE_DIR (theirs is kept); a size bound the user
  set is kept too. JAX keeps every compile of a second or more (its default).

  Raises:
    ValueError: VITJAX_COMPILE_CACHE is neither "on", "off" nor unset.
  """
  choice = environ.get("VITJAX_COMPILE_CACHE", "on")
  if choice not in ("on", "off"):
    raise ValueError(f"VITJAX_COMPILE_CACHE={choice!r}; choose 'on' or 'off'")
  if choice == "off" or "JAX_COMPILATION_CACHE_DIR" in environ:
    return {}
  ours = {"JAX_COMPILATION_CACHE_DIR": os.path.expanduser(CACHE_DIR),
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_BYTES)}
  return {k: v for k, v in ours.items() if k not in environ}


def main() -> int:
  try:
    os.environ.update(compile_cache_env(dict(os.environ)))
  except ValueError as e:
    print(f"vitjax: {e}", file=sys.stderr)
    return 2
  requested = os.environ.get("VITJAX_CPU_DEVICES")
  if requested != "1":
    os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""),
                                               int(requested) if requested else os.cpu_count())
  from vitjax import cli  # imports JAX, after the flag is set
  return cli.main()


if __name__ == "__main__":
  sys.exit(main())

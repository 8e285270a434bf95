"""vitjax's own int8 x int8 -> int32 matmul for XLA's CPU backend.

XLA's CPU int8 dot (YNNPACK in jaxlib 0.10) reaches 37-138 GMAC/s on the
project's 2-core EPYC with AVX-512 VNNI, where PyTorch's fbgemm reaches
87-334 (benchmarks/RESULTS.md); no library of the JAX ecosystem offers a
faster CPU int8 GEMM. So vitjax carries one: `cpu_int8.cc`, an XLA FFI
custom call with an AMX tile kernel (Intel Sapphire Rapids and later) and an
AVX-512 VNNI microkernel (a plain C++ loop on other CPUs), compiled on first
use with the machine's C++ compiler (`CXX`, else g++ or c++) against jaxlib's
FFI headers and cached under `~/.cache/vitjax/kernels/` (or
`$VITJAX_KERNEL_CACHE`).

The weight is packed once (`pack`: VNNI layout and column sums), so a call
costs only the product. The result is the exact int32 product, so a model
that uses the kernel computes bit-identical logits to XLA's dot.

`QuantizedWeight` leaves carry a `PackedInt8` when a model is prepared with
`vitjax.model.use_cpu_int8_kernel`; their AQT dot then calls `dot_general`
below. The kernel runs forward only (no gradient) and on the CPU backend
only; `vitjax.model.portable` removes it again, and saving or exporting a
model does so itself.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name("cpu_int8.cc")
TARGET = "vitjax_cpu_int8_matmul"
STRIP = 64  # columns per packed strip (cpu_int8.cc: kStripCols)

Isa = Literal["amx", "avx512-vnni", "generic"]
ISAS: tuple[Isa, ...] = ("generic", "avx512-vnni", "amx")  # slowest first; code = index


class KernelUnavailable(RuntimeError):
  """The kernel cannot be built or loaded here (no C++ compiler, no CPU backend)."""


def cache_dir() -> pathlib.Path:
  """Where built kernels are kept: `$VITJAX_KERNEL_CACHE`, else
  ~/.cache/vitjax/kernels."""
  root = os.environ.get("VITJAX_KERNEL_CACHE")
  return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "vitjax" / "kernels"


def _compiler() -> str:
  for name in filter(None, (os.environ.get("CXX"), "g++", "c++")):
    path = shutil.which(name)
    if path:
      return path
  raise KernelUnavailable(
      "vitjax's CPU int8 kernel is compiled on first use, but no C++ compiler was found "
      f"(tried $CXX={os.environ.get('CXX')!r}, g++, c++); install g++ (Debian: "
      "apt-get install g++) or point CXX at one")


def _build(compiler: str) -> pathlib.Path:
  """The shared library for this source, compiler and jaxlib, built if missing.

  Raises:
    KernelUnavailable: the compiler failed (its message is included), or the
      cache directory cannot be written.
  """
  include = jax.ffi.include_dir()
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", f"-I{include}"]
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, version, include,
                                  jax.__version__, *flags]).encode()).hexdigest()[:16]
  target = cache_dir() / key / "libvitjax_cpu_int8.so"
  if target.exists():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: a concurrent build (two
    # test workers) or an interrupted one never leaves a partial library there.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  except OSError as e:
    raise KernelUnavailable(f"the kernel's build directory {target.parent} is not writable "
                            f"({e}); set VITJAX_KERNEL_CACHE to a writable directory") from e
  os.close(fd)
  try:
    done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True,
                          text=True)
    if done.returncode != 0:
      raise KernelUnavailable(f"compiling {SOURCE.name} with {compiler} failed:\n"
                              f"{done.stderr[-4000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


_LOCK = threading.Lock()


def _library() -> ctypes.CDLL:
  """The kernel's library, built and registered once per process."""
  with _LOCK:  # compile threads (evaluate.precompile) may ask first together
    return _load()


@functools.cache
def _load() -> ctypes.CDLL:
  lib = ctypes.cdll.LoadLibrary(str(_build(_compiler())))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.vitjax_cpu_int8_matmul),
                              platform="cpu")
  return lib


def isa() -> Isa:
  """The fastest code path of the kernel on this CPU, which it runs unless
  told otherwise: "amx" (AMX tiles for layers whose K is a multiple of 64,
  AVX-512 VNNI for the others), "avx512-vnni", or "generic" (a plain loop,
  far slower than XLA's own dot).

  Raises:
    KernelUnavailable: no C++ compiler, or the build failed.
  """
  return ISAS[_library().vitjax_cpu_int8_isa()]


def available() -> tuple[Isa, ...]:
  """Every code path this CPU can run, fastest first (`isa()`, then the
  slower ones down to "generic"); empty where the kernel cannot be built."""
  try:
    fastest = ISAS.index(isa())
  except KernelUnavailable:
    return ()
  return ISAS[fastest::-1]


def check_isa(path: Isa | None) -> None:
  """Refuses a code path this CPU cannot run (None, the fastest, is always
  allowed where the kernel builds).

  Raises:
    ValueError: `path` is not one of `ISAS`, or this CPU lacks it.
    KernelUnavailable: the kernel cannot be built here.
  """
  if path is None:
    return
  if path not in ISAS:
    raise ValueError(f"isa={path!r}: the kernel's code paths are {list(ISAS)} (or None for "
                     "the fastest this CPU has)")
  here = ISAS[ISAS.index(isa())::-1]
  if path not in here:
    raise ValueError(f"isa={path!r}: this CPU runs only {list(here)}")


def fast_here() -> bool:
  """Whether the kernel has a fast path (AMX or AVX-512 VNNI) on this
  machine's CPU backend; False where it cannot be built."""
  if jax.default_backend() != "cpu":
    return False
  try:
    return isa() != "generic"
  except KernelUnavailable:
    return False


@flax.struct.dataclass
class PackedInt8:
  """A (K, N) int8 weight in the kernel's layout.

  Attributes:
    data: (ceil(N/64), ceil(K/4), 256) int8, zero-padded: strips of 64
      columns, 4 consecutive K values per column (cpu_int8.cc).
    corr: (ceil(N/64) * 64,) int32, 128 times each column's sum.
    isa: the code path the kernel runs on this weight (`ISAS`), or None for
      the fastest this CPU has (`isa()`).
  """

  data: jax.Array
  corr: jax.Array
  isa: Isa | None = flax.struct.field(pytree_node=False, default=None)


def pack(w: jax.Array, isa: Isa | None = None) -> PackedInt8:
  """The kernel's layout of an integer weight `w` (K, N) (int8, or int4 and
  narrower, which are widened exactly), to run on code path `isa` (None: the
  fastest this CPU has).

  Raises:
    ValueError: `w` is not a 2-D integer array of at most 8 bits, or `isa`
      names a path this CPU lacks (`check_isa`).
  """
  check_isa(isa)
  return _pack(w).replace(isa=isa)


@jax.jit
def _pack(w: jax.Array) -> PackedInt8:
  if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.integer) or jnp.iinfo(w.dtype).bits > 8:
    raise ValueError(f"pack takes a (K, N) integer weight of at most 8 bits; got "
                     f"{w.dtype}{list(w.shape)}")
  k, n = w.shape
  kq, strips = -(-k // 4), -(-n // STRIP)
  b = jnp.pad(w.astype(jnp.int8), ((0, kq * 4 - k), (0, strips * STRIP - n)))
  # [kq, r, s, v, col] -> [s, kq, v, col, r]
  data = b.reshape(kq, 4, strips, 4, 16).transpose(2, 0, 3, 4, 1).reshape(strips, kq, 256)
  corr = 128 * b.astype(jnp.int32).sum(0)
  return PackedInt8(data=data, corr=corr)


def matmul(a: jax.Array, packed: PackedInt8, n: int) -> jax.Array:
  """The exact int32 product of int8 `a` (..., K) and the weight `packed`
  holds (K, n) -> (..., n), by the kernel (CPU backend only) on the code path
  `packed.isa` names.

  Raises:
    ValueError: `a` is not int8, or its K does not match the packed weight.
    KernelUnavailable: the kernel cannot be built here.
  """
  if a.dtype != jnp.int8:
    raise ValueError(f"matmul takes int8 activations; got {a.dtype}")
  strips, kq, _ = packed.data.shape
  if -(-a.shape[-1] // 4) != kq or -(-n // STRIP) != strips:
    raise ValueError(f"activations of {a.shape[-1]} features and {n} outputs do not match "
                     f"the packed weight ({kq * 4} rows, {strips * STRIP} columns, padded)")
  _library()
  flat = a.reshape(math.prod(a.shape[:-1]), a.shape[-1])
  out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((flat.shape[0], n), jnp.int32),
                         vmap_method="sequential")(
                             flat, packed.data, packed.corr,
                             isa=np.int32(-1 if packed.isa is None else ISAS.index(packed.isa)))
  return out.reshape(*a.shape[:-1], n)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, *, packed: PackedInt8) -> jax.Array:
  """`lax.dot_general` of integer `lhs` (..., K) and the (K, N) weight `rhs`
  by the kernel, from `packed` (the layout of `rhs`): the hook AQT's
  `DotGeneralRaw.dot_general` takes for a QuantizedWeight that carries a
  packed copy. Integer lhs of at most 8 bits are widened to int8.

  Raises:
    ValueError: the operands are not an integer (..., K) x (K, N) product
      contracting lhs's last axis with rhs's first, or the result type is
      not int32.
  """
  del precision
  (lc, rc), (lb, rb) = dimension_numbers
  integer = all(jnp.issubdtype(x.dtype, jnp.integer) and jnp.iinfo(x.dtype).bits <= 8
                for x in (lhs, rhs))
  if (not integer or rhs.ndim != 2 or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,)
      or lb or rb or jnp.dtype(preferred_element_type or jnp.int32) != jnp.int32):
    raise ValueError(
        f"the CPU int8 kernel multiplies integer (..., K) x (K, N) into int32; got "
        f"{lhs.dtype}{list(lhs.shape)} x {rhs.dtype}{list(rhs.shape)}, dimension numbers "
        f"{dimension_numbers}, result {preferred_element_type}")
  return matmul(lhs.astype(jnp.int8), packed, rhs.shape[1])

// int8 x int8 -> int32 matrix multiply for XLA's CPU backend, as an XLA FFI
// custom call (target "vitjax_cpu_int8_matmul"); built and loaded by
// vitjax/kernels/cpu_int8.py.
//
//   C[M, N] = A[M, K] . B[K, N]   (A, B int8; C int32, exact)
//
// B arrives packed once per model (cpu_int8.pack): strips of 64 columns, and
// within a strip, for every 4 rows of K, 64 bytes per 16 columns holding
// those columns' 4 consecutive K values: data[s][kq][v * 64 + n * 4 + r] =
// B[4 kq + r][64 s + 16 v + n], zero-padded. `corr` holds 128 * the column
// sums of B. With AVX-512 VNNI, `vpdpbusd` multiplies unsigned by signed
// bytes, so A is offset by 128 on the fly (a xor 0x80) and 128 * colsum(B) is
// subtracted again: the result is the exact int32 product. Without VNNI a
// plain loop computes the same numbers.
//
// Work is split into tasks of (48 rows, one strip), shared with XLA's
// intra-op thread pool; the calling thread takes tasks too, so the call
// completes even when no pool thread is free.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kStripCols = 64;    // columns per strip
constexpr int64_t kQuadBytes = 256;   // bytes per strip per 4 rows of K
constexpr int64_t kTaskRows = 48;     // rows of A per task
constexpr int kTileRows = 6;          // rows per register tile

// One strip of rows [0, rows) of C, in plain C++: the reference numbers.
void strip_generic(const int8_t* a, int64_t lda, int64_t rows, const int8_t* bp, int64_t kq_count,
                   const int32_t* corr, int32_t* c, int64_t ldc, int64_t ncols) {
  for (int64_t i = 0; i < rows; ++i) {
    int32_t acc[kStripCols] = {0};
    for (int64_t kq = 0; kq < kq_count; ++kq) {
      const int8_t* q = bp + kq * kQuadBytes;
      for (int r = 0; r < 4; ++r) {
        const int32_t av = static_cast<int32_t>(a[i * lda + kq * 4 + r]) + 128;
        for (int64_t j = 0; j < kStripCols; ++j) acc[j] += av * q[(j / 16) * 64 + (j % 16) * 4 + r];
      }
    }
    for (int64_t j = 0; j < ncols; ++j) c[i * ldc + j] = acc[j] - corr[j];
  }
}

#if defined(__x86_64__)
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))

// vpdpbusd as inline assembly: GCC 12's intrinsic copies the accumulator
// through another register at every use, which doubles the loop's
// instructions and halved the kernel's speed.
#define DPBUSD(acc, u8, s8) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8))

// A register tile of MR rows x NV 16-column vectors, over all of K. The
// accumulators are named variables: GCC keeps an array of vectors on the stack.
template <int MR, int NV>
VNNI_TARGET inline void tile(const int8_t* a, int64_t lda, const int8_t* bp, int64_t kq_count,
                             const int32_t* corr, int32_t* c, int64_t ldc, int64_t ncols) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i c00 = zero, c01 = zero, c02 = zero, c03 = zero;
  __m512i c10 = zero, c11 = zero, c12 = zero, c13 = zero;
  __m512i c20 = zero, c21 = zero, c22 = zero, c23 = zero;
  __m512i c30 = zero, c31 = zero, c32 = zero, c33 = zero;
  __m512i c40 = zero, c41 = zero, c42 = zero, c43 = zero;
  __m512i c50 = zero, c51 = zero, c52 = zero, c53 = zero;
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512i b0 = zero, b1 = zero, b2 = zero, b3 = zero;
#define ROW(i)                                                          \
  if constexpr (MR > i) {                                               \
    int32_t q;                                                          \
    std::memcpy(&q, a + i * lda + kq * 4, 4);                           \
    const __m512i av = _mm512_xor_si512(_mm512_set1_epi32(q), flip);    \
    DPBUSD(c##i##0, av, b0);                                            \
    if constexpr (NV > 1) DPBUSD(c##i##1, av, b1);                      \
    if constexpr (NV > 2) DPBUSD(c##i##2, av, b2);                      \
    if constexpr (NV > 3) DPBUSD(c##i##3, av, b3);                      \
  }
  for (int64_t kq = 0; kq < kq_count; ++kq) {
    const int8_t* q = bp + kq * kQuadBytes;
    b0 = _mm512_loadu_si512(q);
    if constexpr (NV > 1) b1 = _mm512_loadu_si512(q + 64);
    if constexpr (NV > 2) b2 = _mm512_loadu_si512(q + 128);
    if constexpr (NV > 3) b3 = _mm512_loadu_si512(q + 192);
    ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
  }
#undef ROW
#define STORE(i, v)                                                                   \
  if constexpr (MR > i && NV > v)                                                     \
    _mm512_mask_storeu_epi32(c + i * ldc + v * 16, mask##v, _mm512_sub_epi32(c##i##v, k##v));
  auto mask_of = [ncols](int v) -> __mmask16 {
    const int64_t left = ncols - v * 16;
    return left >= 16 ? static_cast<__mmask16>(0xFFFF)
                       : static_cast<__mmask16>((1u << std::max<int64_t>(left, 0)) - 1);
  };
  const __mmask16 mask0 = mask_of(0), mask1 = mask_of(1), mask2 = mask_of(2), mask3 = mask_of(3);
  const __m512i k0 = _mm512_loadu_si512(corr), k1 = _mm512_loadu_si512(corr + 16);
  const __m512i k2 = _mm512_loadu_si512(corr + 32), k3 = _mm512_loadu_si512(corr + 48);
  STORE(0, 0) STORE(0, 1) STORE(0, 2) STORE(0, 3)
  STORE(1, 0) STORE(1, 1) STORE(1, 2) STORE(1, 3)
  STORE(2, 0) STORE(2, 1) STORE(2, 2) STORE(2, 3)
  STORE(3, 0) STORE(3, 1) STORE(3, 2) STORE(3, 3)
  STORE(4, 0) STORE(4, 1) STORE(4, 2) STORE(4, 3)
  STORE(5, 0) STORE(5, 1) STORE(5, 2) STORE(5, 3)
#undef STORE
}

template <int NV>
VNNI_TARGET void strip_rows(const int8_t* a, int64_t lda, int64_t rows, const int8_t* bp,
                            int64_t kq_count, const int32_t* corr, int32_t* c, int64_t ldc,
                            int64_t ncols) {
  int64_t i = 0;
  for (; i + kTileRows <= rows; i += kTileRows)
    tile<kTileRows, NV>(a + i * lda, lda, bp, kq_count, corr, c + i * ldc, ldc, ncols);
  const int8_t* ai = a + i * lda;
  int32_t* ci = c + i * ldc;
  switch (rows - i) {
    case 5: tile<5, NV>(ai, lda, bp, kq_count, corr, ci, ldc, ncols); break;
    case 4: tile<4, NV>(ai, lda, bp, kq_count, corr, ci, ldc, ncols); break;
    case 3: tile<3, NV>(ai, lda, bp, kq_count, corr, ci, ldc, ncols); break;
    case 2: tile<2, NV>(ai, lda, bp, kq_count, corr, ci, ldc, ncols); break;
    case 1: tile<1, NV>(ai, lda, bp, kq_count, corr, ci, ldc, ncols); break;
    default: break;
  }
}

VNNI_TARGET void strip_vnni(const int8_t* a, int64_t lda, int64_t rows, const int8_t* bp,
                            int64_t kq_count, const int32_t* corr, int32_t* c, int64_t ldc,
                            int64_t ncols) {
  switch ((ncols + 15) / 16) {
    case 4: strip_rows<4>(a, lda, rows, bp, kq_count, corr, c, ldc, ncols); break;
    case 3: strip_rows<3>(a, lda, rows, bp, kq_count, corr, c, ldc, ncols); break;
    case 2: strip_rows<2>(a, lda, rows, bp, kq_count, corr, c, ldc, ncols); break;
    default: strip_rows<1>(a, lda, rows, bp, kq_count, corr, c, ldc, ncols); break;
  }
}

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}
#else
bool cpu_has_vnni() { return false; }
#endif

using StripFn = void (*)(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, const int32_t*,
                         int32_t*, int64_t, int64_t);

// The VNNI path where the CPU has it, unless VITJAX_CPU_INT8_ISA=generic asks
// for the plain loop (tests of the reference path on any CPU).
bool use_vnni() {
  const char* want = std::getenv("VITJAX_CPU_INT8_ISA");
  return cpu_has_vnni() && !(want != nullptr && std::strcmp(want, "generic") == 0);
}

StripFn strip_fn() {
#if defined(__x86_64__)
  static const StripFn fn = use_vnni() ? strip_vnni : strip_generic;
#else
  static const StripFn fn = strip_generic;
#endif
  return fn;
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::S8> packed,
                      ffi::Buffer<ffi::S32> corr, ffi::ResultBuffer<ffi::S32> out) {
  const auto ad = a.dimensions(), pd = packed.dimensions(), od = out->dimensions();
  if (ad.size() != 2 || pd.size() != 3 || od.size() != 2 || pd[2] != kQuadBytes)
    return ffi::Error::InvalidArgument(
        "vitjax_cpu_int8_matmul takes a (M, K) int8 matrix, packed (S, ceil(K/4), 256) int8 "
        "weights and returns (M, N) int32");
  const int64_t M = ad[0], K = ad[1], strips = pd[0], kq_count = pd[1], N = od[1];
  if (od[0] != M || kq_count != (K + 3) / 4 || strips != (N + kStripCols - 1) / kStripCols ||
      corr.element_count() != static_cast<size_t>(strips * kStripCols))
    return ffi::Error::InvalidArgument(
        "vitjax_cpu_int8_matmul: operand shapes disagree (packed weights of another layer?)");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int8_t* ap = a.typed_data();
  int64_t lda = K;
  std::vector<int8_t> padded;
  if (K % 4 != 0) {  // rows padded with zeros to whole groups of 4
    lda = kq_count * 4;
    padded.assign(static_cast<size_t>(M * lda), 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(&padded[m * lda], ap + m * K, K);
    ap = padded.data();
  }
  const int8_t* bp = packed.typed_data();
  const int32_t* cp = corr.typed_data();
  int32_t* op = out->typed_data();
  const StripFn strip = strip_fn();
  const int64_t row_tasks = (M + kTaskRows - 1) / kTaskRows, tasks = row_tasks * strips;
  auto run = [=](Progress& p) {
    for (int64_t t; (t = p.next.fetch_add(1)) < tasks;) {
      const int64_t m0 = (t / strips) * kTaskRows, s = t % strips;
      const int64_t col0 = s * kStripCols;
      strip(ap + m0 * lda, lda, std::min(kTaskRows, M - m0), bp + s * kq_count * kQuadBytes,
            kq_count, cp + col0, op + m0 * N + col0, N, std::min(kStripCols, N - col0));
      p.done.fetch_add(1);
    }
  };
  // Helpers share the counters through a shared_ptr: one that starts after
  // every task is taken finds none and touches nothing else of this call.
  auto progress = std::make_shared<Progress>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([progress, run]() { run(*progress); });
  run(*progress);
  while (progress->done.load() < tasks) {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(vitjax_cpu_int8_matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

// 1 when the AVX-512 VNNI path runs, 0 for the plain loop.
extern "C" int vitjax_cpu_int8_isa() { return strip_fn() == strip_generic ? 0 : 1; }

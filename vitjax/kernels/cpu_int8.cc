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
// sums of B. Three code paths compute the same exact int32 product; a call
// runs the one its "isa" attribute names, or the fastest this CPU has:
//  - AMX (Intel Sapphire Rapids and later, with the kernel's permission to use
//    tile data, ARCH_REQ_XCOMP_PERM): `tdpbssd` multiplies signed by signed
//    bytes in 16 x 16 int32 tiles. A packed strip is already a column of AMX
//    B tiles: 16 quads of K (rows 256 bytes apart) by 16 columns, so AMX reads
//    the same packing. It needs K to be a multiple of 64 (whole tiles);
//    other layers take the VNNI path.
//  - AVX-512 VNNI: `vpdpbusd` multiplies unsigned by signed bytes, so A is
//    offset by 128 on the fly (a xor 0x80) and 128 * colsum(B) is subtracted
//    again.
//  - Otherwise a plain loop.
//
// Work is split into tasks of (48 rows, one strip), shared with XLA's
// intra-op thread pool; the calling thread takes tasks too, so the call
// completes even when no pool thread is free. Small products (under 2^22
// multiply-adds on VNNI, 2^24 on AMX: about 15 us of one core) run on the
// calling thread alone, because waking a pool thread costs more than it saves.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
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

#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vnni")))

// The tile configuration of palette 1: every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// C[16 * MB rows, 32 columns] = A[16 * MB rows, K] . B[K, columns v0 * 16 ..
// v0 * 16 + 31 of a strip], in tiles 0-3 (C), 4-5 (A) and 6-7 (B).
template <int MB>
AMX_TARGET void amx_block(const int8_t* a, int64_t lda, const int8_t* bp, int64_t kq_count,
                          int32_t* c, int64_t ldc) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (MB > 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kq = 0; kq < kq_count; kq += 16) {
    _tile_loadd(6, bp + kq * kQuadBytes, kQuadBytes);
    _tile_loadd(7, bp + kq * kQuadBytes + 64, kQuadBytes);
    _tile_loadd(4, a + kq * 4, lda);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if constexpr (MB > 1) {
      _tile_loadd(5, a + 16 * lda + kq * 4, lda);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  const int64_t stride = ldc * 4;
  _tile_stored(0, c, stride);
  _tile_stored(1, c + 16, stride);
  if constexpr (MB > 1) {
    _tile_stored(2, c + 16 * ldc, stride);
    _tile_stored(3, c + 16 * ldc + 16, stride);
  }
}

// Tiles are configured once per thread and call (amx_begin), and released
// when that thread has no more tasks of the call (amx_end).
AMX_TARGET void amx_begin() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

AMX_TARGET void amx_end() { _tile_release(); }

// One strip by AMX tiles: blocks of 32 (then 16) rows by 32 columns. Blocks
// that overhang C (the last rows, the padded columns of the last strip) are
// computed from zero-padded rows of A into a local tile and copied out.
AMX_TARGET void strip_amx_tiles(const int8_t* a, int64_t lda, int64_t rows, const int8_t* bp,
                                int64_t kq_count, int32_t* c, int64_t ldc, int64_t ncols) {
  alignas(64) int32_t local[32 * 32];
  thread_local std::vector<int8_t> padded;
  for (int64_t i = 0; i < rows;) {
    const int64_t left = rows - i;
    const int mb = left >= 32 ? 2 : 1;
    const int64_t block_rows = std::min<int64_t>(left, 16 * mb);
    const int8_t* ai = a + i * lda;
    if (block_rows < 16) {  // fewer rows than a tile: pad them with zeros
      padded.assign(static_cast<size_t>(16 * lda), 0);
      std::memcpy(padded.data(), ai, static_cast<size_t>(block_rows * lda));
      ai = padded.data();
    }
    for (int64_t j = 0; j < ncols; j += 32) {
      const bool whole = block_rows == 16 * mb && j + 32 <= ncols;
      int32_t* out = whole ? c + i * ldc + j : local;
      const int64_t ld = whole ? ldc : 32;
      if (mb == 2)
        amx_block<2>(ai, lda, bp + j * 4, kq_count, out, ld);
      else
        amx_block<1>(ai, lda, bp + j * 4, kq_count, out, ld);
      if (!whole) {
        const int64_t cols = std::min<int64_t>(32, ncols - j);
        for (int64_t r = 0; r < block_rows; ++r)
          std::memcpy(c + (i + r) * ldc + j, local + r * 32, static_cast<size_t>(cols * 4));
      }
    }
    i += block_rows;
  }
}

// AMX where K is whole tiles (a multiple of 64), VNNI otherwise.
AMX_TARGET void strip_amx(const int8_t* a, int64_t lda, int64_t rows, const int8_t* bp,
                          int64_t kq_count, const int32_t* corr, int32_t* c, int64_t ldc,
                          int64_t ncols) {
  if (kq_count % 16 != 0) return strip_vnni(a, lda, rows, bp, kq_count, corr, c, ldc, ncols);
  strip_amx_tiles(a, lda, rows, bp, kq_count, c, ldc, ncols);
}

// AMX-TILE and AMX-INT8 in CPUID, and Linux's permission for this process to
// use tile data (asked once; refused on kernels before 5.16).
bool cpu_has_amx() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!((edx >> 24) & 1) || !((edx >> 25) & 1)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool cpu_has_vnni() { return false; }
bool cpu_has_amx() { return false; }
#endif

using StripFn = void (*)(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, const int32_t*,
                         int32_t*, int64_t, int64_t);

// Code paths by number, as the "isa" attribute and vitjax_cpu_int8_isa name
// them; each CPU runs its fastest and every slower one.
constexpr int32_t kGeneric = 0, kVnni = 1, kAmx = 2;

int32_t fastest_isa() {
#if defined(__x86_64__)
  static const int32_t isa = !cpu_has_vnni() ? kGeneric : cpu_has_amx() ? kAmx : kVnni;
  return isa;
#else
  return kGeneric;
#endif
}

StripFn strip_fn(int32_t isa) {
#if defined(__x86_64__)
  if (isa == kAmx) return strip_amx;
  if (isa == kVnni) return strip_vnni;
#endif
  return strip_generic;
}

struct Progress {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// `isa`: the code path (kGeneric, kVnni, kAmx), or -1 for the fastest here.
ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::S8> packed,
                      ffi::Buffer<ffi::S32> corr, ffi::ResultBuffer<ffi::S32> out, int32_t isa) {
  if (isa < 0) isa = fastest_isa();
  if (isa > fastest_isa())
    return ffi::Error::InvalidArgument(
        "vitjax_cpu_int8_matmul: this CPU lacks the requested code path (isa attribute)");
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
  const StripFn strip = strip_fn(isa);
  const int64_t row_tasks = (M + kTaskRows - 1) / kTaskRows, tasks = row_tasks * strips;
  const bool tiles = isa == kAmx && kq_count % 16 == 0;  // strip_amx takes AMX tiles
  auto run = [=](Progress& p) {
    bool began = false;
    for (int64_t t; (t = p.next.fetch_add(1)) < tasks;) {
#if defined(__x86_64__)
      if (tiles && !began) {
        amx_begin();
        began = true;
      }
#endif
      const int64_t m0 = (t / strips) * kTaskRows, s = t % strips;
      const int64_t col0 = s * kStripCols;
      strip(ap + m0 * lda, lda, std::min(kTaskRows, M - m0), bp + s * kq_count * kQuadBytes,
            kq_count, cp + col0, op + m0 * N + col0, N, std::min(kStripCols, N - col0));
      p.done.fetch_add(1);
    }
#if defined(__x86_64__)
    if (began) amx_end();
#endif
  };
  // Helpers share the counters through a shared_ptr: one that starts after
  // every task is taken finds none and touches nothing else of this call.
  auto progress = std::make_shared<Progress>();
  // Small products on the calling thread alone (see the top of this file;
  // benchmarks/int8_gemm.py's b=1 rows, before and after, in RESULTS.md).
  const int64_t serial_macs = isa == kAmx && kq_count % 16 == 0 ? (int64_t{1} << 24)
                                                                   : (int64_t{1} << 22);
  const int64_t macs = M * kq_count * 4 * N;
  const int64_t helpers =
      macs < serial_macs ? 0 : std::min<int64_t>(pool.num_threads(), tasks - 1);
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
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("isa"));

// The fastest code path of this CPU: 2 AMX, 1 AVX-512 VNNI, 0 the plain loop.
extern "C" int vitjax_cpu_int8_isa() { return fastest_isa(); }

// Decode-step matmuls on CPU that read int8 or bf16 weights as they are stored, so that a step's time is
// their bytes over memory bandwidth (XLA:CPU converts such a kernel to fp32 whole before its dot, which
// reads and writes several times its bytes). y[m, n] = sum_k x[m, k] w[k, n], fp32 x and y.
//
// The weights are packed once at load (mtj/kernels/__init__.py) in the layouts of AVX-512's dot-product
// instructions, in panels of 128 columns that are each contiguous (read as one stream: walking the rows
// of a [K, N] matrix by blocks of columns touches a new page every row, which the hardware prefetchers do
// not follow): int8 as [N/128, K/4, 128, 4] for VPDPBUSD (u8 x s8 -> s32, four rows a lane), bf16 as
// [N/128, K/2, 128, 2] for VDPBF16PS (two rows a lane, fp32 accumulation). N is padded to a multiple of
// 128, K to one of 4 (2).
// int8: each row of x is quantized to 16 bits (a scale per row, absmax / 32767) and split into two
// unsigned bytes, hi and lo, of x_q + 32768; then x_q . w = 256 (hi . w) + (lo . w) - 32768 sum_k w, exact
// in 64-bit integers, and y = x_scale * w_scale[n] * that.
//
// Columns are split into chunks shared out over XLA's CPU thread pool; each chunk keeps a block of
// columns for up to 8 rows of x in registers while it walks the rows of w.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRows = 8;  // rows of x per pass over w
constexpr int kPanel = 128;  // columns per contiguous panel of w

struct Problem {
  const void* x;      // int8: hi/lo byte rows [M][2][K4]; bf16: [M][K2] bf16 bits
  const void* w;      // packed weights
  const float* scale;       // int8: w_scale[N] * x_scale[m] applied per row below
  const int32_t* colsum;    // int8: sum_k w[k, n]
  const float* row_scale;   // int8: x_scale[m]
  float* y;
  int64_t m, k, n;          // k: padded rows (K4 or K2)
};

template <int M, int V>
void int8_block(const Problem& p, int64_t n0) {
  const int8_t* w = static_cast<const int8_t*>(p.w) + (n0 / kPanel) * p.k * kPanel + (n0 % kPanel) * 4;
  const uint8_t* x = static_cast<const uint8_t*>(p.x);
  __m512i hi[M][V], lo[M][V];
  for (int r = 0; r < M; ++r)
    for (int v = 0; v < V; ++v) hi[r][v] = lo[r][v] = _mm512_setzero_si512();
  for (int64_t q = 0; q < p.k / 4; ++q, w += kPanel * 4) {
    __m512i wv[V];
    for (int v = 0; v < V; ++v) wv[v] = _mm512_loadu_si512(w + 64 * v);
    for (int r = 0; r < M; ++r) {
      int32_t h, l;
      std::memcpy(&h, x + (2 * r) * p.k + 4 * q, 4);
      std::memcpy(&l, x + (2 * r + 1) * p.k + 4 * q, 4);
      __m512i xh = _mm512_set1_epi32(h), xl = _mm512_set1_epi32(l);
      for (int v = 0; v < V; ++v) {
        hi[r][v] = _mm512_dpbusd_epi32(hi[r][v], xh, wv[v]);
        lo[r][v] = _mm512_dpbusd_epi32(lo[r][v], xl, wv[v]);
      }
    }
  }
  for (int r = 0; r < M; ++r)
    for (int v = 0; v < V; ++v) {
      alignas(64) int32_t h[16], l[16];
      _mm512_store_si512(h, hi[r][v]);
      _mm512_store_si512(l, lo[r][v]);
      int64_t n = n0 + 16 * v;
      for (int j = 0; j < 16; ++j) {
        int64_t dot = 256LL * h[j] + l[j] - 32768LL * p.colsum[n + j];
        p.y[r * p.n + n + j] = static_cast<float>(static_cast<double>(dot) * p.row_scale[r] * p.scale[n + j]);
      }
    }
}

template <int M, int V>
void bf16_block(const Problem& p, int64_t n0) {
  const uint16_t* w = static_cast<const uint16_t*>(p.w) + (n0 / kPanel) * p.k * kPanel + (n0 % kPanel) * 2;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  __m512 acc[M][V];
  for (int r = 0; r < M; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < p.k / 2; ++q, w += kPanel * 2) {
    __m512bh wv[V];
    for (int v = 0; v < V; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(w + 32 * v);
    for (int r = 0; r < M; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * p.k + 2 * q, 4);
      __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xr, wv[v]);
    }
  }
  for (int r = 0; r < M; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(p.y + r * p.n + n0 + 16 * v, acc[r][v]);
}

// Columns [lo, hi) (whole panels) for M rows, 16 V at a time.
template <bool Int8, int M>
void columns(const Problem& p, int64_t lo, int64_t hi) {
  // accumulators in the 32 vector registers: int8 keeps two per (row, 16 columns), bf16 one
  constexpr int V = Int8 ? (M == 1 ? 8 : M == 2 ? 4 : M <= 4 ? 2 : 1) : (M <= 2 ? 8 : M <= 4 ? 4 : 2);
  auto block = Int8 ? int8_block<M, V> : bf16_block<M, V>;
  for (int64_t n = lo; n < hi; n += 16 * V) block(p, n);
}

template <bool Int8>
void run_columns(const Problem& p, int64_t lo, int64_t hi) {
  switch (p.m) {
    case 1: return columns<Int8, 1>(p, lo, hi);
    case 2: return columns<Int8, 2>(p, lo, hi);
    case 3: return columns<Int8, 3>(p, lo, hi);
    case 4: return columns<Int8, 4>(p, lo, hi);
    case 5: return columns<Int8, 5>(p, lo, hi);
    case 6: return columns<Int8, 6>(p, lo, hi);
    case 7: return columns<Int8, 7>(p, lo, hi);
    default: return columns<Int8, 8>(p, lo, hi);
  }
}

// Chunks of columns claimed from a counter by the calling thread and by helpers on XLA's pool; the caller
// returns once every chunk is done (a helper that starts late finds none left and returns).
struct Shared {
  Problem p;
  int64_t chunk, chunks;
  void (*run)(const Problem&, int64_t, int64_t);
  std::atomic<int64_t> next{0}, done{0};

  void work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      run(p, c * chunk, std::min(p.n, (c + 1) * chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void parallel_columns(ffi::ThreadPool& pool, const Problem& p, void (*run)(const Problem&, int64_t, int64_t)) {
  auto shared = std::make_shared<Shared>();
  shared->p = p;
  shared->run = run;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  shared->chunk = std::max<int64_t>(1, p.n / kPanel / (threads * 4)) * kPanel;  // whole panels
  shared->chunks = (p.n + shared->chunk - 1) / shared->chunk;
  for (int64_t t = 1; t < std::min(threads, shared->chunks); ++t) pool.Schedule([shared] { shared->work(); });
  shared->work();
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) std::this_thread::yield();
}

ffi::Error MatmulInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> colsum, ffi::ResultBuffer<ffi::F32> y) {
  int64_t k = x.dimensions().back(), m = x.element_count() / k;
  int64_t k4 = w.dimensions()[1] * 4, n = w.dimensions()[0] * kPanel;
  std::vector<uint8_t> bytes(kRows * 2 * k4);
  float row_scale[kRows];
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    int64_t rows = std::min<int64_t>(kRows, m - r0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x.typed_data() + (r0 + r) * k;
      float absmax = 0.0f;
      for (int64_t i = 0; i < k; ++i) absmax = std::max(absmax, std::fabs(xr[i]));
      float s = absmax > 0.0f ? absmax / 32767.0f : 1.0f;
      row_scale[r] = s;
      uint8_t* hi = bytes.data() + 2 * r * k4;
      uint8_t* lo = hi + k4;
      for (int64_t i = 0; i < k4; ++i) {
        int32_t u = (i < k ? static_cast<int32_t>(std::nearbyint(xr[i] / s)) : 0) + 32768;
        hi[i] = static_cast<uint8_t>(u >> 8);
        lo[i] = static_cast<uint8_t>(u & 255);
      }
    }
    Problem p{bytes.data(), w.typed_data(), scale.typed_data(), colsum.typed_data(), row_scale,
              y->typed_data() + r0 * n, rows, k4, n};
    parallel_columns(pool, p, run_columns<true>);
  }
  return ffi::Error::Success();
}

ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  int64_t k = x.dimensions().back(), m = x.element_count() / k;
  int64_t k2 = w.dimensions()[1] * 2, n = w.dimensions()[0] * kPanel;
  std::vector<uint16_t> pairs(kRows * k2);
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    int64_t rows = std::min<int64_t>(kRows, m - r0);
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x.typed_data() + (r0 + r) * k;
      for (int64_t i = 0; i < k2; ++i) {  // round to nearest even (exact for values that were bf16)
        uint32_t bits = 0;
        if (i < k) std::memcpy(&bits, xr + i, 4);
        pairs[r * k2 + i] = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
      }
    }
    Problem p{pairs.data(), w.untyped_data(), nullptr, nullptr, nullptr, y->typed_data() + r0 * n, rows, k2, n};
    parallel_columns(pool, p, run_columns<false>);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(mtj_matmul_int8, MatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(mtj_matmul_bf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

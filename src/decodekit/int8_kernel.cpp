// int8 weight-only Linear for x86 AVX2+FMA CPUs: out [M, N] = (x [M, K] @ q[N, K]^T) * scale[N].
//
// Built for the few-row forwards of decoding and speculative verification (M = batch x new
// tokens): each weight row is loaded and widened to float32 once per block of up to 8 rows of
// x, so 1 to 8 rows cost close to one pass over the int8 weights (PyTorch's
// _weight_int8pack_mm re-reads them every 4 rows and is compute-bound already at one row on AVX2).
//
// Batch-invariant by construction: output (m, n) is always the same chain of fused
// multiply-adds over k (8 float32 lanes, k in order, then a fixed horizontal sum and the scalar
// tail), whatever M is, which block row m falls in, and how the threads split N; and the same
// instructions run on both CPU kinds (AVX2 code on the AVX512 Xeons too). So a token's
// projections do not depend on how many tokens share its forward.
//
// x and out: bfloat16 or float32 (the same); q: int8 [N, K] contiguous; scale: [N] of x's dtype.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace {

constexpr int64_t MB = 8;  // rows of x per block: 8 accumulators + 1 weight register

inline float hsum(__m256 v) {  // fixed order: (lo + hi) halves, then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline __m256 widen(const int8_t* p) {  // 8 int8 -> 8 float32 (exact)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// dot products of rows x[0..R) (stride K) with weight rows w[0..C) (stride K), out [R, C];
// R * C <= 8 accumulators. Each (r, c) is the same chain whatever R and C are.
template <int R, int C>
inline void dots(const float* x, const int8_t* w, int64_t K, float* out) {
  __m256 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t K8 = K & ~int64_t(7);
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) wv[c] = widen(w + c * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t k = K8; k < K; ++k) s = std::fma(x[r * K + k], float(w[c * K + k]), s);
      out[r * C + c] = s;
    }
}

using DotsFn = void (*)(const float*, const int8_t*, int64_t, float*);
// by rows in the block: the tile that measured fastest on the AMD EPYC (2 rows: 2 columns beat 4,
// 13.4 against 15.3 ms for the bundled model's Linears), and the 1-column tile for what is left
constexpr DotsFn WIDE[MB + 1] = {nullptr, dots<1, 4>, dots<2, 2>, dots<3, 2>, dots<4, 2>,
                                 dots<5, 1>, dots<6, 1>, dots<7, 1>, dots<8, 1>};
constexpr int WIDTH[MB + 1] = {0, 4, 2, 2, 2, 1, 1, 1, 1};
constexpr DotsFn NARROW[MB + 1] = {nullptr, dots<1, 1>, dots<2, 1>, dots<3, 1>, dots<4, 1>,
                                   dots<5, 1>, dots<6, 1>, dots<7, 1>, dots<8, 1>};

template <typename T>
void run(const T* x, const int8_t* q, const T* scale, T* out, int64_t M, int64_t N, int64_t K) {
  std::vector<float> xf(M * K);  // x in float32: [M, K]
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(x[i]);
  at::parallel_for(0, (N + 3) / 4, 4, [&](int64_t b0, int64_t b1) {  // blocks of 4 columns
    float sums[MB * 4];
    for (int64_t n0 = b0 * 4; n0 < std::min(b1 * 4, N); n0 += 4) {  // 4 weight rows stay in L1
      const int64_t cols = std::min<int64_t>(4, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t rows = std::min(MB, M - m0);
        for (int64_t c0 = 0; c0 < cols;) {
          const int64_t width = c0 + WIDTH[rows] <= cols ? WIDTH[rows] : 1;
          const int64_t n = n0 + c0;
          (width == 1 ? NARROW[rows] : WIDE[rows])(xf.data() + m0 * K, q + n * K, K, sums);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < width; ++c)
              out[(m0 + r) * N + n + c] = static_cast<T>(sums[r * width + c] * static_cast<float>(scale[n + c]));
          c0 += width;
        }
      }
    }
  });
}

}  // namespace

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "int8_linear: x [M, K], q [N, K]");
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && scale.scalar_type() == x.scalar_type(), "int8_linear: dtypes");
  x = x.contiguous();
  q = q.contiguous();
  scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto out = torch::empty({M, N}, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    run(x.data_ptr<at::BFloat16>(), q.data_ptr<int8_t>(), scale.data_ptr<at::BFloat16>(),
        out.data_ptr<at::BFloat16>(), M, N, K);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat, "int8_linear: x in bfloat16 or float32");
    run(x.data_ptr<float>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), out.data_ptr<float>(), M, N, K);
  }
  return out;
}

TORCH_LIBRARY(decodekit, m) { m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor", &int8_linear); }

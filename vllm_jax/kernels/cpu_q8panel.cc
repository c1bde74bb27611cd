// The integer-activation matmul over weights stored in 16-row panels (kernels/cpu.py
// `to_panels`), an XLA FFI custom call beside cpu_q8dot.cc (which reads GGUF's row-major blocks):
//   vllm_jax_q8panel  x f32 [T, cols], the panel fields of weights 0, 1, ... -> y_i f32
//                     [T, 16 * panels_i] (x . W_i^T); attrs qtypes (Q4_0, Q4_1, Q8_0), counts,
//                     bits (8: x in int8, 16: in int16)
//
// A panel holds 16 consecutive rows; each 32-block j of it is [d f16 16] ([m f16 16]) and its
// bytes grouped so that one 64-byte load holds 4 consecutive weights of each of the 16 rows:
//   Q4_0, Q4_1  256 bytes [pair k 4][row 16][4]: low nibbles weights 8k..8k+3, high 8k+4..8k+7
//   Q8_0        512 bytes [group g 8][row 16][4]: weights 4g..4g+3 as q + 128
// so a broadcast of 4 activations and one vpdpbusd (int16: two vpdpwssd) give 16 rows' partial
// dots, for one token or many alike: no unpacking into a scratch panel (cpu_q8dot.cc builds one
// per call and transposes it, which at 16 tokens cost as much as the dots) and no horizontal sums.
//
// x is quantized per 32 (d = max|x| / 127, or / 32767). Each (token, row) adds its blocks in
// order j = 0, 1, ...: acc = float(q . u) * (s * d) + acc, then acc = c * (d sum q) + acc
// (w = s * u + c: s = d_w, c = m or -offset * d_w), so a token's y does not depend on the
// tokens beside it in the call.
#include "cpu_q8.h"

namespace {

using namespace vllm_jax;

constexpr int kPanelRows = 16;
constexpr int NV = kPanelRows / L;  // vectors a panel's 16 rows take
typedef uint8_t u8v __attribute__((vector_size(4 * L)));  // 4 bytes of each of L rows

// acc lane i + the dot of w's bytes 4i..4i+3 (unsigned, <= kMax) with the 4 bytes of x4
template <int kMax>
inline iv dot_lanes(iv acc, u8v w, int32_t x4) {
#if defined(VLLM_JAX_AVX512) && defined(__AVX512VNNI__)
  return (iv)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, _mm512_set1_epi32(x4));
#elif defined(VLLM_JAX_AVX512)
  const __m512i x = _mm512_set1_epi32(x4), ones = _mm512_set1_epi16(1);
  if constexpr (2 * kMax * 127 <= 32767) {
    return acc + (iv)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)w, x), ones);
  } else {  // as dot<kMax>: u = 2 * (u >> 1) + (u & 1)
    const u8v half = w >> 1, odd = w & 1;
    const __m512i a = _mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)half, x),
                                        _mm512_set1_epi16(2));
    return acc + (iv)a + (iv)_mm512_madd_epi16(_mm512_maddubs_epi16((__m512i)odd, x), ones);
  }
#else
  return dot<kMax>(acc, w, (i8x32)(i32x8{} + x4));
#endif
}

inline fv to_fv(iv v) { return __builtin_convertvector(v, fv); }

// L scales of float16 at p
inline fv load_scales(const uint8_t* p) {
#if defined(VLLM_JAX_AVX512)
  return (fv)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return load8(reinterpret_cast<const half*>(p));
#endif
}

template <QType t>
struct Panel {  // panel p of a weight: its fields d [nb][16] (m [nb][16]) qs [nb][kBytes]
  static constexpr int kMax = t == Q8_0 ? 255 : 15;
  static constexpr bool has_m = t == Q4_1;
  static constexpr float kOffset = t == Q4_0 ? 8.f : t == Q8_0 ? 128.f : 0.f;
  static constexpr int64_t kBytes = t == Q8_0 ? 512 : 256;
  const uint8_t *d, *m, *qs;

  Panel(const Fields& f, int64_t p)
      : d(f.row(0, p)), m(has_m ? f.row(1, p) : nullptr), qs(f.row(has_m ? 2 : 1, p)) {}

  // block j's groups g, g + 1 (g even) of rows [L v, L v + L)
  inline void groups(int64_t j, int g, int v, u8v* w0, u8v* w1) const {
    const uint8_t* b = qs + kBytes * j + 4 * L * v;
    if constexpr (t == Q8_0) {
      *w0 = load<u8v>(b + 64 * g), *w1 = load<u8v>(b + 64 * (g + 1));
    } else {
      const u8v x = load<u8v>(b + 32 * g);
      *w0 = x & 15, *w1 = x >> 4;
    }
  }
  inline void scales(int64_t j, int v, fv* s, fv* c) const {
    *s = load_scales(d + 2 * (kPanelRows * j + L * v));
    *c = has_m ? load_scales(m + 2 * (kPanelRows * j + L * v)) : bcast<fv>(-kOffset) * *s;
  }
};

// -- the activations: int8 (vpdpbusd: 4 weights of a row a lane) or int16 (vpdpwssd: 2) -------

struct Int8 {
  typedef int8_t T;
  struct Acc {
    iv a;
  };
  static float quantize(const float* x, T* q, int32_t* sum) {
    int32_t s[2];
    const float d = quantize_block(x, q, s);
    *sum = s[0] + s[1];
    return d;
  }
  template <int kMax>
  static void add(Acc& acc, u8v w, const T* x) {
    acc.a = dot_lanes<kMax>(acc.a, w, load<int32_t>(x));
  }
  static iv rows(const Acc& acc) { return acc.a; }
};

// Rounding x to 1/32767 of its block's largest instead of 1/127: for an input with outliers (the
// MLP's act(gate) * up) the float32 product within ~1e-5, at 2x int8's instructions (still half
// the float32 path's at 16 tokens, and like every panel path the same sums whatever the batch).
struct Int16 {
  typedef int16_t T;
  struct Acc {  // a: lanes 2r, 2r + 1 of row r < L / 2 (a group's weights 0-1, 2-3); b: the rest
    iv a, b;
  };
  static float quantize(const float* x, T* q, int32_t* sum) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 32767.f, id = d != 0.f ? 1.f / d : 0.f;
#if defined(__AVX2__)
    i32x8 total = {};
    const __m256 scale = _mm256_set1_ps(id);
    for (int g = 0; g < 32; g += 16) {  // round to nearest even, as np.rint
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + g), scale));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + g + 8), scale));
      total += (i32x8)a + (i32x8)b;
      // packs interleaves 128-bit lanes: qwords 0 2 1 3 -> 0..3
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
    *sum = int32_t(hsum(to_f8(total)));
#else
    *sum = 0;
    for (int i = 0; i < 32; ++i) *sum += q[i] = T(std::nearbyint(x[i] * id));
#endif
    return d;
  }
  template <int kMax>
  static void add(Acc& acc, u8v w, const T* x) {
#if defined(VLLM_JAX_AVX512)
    const __m512i x8 = _mm512_set1_epi64(load<int64_t>(x));
    const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256((__m512i)w));
    const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64((__m512i)w, 1));
#if defined(__AVX512VNNI__)
    acc.a = (iv)_mm512_dpwssd_epi32((__m512i)acc.a, lo, x8);
    acc.b = (iv)_mm512_dpwssd_epi32((__m512i)acc.b, hi, x8);
#else
    acc.a += (iv)_mm512_madd_epi16(lo, x8), acc.b += (iv)_mm512_madd_epi16(hi, x8);
#endif
#elif defined(__AVX2__)
    const __m256i x8 = _mm256_set1_epi64x(load<int64_t>(x));
    const __m256i lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128((__m256i)w));
    const __m256i hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256((__m256i)w, 1));
    acc.a += (iv)_mm256_madd_epi16(lo, x8), acc.b += (iv)_mm256_madd_epi16(hi, x8);
#else
    for (int i = 0; i < L; ++i) {
      iv& half = i < L / 2 ? acc.a : acc.b;
      const int r = i % (L / 2);
      half[2 * r] += int32_t(w[4 * i]) * x[0] + int32_t(w[4 * i + 1]) * x[1];
      half[2 * r + 1] += int32_t(w[4 * i + 2]) * x[2] + int32_t(w[4 * i + 3]) * x[3];
    }
#endif
  }
  static iv rows(const Acc& acc) {  // lane r: its row's two lanes added (integers: exact)
#if defined(VLLM_JAX_AVX512)
    const __m512i even =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    return (iv)_mm512_permutex2var_epi32((__m512i)acc.a, even, (__m512i)acc.b) +
           (iv)_mm512_permutex2var_epi32((__m512i)acc.a, odd, (__m512i)acc.b);
#elif defined(__AVX2__)
    return (iv)_mm256_permute4x64_epi64(_mm256_hadd_epi32((__m256i)acc.a, (__m256i)acc.b), 0xd8);
#else
    iv r;
    for (int i = 0; i < L; ++i) {
      const iv& half = i < L / 2 ? acc.a : acc.b;
      r[i] = half[2 * (i % (L / 2))] + half[2 * (i % (L / 2)) + 1];
    }
    return r;
#endif
  }
};

template <typename A>
struct QuantX {  // x [tokens, cols] quantized per 32: q [t][cols], d and d * sum(q) [t][nj]
  int64_t cols = 0, nj = 0;
  std::vector<typename A::T> q;
  std::vector<float> d, s;

  void resize(int64_t tokens, int64_t c) {
    cols = c, nj = c / 32;
    q.resize(tokens * c), d.resize(tokens * nj), s.resize(tokens * nj);
  }
  void quantize(const float* x, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < nj; ++j) {
        int32_t sum;
        const float dj = A::quantize(x + t * cols + 32 * j, q.data() + t * cols + 32 * j, &sum);
        d[t * nj + j] = dj, s[t * nj + j] = dj * float(sum);
      }
  }
  const typename A::T* group(int64_t t, int64_t j, int g) const {  // weights 4g..4g+3's x
    return q.data() + t * cols + 32 * j + 4 * g;
  }
};

// y[t0 .. t0 + NT) of panel p's 16 rows
template <typename A, typename P, int NT>
inline void tile(const Fields& f, int64_t p, const QuantX<A>& x, int64_t t0, float* y,
                 int64_t ldy) {
  const P w(f, p);
  fv acc[NT][NV] = {};
  for (int64_t j = 0; j < x.nj; ++j) {
    typename A::Acc q[NT][NV] = {};
#pragma GCC unroll 4
    for (int g = 0; g < 8; g += 2)
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        u8v w0, w1;
        w.groups(j, g, v, &w0, &w1);
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          A::template add<P::kMax>(q[t][v], w0, x.group(t0 + t, j, g));
          A::template add<P::kMax>(q[t][v], w1, x.group(t0 + t, j, g + 1));
        }
      }
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      fv s, c;
      w.scales(j, v, &s, &c);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const int64_t i = (t0 + t) * x.nj + j;
        acc[t][v] = madd(to_fv(A::rows(q[t][v])), s * bcast<fv>(x.d[i]), acc[t][v]);
        acc[t][v] = madd(c, bcast<fv>(x.s[i]), acc[t][v]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < NV; ++v) store(y + (t0 + t) * ldy + kPanelRows * p + L * v, acc[t][v]);
}

// tokens per tile: an accumulator (int16: two) and a sum a token for each of a panel's vectors
#if defined(VLLM_JAX_AVX512)
template <typename A>
constexpr int kTile = std::is_same_v<A, Int8> ? 8 : 6;
#else
template <typename A>
constexpr int kTile = std::is_same_v<A, Int8> ? 3 : 2;
#endif

template <typename A, typename P, int NT = 1>
inline void tail(const Fields& f, int64_t p, const QuantX<A>& x, int64_t t0, int64_t n, float* y,
                 int64_t ldy) {
  if constexpr (NT < kTile<A>) {
    if (n == NT) return tile<A, P, NT>(f, p, x, t0, y, ldy);
    return tail<A, P, NT + 1>(f, p, x, t0, n, y, ldy);
  }
}

template <typename A, typename P>
void panels(const Fields& f, int64_t p0, int64_t p1, const QuantX<A>& x, int64_t tokens, float* y,
            int64_t ldy) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t t0 = 0;
    for (; t0 + kTile<A> <= tokens; t0 += kTile<A>) tile<A, P, kTile<A>>(f, p, x, t0, y, ldy);
    if (t0 < tokens) tail<A, P>(f, p, x, t0, tokens - t0, y, ldy);
  }
}

template <typename F>
inline bool dispatch(QType t, F&& f) {
  switch (t) {
    case Q4_0: return f(static_cast<Panel<Q4_0>*>(nullptr)), true;
    case Q4_1: return f(static_cast<Panel<Q4_1>*>(nullptr)), true;
    case Q8_0: return f(static_cast<Panel<Q8_0>*>(nullptr)), true;
    default: return false;
  }
}

constexpr int64_t kSliceTokens = 256;  // tokens per pass over the weights (their q in L2)

template <typename A>
void run(const float* x, int64_t tokens, int64_t cols, const std::vector<Weight>& ws) {
  std::vector<int64_t> panels_of;  // a Weight's "rows" here: its panels
  for (const Weight& w : ws) panels_of.push_back(w.rows);
  thread_local QuantX<A> qx;
  const int64_t used = rows_in_use(x, tokens, cols);
  for (const Weight& w : ws) zero_rows(w.y, used, tokens, kPanelRows * w.rows);
  for (int64_t s0 = 0; s0 < used; s0 += kSliceTokens) {
    const int64_t n = std::min(kSliceTokens, used - s0);
    const float* xs = x + s0 * cols;
    qx.resize(n, cols);
    QuantX<A>* q = &qx;  // not qx in the lambdas: on a helper thread that names its own
    parallel_for(n, 64, [=](int64_t a, int64_t b) { q->quantize(xs, a, b); });
    parallel_for_each(panels_of, 1, [&](size_t i, int64_t p0, int64_t p1) {
      const int64_t ldy = kPanelRows * ws[i].rows;
      dispatch(ws[i].t, [&](auto* tag) {
        using P = std::remove_pointer_t<decltype(tag)>;
        panels<A, P>(ws[i].f, p0, p1, *q, n, ws[i].y + s0 * ldy, ldy);
      });
    });
  }
}

ffi::Error Q8Panel(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets ys,
                   ffi::Span<const int64_t> qtypes, ffi::Span<const int64_t> counts,
                   int64_t bits) {
  const int64_t tokens = x.dimensions()[0], cols = x.dimensions()[1];
  std::vector<Weight> ws;
  bool ok = cols % 32 == 0 && (bits == 8 || bits == 16) &&
            read_weights(args, ys, qtypes, counts, tokens, &ws, kPanelRows);
  for (const Weight& w : ws) ok = ok && dispatch(w.t, [](auto) {});
  if (!ok) return ffi::Error::InvalidArgument("vllm_jax_q8panel: bad type, bits or panel fields");
  (bits == 8 ? run<Int8> : run<Int16>)(x.typed_data(), tokens, cols, ws);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_q8panel, Q8Panel,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("qtypes")
                                  .Attr<ffi::Span<const int64_t>>("counts")
                                  .Attr<int64_t>("bits"));

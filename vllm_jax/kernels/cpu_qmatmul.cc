// GGUF-quantized matmul for the CPU, XLA FFI custom calls (built by kernels/cpu.py).
//
// XLA on the CPU cannot fuse bit unpacking into a dot, so a step with packed weights would
// materialize every weight in float32. Here each thread takes a run of weight rows and decodes
// them with the same float32 arithmetic as gguf-py (the weights are bit-identical to
// `gguf.quants.dequantize`). Up to 4 tokens (decode steps), each row's blocks are decoded in
// registers and multiplied by the token rows at once; more tokens, a panel of rows is decoded
// into L1 a block ahead of a register tile that multiplies it by every token. Memory traffic is
// the packed bytes, ~5 bits a weight. Vectors are 16 lanes where the build has AVX-512, else 8.
//
// The targets read the fields of kernels/quant.py's `repack` layout ([rows, ...] arrays, or E
// experts stacked as [E, rows, ...], passed in the order of FIELDS in kernels/cpu.py):
//   vllm_jax_qmatmul          x f32 [T, cols], the fields of weights 0, 1, ... -> y_i f32
//                             [T, rows_i] (x . W_i^T); attrs qtypes, counts (fields a weight)
//   vllm_jax_grouped_qmatmul  x f32 [T, cols] (rows sorted by expert), group_sizes i32 [E],
//                             fields... [E, rows, ...] -> y f32 [T, rows] (0 past the groups)
#include "cpu_fields.h"

namespace {

using namespace vllm_jax;

// -- decoding: a row's blocks -> L-lane float vectors ------------------------------------------
//
// A decoder hands each L weights of a block to `use(e, w)` (e: the first one's element in the
// block): stored into a panel (many tokens) or multiplied in registers (few). The weights are
// gguf-py's float32 arithmetic, w = scale * q (- min): the products are exact in float32 except
// Q6_K's (rounded once, as gguf-py rounds them), so contracting scale * q - min into an FMA
// changes nothing. K-quant bits are unpacked with byte-vector operations into q[] (an int8 a
// weight), then widened, converted and scaled L at a time; Q8_0 is widened from its bytes; with
// AVX-512 the 4- and 5-bit types look their weights up in tables instead (table_decode).

#if defined(VLLM_JAX_AVX512)
inline iv widen_v(const int8_t* p) {
  return (iv)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#else
inline iv widen_v(const int8_t* p) { return widen(p); }
#endif
inline fv qf(const int8_t* q) { return __builtin_convertvector(widen_v(q), fv); }

#if defined(VLLM_JAX_AVX512)
// 4- and 5-bit values through tables: vpermps picks lane i of a 16-float table by the low 4 bits
// of lane i of the index, so a block's 16 possible weights are computed once (each as the
// conversion path computes it) and every weight is looked up: 1 instruction for 16 weights, or
// 2 with a fifth bit (a masked second lookup), instead of unpacking, widening, converting and
// scaling (Q4_K few-token rows 1.2-1.3x faster). Low nibbles need no mask: vpermps reads 4 bits.
inline __m512 iota16() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
// 16 bytes -> 16 lanes (a nibble value in bits 0-3, the next one in bits 4-7)
inline __m512i nibble_lanes(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// lane i: lo[v] (v: bits 0-3 of idx lane i), or hi[v] where bit i of k (the 5th bit) is set
template <bool five>
inline fv table_decode(__m512i idx, __m512 lo, __m512 hi, __mmask16 k) {
  __m512 w = _mm512_permutexvar_ps(idx, lo);
  if constexpr (five) w = _mm512_mask_permutexvar_ps(w, k, idx, hi);
  return (fv)w;
}
#endif

// Q4_0..Q8_0, 32 weights a block: w = d * q (+ m)
template <QType t>
struct Legacy {
  static constexpr int kBlock = 32;
  static constexpr bool has_m = t == Q4_1 || t == Q5_1, has_h = t == Q5_0 || t == Q5_1;
  const uint8_t *d, *m, *qh, *qs;

  Legacy(const Fields& f, int64_t n)
      : d(f.row(0, n)), m(has_m ? f.row(1, n) : nullptr),
        qh(has_h ? f.row(has_m ? 2 : 1, n) : nullptr), qs(f.row(has_m + has_h + 1, n)) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
#if defined(VLLM_JAX_AVX512)
    if constexpr (t != Q8_0) {  // nibbles through tables (table_decode)
      const __m512 db = _mm512_set1_ps(f16_at(d, b)), iota = iota16();
      constexpr float offset = t == Q4_0 ? -8.f : t == Q5_0 ? -16.f : 0.f;
      __m512 lo, hi;  // the weight of each 4-bit value, and (Q5) of 16 + that value
      if constexpr (has_m) {
        const __m512 mb = _mm512_set1_ps(f16_at(m, b));
        lo = _mm512_fmadd_ps(db, iota, mb);
        hi = _mm512_fmadd_ps(db, _mm512_add_ps(iota, _mm512_set1_ps(16.f)), mb);
      } else {
        lo = _mm512_mul_ps(db, _mm512_add_ps(iota, _mm512_set1_ps(offset)));
        hi = _mm512_mul_ps(db, _mm512_add_ps(iota, _mm512_set1_ps(offset + 16.f)));
      }
      uint32_t h = 0;
      if constexpr (has_h) std::memcpy(&h, qh + 4 * b, 4);
      const __m512i v = nibble_lanes(qs + 16 * b);
      use(0, table_decode<has_h>(v, lo, hi, __mmask16(h)));
      use(16, table_decode<has_h>(_mm512_srli_epi32(v, 4), lo, hi, __mmask16(h >> 16)));
      return;
    }
#endif
    const fv db = splat_v(f16_at(d, b));
    if constexpr (t == Q8_0) {
      const int8_t* q = reinterpret_cast<const int8_t*>(qs) + 32 * b;
      for (int e = 0; e < 32; e += L) use(e, db * qf(q + e));
    }
#if !defined(VLLM_JAX_AVX512)
    else {  // element i < 16: low nibble of byte i, 16 + i: its high nibble
      i32x8 v[4];
      const i32x8 a = widen(qs + 16 * b), c = widen(qs + 16 * b + 8);
      v[0] = a & 15, v[1] = c & 15, v[2] = a >> 4, v[3] = c >> 4;
      if constexpr (has_h) {  // bit i of qh: bit 4 of element i
        uint32_t h;
        std::memcpy(&h, qh + 4 * b, 4);
        const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
        for (int g = 0; g < 4; ++g) v[g] |= (((i32x8{} + int32_t(h)) >> (lane + 8 * g)) & 1) << 4;
      }
      if constexpr (has_m) {
        const fv mb = splat_v(f16_at(m, b));
        for (int g = 0; g < 4; ++g) use(8 * g, db * to_f8(v[g]) + mb);
      } else {
        constexpr int offset = t == Q4_0 ? 8 : t == Q5_0 ? 16 : 0;
        for (int g = 0; g < 4; ++g) use(8 * g, db * to_f8(v[g] - offset));
      }
    }
#endif
  }
};

// The K-quants, 256 weights a block: 16 scales of 16 weights (Q2_K, Q3_K, Q6_K) or 8 scales
// and mins of 32 (Q4_K, Q5_K).
struct Q2K {  // fields d, dmin, sc (scale | min << 4), qs: w = d * sc * q - dmin * min
  static constexpr int kBlock = 256;
  const uint8_t *d, *dm, *sc, *qs;
  Q2K(const Fields& f, int64_t n)
      : d(f.row(0, n)), dm(f.row(1, n)), sc(f.row(2, n)), qs(f.row(3, n)) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
    alignas(32) int8_t q[256];  // element 128h + 32s + c: bits 2s of byte 32h + c
    for (int h = 0; h < 2; ++h) {
      const u8x32 v = load<u8x32>(qs + 64 * b + 32 * h);
      for (int s = 0; s < 4; ++s) store(q + 128 * h + 32 * s, (v >> (2 * s)) & 3);
    }
    const float db = f16_at(d, b), mb = f16_at(dm, b);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const int s = sc[16 * b + j];
      const fv dl = splat_v(db * float(s & 15)), ml = splat_v(mb * float(s >> 4));
      for (int e = 16 * j; e < 16 * j + 16; e += L) use(e, dl * qf(q + e) - ml);
    }
  }
};

struct Q3K {  // fields d, sc (int8, -32..31), hmask, qs: w = d * sc * (q - 4)
  static constexpr int kBlock = 256;
  const uint8_t *d, *hm, *qs;
  const int8_t* sc;
  Q3K(const Fields& f, int64_t n)
      : d(f.row(0, n)), hm(f.row(2, n)), qs(f.row(3, n)),
        sc(reinterpret_cast<const int8_t*>(f.row(1, n))) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
    alignas(32) int8_t q[256];  // as Q2_K's, plus bit 4h + s of hmask byte c as bit 2
    const u8x32 hv = load<u8x32>(hm + 32 * b);
    for (int h = 0; h < 2; ++h) {
      const u8x32 v = load<u8x32>(qs + 64 * b + 32 * h);
      for (int s = 0; s < 4; ++s)
        store(q + 128 * h + 32 * s, (((v >> (2 * s)) & 3) | (((hv >> (4 * h + s)) & 1) << 2)) - 4);
    }
    const float db = f16_at(d, b);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const fv dl = splat_v(db * float(sc[16 * b + j]));
      for (int e = 16 * j; e < 16 * j + 16; e += L) use(e, dl * qf(q + e));
    }
  }
};

template <bool five>
struct Q45K {  // fields d, dmin, sc, m, (qh,) qs: w = d * sc * q - dmin * m
  static constexpr int kBlock = 256;
  const uint8_t *d, *dm, *sc, *m, *qh, *qs;
  Q45K(const Fields& f, int64_t n)
      : d(f.row(0, n)), dm(f.row(1, n)), sc(f.row(2, n)), m(f.row(3, n)),
        qh(five ? f.row(4, n) : nullptr), qs(f.row(five ? 5 : 4, n)) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
#if defined(VLLM_JAX_AVX512)
    {  // a table of 16 (Q5_K: 2 x 16) weights for each scale and min (table_decode)
      const f8 db = splat(f16_at(d, b)), mb = splat(f16_at(dm, b));
      alignas(32) float dl[8], ml[8];
      store(dl, db * to_f8(widen(sc + 8 * b))), store(ml, mb * to_f8(widen(m + 8 * b)));
      const __m512 iota = iota16(), iota16p = _mm512_add_ps(iota, _mm512_set1_ps(16.f));
#pragma GCC unroll 16
      for (int p = 0; p < 4; ++p) {
        __m512 lo[2], hi[2];  // scales 2p (low nibbles) and 2p + 1 (high)
#pragma GCC unroll 16
        for (int s = 0; s < 2; ++s) {
          const __m512 dj = _mm512_set1_ps(dl[2 * p + s]), mj = _mm512_set1_ps(ml[2 * p + s]);
          lo[s] = _mm512_fmsub_ps(dj, iota, mj);
          if constexpr (five) hi[s] = _mm512_fmsub_ps(dj, iota16p, mj);
        }
#pragma GCC unroll 16
        for (int g = 0; g < 2; ++g) {  // bytes 32p + 16g.. -> elements 64p + 16g.., + 32
          const __m512i v = nibble_lanes(qs + 128 * b + 32 * p + 16 * g);
          __mmask16 k0 = 0, k1 = 0;
          if constexpr (five) {  // element 32j + c: bit j of qh byte c as bit 4
            const __m128i h =
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 32 * b + 16 * g));
            k0 = _mm_test_epi8_mask(h, _mm_set1_epi8(char(1 << (2 * p))));
            k1 = _mm_test_epi8_mask(h, _mm_set1_epi8(char(2 << (2 * p))));
          }
          use(64 * p + 16 * g, table_decode<five>(v, lo[0], hi[0], k0));
          use(64 * p + 32 + 16 * g, table_decode<five>(_mm512_srli_epi32(v, 4), lo[1], hi[1], k1));
        }
      }
      return;
    }
#endif
    alignas(32) int8_t q[256];  // element 64p + c: low nibble of byte 32p + c, 64p + 32 + c: high
    for (int p = 0; p < 4; ++p) {
      const u8x32 v = load<u8x32>(qs + 128 * b + 32 * p);
      u8x32 lo = v & 15, hi = v >> 4;
      if constexpr (five) {  // element 32j + c: bit j of qh byte c as bit 4
        const u8x32 h = load<u8x32>(qh + 32 * b);
        lo |= ((h >> (2 * p)) & 1) << 4, hi |= ((h >> (2 * p + 1)) & 1) << 4;
      }
      store(q + 64 * p, lo), store(q + 64 * p + 32, hi);
    }
    const float db = f16_at(d, b), mb = f16_at(dm, b);
#pragma GCC unroll 16
    for (int j = 0; j < 8; ++j) {
      const fv dl = splat_v(db * float(sc[8 * b + j])), ml = splat_v(mb * float(m[8 * b + j]));
      for (int e = 32 * j; e < 32 * j + 32; e += L) use(e, dl * qf(q + e) - ml);
    }
  }
};

struct Q6K {  // fields d, sc (int8), ql, qh: w = d * sc * (q - 32)
  static constexpr int kBlock = 256;
  const uint8_t *d, *ql, *qh;
  const int8_t* sc;
  Q6K(const Fields& f, int64_t n)
      : d(f.row(0, n)), ql(f.row(2, n)), qh(f.row(3, n)),
        sc(reinterpret_cast<const int8_t*>(f.row(1, n))) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
    // element 128h + 32s + c: nibble s / 2 of ql byte 64h + 32(s & 1) + c, and as bits 4-5
    // the bits 2s of qh byte 32h + c
    alignas(32) int8_t q[256];
    for (int h = 0; h < 2; ++h) {
      const u8x32 a = load<u8x32>(ql + 128 * b + 64 * h);
      const u8x32 c = load<u8x32>(ql + 128 * b + 64 * h + 32);
      const u8x32 hv = load<u8x32>(qh + 64 * b + 32 * h);
      int8_t* o = q + 128 * h;
      store(o, ((a & 15) | ((hv & 3) << 4)) - 32);
      store(o + 32, ((c & 15) | (((hv >> 2) & 3) << 4)) - 32);
      store(o + 64, ((a >> 4) | (((hv >> 4) & 3) << 4)) - 32);
      store(o + 96, ((c >> 4) | ((hv >> 6) << 4)) - 32);
    }
    const float db = f16_at(d, b);
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const fv dl = splat_v(db * float(sc[16 * b + j]));
      for (int e = 16 * j; e < 16 * j + 16; e += L) use(e, dl * qf(q + e));
    }
  }
};

template <QType t>
using Decoder = std::conditional_t<
    t <= Q8_0, Legacy<t>,
    std::conditional_t<t == Q2_K, Q2K,
                       std::conditional_t<t == Q3_K, Q3K,
                                          std::conditional_t<t == Q6_K, Q6K, Q45K<t == Q5_K>>>>>;

// f(tag) with tag a std::integral_constant of the runtime type t
template <typename F>
inline void dispatch(QType t, F&& f) {
  switch (t) {
    case Q4_0: return f(std::integral_constant<QType, Q4_0>{});
    case Q4_1: return f(std::integral_constant<QType, Q4_1>{});
    case Q5_0: return f(std::integral_constant<QType, Q5_0>{});
    case Q5_1: return f(std::integral_constant<QType, Q5_1>{});
    case Q8_0: return f(std::integral_constant<QType, Q8_0>{});
    case Q2_K: return f(std::integral_constant<QType, Q2_K>{});
    case Q3_K: return f(std::integral_constant<QType, Q3_K>{});
    case Q4_K: return f(std::integral_constant<QType, Q4_K>{});
    case Q5_K: return f(std::integral_constant<QType, Q5_K>{});
    case Q6_K: return f(std::integral_constant<QType, Q6_K>{});
  }
}

// -- the products: y[t, n] = x[t, :] . w[n, :] ------------------------------------------------

struct Out {  // y [tokens, rows] with the tile's first token and row
  float* y;
  int64_t rows, t0, n0;
};

// One row decoded block by block in registers, times TT (few) tokens, L lanes along cols
// summed at the end: no buffer. The FMAs must not wait on each other (one sum a token, each
// FMA chained to the last through its latency, capped Q5_0 at 13 GB/s a core): each token has
// A sums that the row's vectors take turns in, or (legacy types, 2+ tokens) a block's products
// are summed apart and then added to the token's one sum. Inlined into the row loop: called
// per row, it was 10-15% slower on AVX2 legacy rows.
template <QType t, int TT>
__attribute__((always_inline)) inline void fused(const Fields& f, int64_t nb, const float* x,
                                                 int64_t cols, const Out& o) {
  constexpr int B = Decoder<t>::kBlock, V = B / L, A = TT == 1 ? 4 : TT == 2 || L == 16 ? 2 : 1;
  fv acc[TT][A] = {};
  const Decoder<t> row(f, o.n0);
  const float* x0 = x + o.t0 * cols;
  auto add = [&](int a, const float* xb, int e, fv w) {
#pragma GCC unroll 4
    for (int i = 0; i < TT; ++i) acc[i][a] += w * load<fv>(xb + i * cols + e);
  };
  int64_t b = 0;
  if constexpr (V <= 4 && TT >= 2) {  // legacy types: a block's products summed, then added
    for (; b < nb; ++b, x0 += B) {
      fv w[V];
      row.block(b, [&](int e, fv v) { w[e / L] = v; });
#pragma GCC unroll 4
      for (int i = 0; i < TT; ++i) {
        fv s = w[0] * load<fv>(x0 + i * cols);
        for (int g = 1; g < V; ++g) s += w[g] * load<fv>(x0 + i * cols + g * L);
        acc[i][0] += s;
      }
    }
  }
  if constexpr (V < A) {  // A / V blocks at a time (V * 2 == A for the legacy types)
    static_assert(2 * V == A, "two blocks a turn");
    for (; b + 2 <= nb; b += 2, x0 += 2 * B) {
      row.block(b, [&](int e, fv w) { add(e / L, x0, e, w); });
      row.block(b + 1, [&](int e, fv w) { add(V + e / L, x0 + B, e, w); });
    }
  }
  for (; b < nb; ++b, x0 += B) row.block(b, [&](int e, fv w) { add(e / L % A, x0, e, w); });
  for (int i = 0; i < TT; ++i) {
    fv sum = acc[i][0];
    for (int a = 1; a < A; ++a) sum += acc[i][a];
    o.y[(o.t0 + i) * o.rows + o.n0] = hsum(sum);
  }
}

constexpr int64_t kFewTokens = 4;  // up to this many tokens: products summed along cols

struct Problem {
  QType t;
  Fields f;
  const float* x;   // [tokens, cols]
  const float* xt;  // many tokens: x transposed, [cols, padded_tokens], zero padded
  float* y;
  int64_t tokens, padded_tokens, rows, cols, nb;
};

// One row at a time: streaming several rows' blocks at once (4 streams of 3 fields) was up to
// 1.5x slower on long rows than walking each row's blocks in order.
template <QType Q>
void fused_rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const Out o{p.y, p.rows, 0, n};
    switch (p.tokens) {
      case 1: fused<Q, 1>(p.f, p.nb, p.x, p.cols, o); break;
      case 2: fused<Q, 2>(p.f, p.nb, p.x, p.cols, o); break;
      case 3: fused<Q, 3>(p.f, p.nb, p.x, p.cols, o); break;
      default: fused<Q, 4>(p.f, p.nb, p.x, p.cols, o); break;
    }
  }
}
static_assert(kFewTokens == 4, "fused_rows takes 1..4 tokens");

// Many tokens: kPanel rows at a time times L tokens (kPanel accumulators; 16 measured best
// against 8, 12, 20, 24 at 16 tokens), kTwinRows times 2 * L (2 * kTwinRows); whether a tile
// decodes the next block between its column chunks or after them (with 16 AVX2 registers, a
// K-quant's decoding between the chunks had the accumulators spilled inside the FMA loop)
#if defined(VLLM_JAX_AVX512)
constexpr int kPanel = 16, kTwinRows = 12;
constexpr bool kInterleave = true;
#else
constexpr int kPanel = 6, kTwinRows = 6;
constexpr bool kInterleave = false;
#endif

// Walks the packed bytes of rows [n0, n1), a few cache lines a step: asked for while the panel
// before them is multiplied, spread over its columns (all at once, at the start of the panel,
// still left the decoding waiting on memory: 1.2x slower for the 262144-row lm_head)
struct Prefetcher {
  const uint8_t *a[kMaxFields], *e[kMaxFields];
  int i = 0, nf = 0;
  Prefetcher(const Fields& f, int64_t n0, int64_t n1) {
    for (; nf < kMaxFields && f.base[nf]; ++nf) a[nf] = f.row(nf, n0), e[nf] = f.row(nf, n1);
  }
  inline void step(int lines) {
    for (; lines > 0 && i < nf; --lines) {
      __builtin_prefetch(a[i], 0, 3);
      a[i] += 64;
      if (a[i] >= e[i]) ++i;
    }
  }
};

// Block b of rows [r0, r1) of R -> out [B / L][R][L] floats: the tile finds all its rows'
// weights of one column at constant offsets from one pointer
template <int R, typename D>
inline void dequant_block(const D* rows, int64_t b, int r0, int r1, float* out) {
  for (int r = r0; r < r1; ++r) {
    float* o = out + r * L;
    rows[r].block(b, [o](int e, fv w) { store(o + e * R, w); });
  }
}

// R rows from n (nrows of them real) times NV * lanes tokens of xt, starting at token i: each
// weight is broadcast against a vector of tokens, so the sums come out per token with no
// horizontal adds (the GEMM micro-kernel shape). The rows' weights are read from `panel`
// ([cols / L][R][L]); with `decode`, the tile first writes them there itself, one block ahead
// of its FMAs, a few rows between each column chunk's FMAs, so the decoding's integer and
// conversion work runs beside the FMAs and its output is still in L1 when used (dequantizing
// whole panels, then multiplying them, was up to 1.3x slower at 16 tokens). Later token chunks of
// the same rows reuse the panel.
template <QType Q, typename V, int NV, int R>
void tile_t(const Problem& p, int64_t n, int nrows, int64_t i, float* panel, bool decode) {
  constexpr int VL = sizeof(V) / sizeof(float), B = Decoder<Q>::kBlock, C = B / L;
  constexpr bool interleave = kInterleave || B == 32;
  alignas(Decoder<Q>) unsigned char mem[R * sizeof(Decoder<Q>)];  // rows past nrows: the last
  Decoder<Q>* rows = reinterpret_cast<Decoder<Q>*>(mem);
  if (decode) {
    for (int r = 0; r < R; ++r) new (rows + r) Decoder<Q>(p.f, n + std::min(r, nrows - 1));
    dequant_block<R>(rows, 0, 0, R, panel);
  }
  V acc[R][NV] = {};
  const float* xt = p.xt + i;
  // the next rows' bytes: at most 34/32 bytes a weight (Q8_0), R * L of them a chunk
  Prefetcher pf(p.f, std::min(n + R, p.rows), std::min(n + (decode ? 2 * R : R), p.rows));
  float* w = panel;  // block b's weights
  for (int64_t b = 0; b < p.nb; ++b) {
    float* const next = panel + (b + 1) * B * R;
    for (int c = 0; c < C; ++c, w += R * L, xt += L * p.padded_tokens) {
      for (int kk = 0; kk < L; ++kk) {
        V xv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) xv[v] = load<V>(xt + kk * p.padded_tokens + VL * v);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const V wb = bcast<V>(w[r * L + kk]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] += xv[v] * wb;
        }
      }
      pf.step(R * L * 34 / 32 / 64 + 1);
      if (interleave && decode && b + 1 < p.nb)
        dequant_block<R>(rows, b + 1, R * c / C, R * (c + 1) / C, next);
    }
    if (!interleave && decode && b + 1 < p.nb) dequant_block<R>(rows, b + 1, 0, R, next);
  }
  write_t(p.y, p.rows, p.tokens, acc, n, nrows, i);
}

// Rows [n0, n1) for many tokens: kTwinRows rows at a time for each 2 * L tokens, then kPanel
// rows at a time for the last L; panel: kPanel * cols floats
template <QType Q>
void buffered_rows(const Problem& p, int64_t n0, int64_t n1, float* panel) {
  const int64_t twins = p.padded_tokens / (2 * L) * (2 * L);
  if (twins)
    for (int64_t n = n0; n < n1; n += kTwinRows) {
      const int nr = int(std::min<int64_t>(kTwinRows, n1 - n));
      for (int64_t i = 0; i < twins; i += 2 * L)
        tile_t<Q, fv, 2, kTwinRows>(p, n, nr, i, panel, i == 0);
    }
  if (twins < p.padded_tokens)
    for (int64_t n = n0; n < n1; n += kPanel)
      tile_t<Q, fv, 1, kPanel>(p, n, int(std::min<int64_t>(kPanel, n1 - n)), twins, panel, true);
}

void matmul_rows(const Problem& p, int64_t n0, int64_t n1) {
  dispatch(p.t, [&](auto tag) {
    constexpr QType Q = decltype(tag)::value;
    if (!p.xt) return fused_rows<Q>(p, n0, n1);
    thread_local std::vector<float> buf;
    buf.resize(std::max<size_t>(buf.size(), std::max(kPanel, kTwinRows) * p.cols));
    buffered_rows<Q>(p, n0, n1, buf.data());
  });
}

constexpr int64_t kSliceTokens = 64;  // tokens per pass over the weights (x^T slice in L2)

// x [tokens, cols] -> xt [cols, padded_tokens] (zero padded), 8 x 8 blocks in registers.
void transpose(const float* x, int64_t tokens, int64_t cols, int64_t padded_tokens, float* xt) {
  for (int64_t i = 0; i < padded_tokens; i += 8)
    for (int64_t k = 0; k < cols; k += 8) {
      f8 r[8];
      for (int j = 0; j < 8; ++j) r[j] = i + j < tokens ? load<f8>(x + (i + j) * cols + k) : f8{};
      transpose8(r);
      for (int c = 0; c < 8; ++c) store(xt + (k + c) * padded_tokens + i, r[c]);
    }
}

// ws[i].y [tokens, rows] = x [tokens, cols] . W_i^T for each weight: x is transposed once and
// one parallel_for covers every weight's rows
void qmatmul(const std::vector<Weight>& ws, const float* x, int64_t tokens, int64_t cols) {
  std::vector<Problem> probs;
  std::vector<int64_t> rows;
  for (const Weight& w : ws) {
    Problem p{};
    p.t = w.t, p.f = w.f, p.rows = w.rows, p.cols = cols, p.nb = cols / block_elems(w.t);
    probs.push_back(p), rows.push_back(w.rows);
  }
  thread_local std::vector<float> xt;
  // Many tokens (a prefill) go in slices: each dequantizes the weights again (~7% of the work
  // at 64 tokens), which beats materializing a float32 copy of every weight per step
  for (int64_t t0 = 0; t0 < tokens; t0 += kSliceTokens) {
    const int64_t n = std::min(kSliceTokens, tokens - t0), padded = (n + L - 1) / L * L;
    if (n > kFewTokens) {
      xt.resize(cols * padded);
      transpose(x + t0 * cols, n, cols, padded, xt.data());
    }
    for (size_t i = 0; i < ws.size(); ++i) {
      Problem& p = probs[i];
      p.tokens = n, p.padded_tokens = padded;
      p.x = x + t0 * cols, p.xt = n > kFewTokens ? xt.data() : nullptr;
      p.y = ws[i].y + t0 * p.rows;
    }
    parallel_for_each(rows, kPanel,
                      [&](size_t i, int64_t n0, int64_t n1) { matmul_rows(probs[i], n0, n1); });
  }
}

ffi::Error QMatmul(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets ys,
                   ffi::Span<const int64_t> qtypes, ffi::Span<const int64_t> counts) {
  const int64_t tokens = x.dimensions()[0], cols = x.dimensions()[1];
  std::vector<Weight> ws;
  if (!read_weights(args, ys, qtypes, counts, tokens, &ws))
    return ffi::Error::InvalidArgument("vllm_jax_qmatmul: bad quantized weight fields");
  const int64_t used = rows_in_use(x.typed_data(), tokens, cols);
  qmatmul(ws, x.typed_data(), used, cols);
  for (const Weight& w : ws) zero_rows(w.y, used, tokens, w.rows);
  return ffi::Error::Success();
}

// -- the grouped (mixture-of-experts) matmul --------------------------------------------------
//
// Each expert with rows becomes Problems of its own (one per kSliceTokens slice of its rows)
// over its slices of x and y and its rows of the stacked fields, so an expert with no rows is
// never read: a decode step touches only the experts its tokens chose.

// Work is split by estimated cost, not by rows: a weight row costs about kRowCost tokens' worth
// of products to stream and dequantize, plus one per token, so one expert with 60 tokens is
// not lumped in with the same number of rows of experts that have 1 token each.
constexpr int64_t kRowCost = 8;

ffi::Error GroupedQMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> group_sizes,
                          ffi::RemainingArgs args, ffi::ResultBuffer<ffi::F32> y,
                          int64_t qtype) {
  Problem whole{};
  whole.t = QType(qtype);
  int64_t experts;
  if (qtype < Q4_0 || qtype > Q6_K ||
      !read_fields(args, 0, 0, 3, &whole.f, &experts, &whole.rows) ||
      experts != int64_t(group_sizes.element_count()))
    return ffi::Error::InvalidArgument("vllm_jax_grouped_qmatmul: bad quantized weight fields");
  const int64_t tokens = x.dimensions()[0], rows = whole.rows;
  whole.cols = x.dimensions()[1], whole.nb = whole.cols / block_elems(whole.t);
  std::vector<Problem> probs;
  std::vector<int64_t> xt_at;  // each problem's offset in xt, -1: few tokens, no transpose
  int64_t t0 = 0, xt_size = 0;
  for (int64_t e = 0; e < experts; ++e) {  // sizes are clamped: a bad one cannot overrun x
    const int64_t end = std::min(tokens, t0 + std::max(0, group_sizes.typed_data()[e]));
    for (int64_t s = t0; s < end; s += kSliceTokens) {
      Problem p = whole;
      for (int i = 0; i < kMaxFields && p.f.base[i]; ++i) p.f.base[i] += e * rows * p.f.stride[i];
      p.tokens = std::min(kSliceTokens, end - s);
      p.x = x.typed_data() + s * p.cols, p.y = y->typed_data() + s * rows;
      p.padded_tokens = (p.tokens + L - 1) / L * L;
      xt_at.push_back(p.tokens > kFewTokens ? xt_size : -1);
      xt_size += p.tokens > kFewTokens ? p.cols * p.padded_tokens : 0;
      probs.push_back(p);
    }
    t0 = std::max(t0, end);
  }
  std::fill(y->typed_data() + t0 * rows, y->typed_data() + tokens * rows, 0.f);  // padding
  // every slice's x^T at once (the size of x), so the experts' weights are read in one pass
  thread_local std::vector<float> xt_buf;  // the caller's: helpers see it through `xt`
  xt_buf.resize(xt_size);
  float* const xt = xt_buf.data();
  for (size_t i = 0; i < probs.size(); ++i)
    if (xt_at[i] >= 0) probs[i].xt = xt + xt_at[i];
  parallel_for(int64_t(probs.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Problem& p = probs[i];
      if (p.xt) transpose(p.x, p.tokens, p.cols, p.padded_tokens, xt + xt_at[i]);
    }
  });
  // (problem, row range) work items: problem i spans costs [start[i], start[i + 1]); a chunk of
  // costs [v0, v1) takes the rows whose cost starts in it, in runs of kPanel rows as qmatmul's
  std::vector<int64_t> start(probs.size() + 1, 0);
  for (size_t i = 0; i < probs.size(); ++i)
    start[i + 1] = start[i] + rows * (kRowCost + probs[i].tokens);
  auto first_row = [&](size_t i, int64_t v) {
    const int64_t cost = kRowCost + probs[i].tokens;
    const int64_t n = (std::max<int64_t>(0, v - start[i]) + cost - 1) / cost;
    return std::min(rows, (n + kPanel - 1) / kPanel * kPanel);
  };
  parallel_for(start.back(), 1, [&](int64_t v0, int64_t v1) {
    size_t i = std::upper_bound(start.begin(), start.end(), v0) - start.begin() - 1;
    for (; i < probs.size() && start[i] < v1; ++i) {
      const int64_t n0 = first_row(i, v0), n1 = first_row(i, v1);
      if (n0 < n1) matmul_rows(probs[i], n0, n1);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_qmatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("qtypes")
                                  .Attr<ffi::Span<const int64_t>>("counts"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_grouped_qmatmul, GroupedQMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

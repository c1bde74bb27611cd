// GGUF-quantized matmul with int8 activations and integer dot products, an XLA FFI custom call
// (built by kernels/cpu.py beside cpu_qmatmul.cc, which keeps the float32 path):
//   vllm_jax_q8dot  x f32 [T, cols], the fields of weights 0, 1, ... -> y_i f32 [T, rows_i]
//                   (x . W_i^T); attrs qtypes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K),
//                   counts (fields a weight)
//
// Each call first quantizes x per 32 elements: d = max|x| / 127, q = round(x / d) in -127..127,
// and the sums d * sum(q) over each 16. Every weight type is read as unsigned bytes u (0..255)
// with, per 16 or 32 weights, w = s * u + c (c: the min, or -offset * s), so
//   x . w = sum over blocks of  d * s * (q . u)  +  c * d * sum(q),
// the q . u summed in int32 by one instruction per 32 byte pairs: vpdpbusd (AVX-512 VNNI, or
// AVX-VNNI: 256-bit), else vpmaddubsw + vpmaddwd (AVX2), else a loop; which one is fixed when the
// file is compiled for the machine (-march=native). Vectors are 256-bit on every path.
//
// Up to 4 tokens (decode): one weight row at a time, each block's dot in one vector (lanes 0-3:
// its first 16 weights, 4-7: the next 16; a 4- or 5-bit pair of blocks in one, x stored in the
// matching order) and 8 blocks' dots reduced together with horizontal adds so that lane k
// holds block k's sum. More tokens: a panel of 32 rows (16 without AVX-512 VNNI) is unpacked once and
// transposed so that one vector holds 4 consecutive bytes of each of 16 (8) rows; a 4-byte
// broadcast of a token's activations then gives 16 (8) rows' partial dots per instruction (the
// GEMM micro-kernel shape), for every token of the panel's tiles. Both add the blocks' float
// terms in one order (see add_dot), so a token's y is the same bits whatever the call holds.
#include "cpu_q8.h"

namespace {

using namespace vllm_jax;

// -- the activations ---------------------------------------------------------------------------

#if defined(VLLM_JAX_AVX512)
constexpr int kTileTokens = 6;  // many tokens: 24 of the 32 vector registers accumulate
#else
constexpr int kTileTokens = 2;
#endif

// x [tokens, cols] quantized per 32, each block's scale d and sums d * sum(q) over its 32 and
// each 16 (the "sums": d, s32, s16, s16'), bytes 4i..4i+3 of a block kept together (one lane of
// a dot). For few tokens token by token, q at t * cols in order, the sums at s + 4 * t * nj as
// [d, s32, s16, s16'][nj], and in qp at t * cols the blocks below nj8 (nj rounded down to 8) in
// pairs as the 4-bit types unpack them (Legacy::pair): blocks 2m, 2m + 1 at 64m as [2m's bytes
// 0-15, 2m+1's 0-15, 2m's 16-31, 2m+1's 16-31]. For many in the tiles' order:
// the tokens [t0, t0 + n) of a tile (n = kTileTokens, or what is left) at q + t0 * cols as
// [32-block j][i][n][4] (a tile reads one stream, each 4 bytes its broadcast), their sums at
// s + 4 * t0 * nj as [j][d, s32, s16, s16'][n]
struct QuantX {
  int64_t tokens = 0, cols = 0, nj = 0;
  bool tiles = false;
  std::vector<int8_t> q, qp;
  std::vector<float> s;

  void resize(int64_t t, int64_t c, bool tiled) {
    tokens = t, cols = c, nj = c / 32, tiles = tiled;
    q.resize(t * c), s.resize(4 * t * nj), qp.resize(tiled ? 0 : t * c);
  }
  // token t's bytes of block j, and of the pair of blocks j, j + 1 (j even, < nj8) (few tokens)
  const int8_t* qb(int64_t t, int64_t j) const { return q.data() + t * cols + 32 * j; }
  const int8_t* qpair(int64_t t, int64_t j) const { return qp.data() + t * cols + 32 * j; }
  // sums(t, j)[k * nj]: the d, s32, s16, s16' (k = 0..3) of token t's block j
  const float* sums(int64_t t, int64_t j) const { return s.data() + 4 * t * nj + j; }
  const int8_t* tile_q(int64_t t0) const { return q.data() + t0 * cols; }
  const float* tile_s(int64_t t0) const { return s.data() + 4 * t0 * nj; }
};

void quantize_rows(const float* x, int64_t t0, int64_t t1, QuantX* qx) {
  const int64_t nj = qx->nj, cols = qx->cols;
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t j = 0; j < nj; ++j) {
      alignas(32) int8_t q[32];
      int32_t s[2];
      const float d = quantize_block(x + t * cols + 32 * j, q, s);
      const float sums[4] = {d, d * float(s[0] + s[1]), d * float(s[0]), d * float(s[1])};
      int8_t* qd;  // where q's bytes 4i..4i+3 go: qd + i * step
      float* st;  // where sums[k] goes: st + k * stride
      int64_t step, stride;
      if (!qx->tiles) {
        qd = qx->q.data() + t * cols + 32 * j, step = 4;
        st = qx->s.data() + 4 * t * nj + j, stride = nj;
      } else {
        const int64_t first = t / kTileTokens * kTileTokens, i = t - first;
        const int64_t n = std::min<int64_t>(kTileTokens, qx->tokens - first);
        qd = qx->q.data() + first * cols + 32 * j * n + 4 * i, step = 4 * n;
        st = qx->s.data() + 4 * (first * nj + j * n) + i, stride = n;
      }
      for (int i = 0; i < 8; ++i) std::memcpy(qd + i * step, q + 4 * i, 4);
      for (int k = 0; k < 4; ++k) st[k * stride] = sums[k];
      if (!qx->tiles && j < nj / 8 * 8) {
        int8_t* pd = qx->qp.data() + t * cols + 32 * (j & ~int64_t(1)) + 16 * (j & 1);
        std::memcpy(pd, q, 16), std::memcpy(pd + 32, q + 16, 16);
      }
    }
}

// -- the weights: a row's blocks -> 32 unsigned bytes and their scales at a time -----------------
//
// A decoder hands `use(j, u, sc)` each 32 weights (j: their 32-block in the row): w = s * u + c
// with s, c = sc.s[0], sc.c[0] for the first 16 and sc.s[1], sc.c[1] for the next (equal unless
// kHalves: Q6_K's scales cover 16 weights); scales8(g) the same Scales (the same float
// operations) of the 32-blocks 8g .. 8g + 7 as vectors.

struct Scales {
  float s[2], c[2];
};

// the Scales of 8 consecutive 32-blocks (group g: blocks 8g .. 8g + 7), lane k block 8g + k
struct Scales8 {
  f8 s, s1, c, c1;
};

// 16 bytes -> their low nibbles, then their high nibbles
inline u8x32 nibbles(const uint8_t* p) {
#if defined(__AVX2__)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (u8x32)_mm256_set_m128i(_mm_srli_epi16(v, 4), v) & 15;
#else
  u8x32 r;
  for (int i = 0; i < 16; ++i) r[i] = p[i] & 15, r[16 + i] = p[i] >> 4;
  return r;
#endif
}

// bit i of h -> byte i as 16 (0 where clear)
inline u8x32 fifth_bits(uint32_t h) {
#if defined(__AVX2__)
  const __m256i spread = _mm256_shuffle_epi8(  // byte i: byte i / 8 of h
      _mm256_set1_epi32(int32_t(h)),
      _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
  const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  return (u8x32)_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit) & 16;
#else
  u8x32 r;
  for (int i = 0; i < 32; ++i) r[i] = ((h >> i) & 1) << 4;
  return r;
#endif
}

template <QType t>
struct Legacy {  // Q4_0..Q8_0, 32 weights a block: w = d * (q - offset) or d * q + m
  static constexpr int kBlock = 32, kMax = t == Q8_0 ? 255 : t <= Q4_1 ? 15 : 31;
  static constexpr bool kHalves = false, has_m = t == Q4_1 || t == Q5_1;
  static constexpr bool has_h = t == Q5_0 || t == Q5_1, kPaired = t != Q8_0;
  static constexpr float kOffset = t == Q4_0 ? 8.f : t == Q5_0 ? 16.f : t == Q8_0 ? 128.f : 0.f;
  const uint8_t *d, *m, *qh, *qs;

  Legacy(const Fields& f, int64_t n)
      : d(f.row(0, n)), m(has_m ? f.row(1, n) : nullptr),
        qh(has_h ? f.row(has_m ? 2 : 1, n) : nullptr), qs(f.row(has_m + has_h + 1, n)) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
    u8x32 u;
    if constexpr (t == Q8_0) {
      u = load<u8x32>(qs + 32 * b) ^ 0x80;  // q + 128
    } else {
      u = nibbles(qs + 16 * b);
      if constexpr (has_h) {
        uint32_t h;
        std::memcpy(&h, qh + 4 * b, 4);
        u |= fifth_bits(h);
      }
    }
    const float db = f16_at(d, b), c = has_m ? f16_at(m, b) : -kOffset * db;
    use(b, u, Scales{{db, db}, {c, c}});
  }
  // Q4/Q5 blocks b, b + 1 from one load: lo = [b's weights 0-15, b + 1's 0-15], hi = the same
  // of their weights 16-31 (QuantX's qp order)
  inline void pair(int64_t b, u8x32* lo, u8x32* hi) const {
    static_assert(kPaired, "4- and 5-bit blocks");
    const u8x32 v = load<u8x32>(qs + 16 * b);
    *lo = v & 15, *hi = v >> 4;
    if constexpr (has_h) {
      uint32_t h[2];
      std::memcpy(h, qh + 4 * b, 8);
      *lo |= fifth_bits((h[0] & 0xffff) | (h[1] << 16));
      *hi |= fifth_bits((h[0] >> 16) | (h[1] & 0xffff0000u));
    }
  }
  Scales8 scales8(int64_t g) const {
    const f8 db = load8(reinterpret_cast<const half*>(d) + 8 * g);
    const f8 c = has_m ? load8(reinterpret_cast<const half*>(m) + 8 * g) : bcast<f8>(-kOffset) * db;
    return {db, db, c, c};
  }
};

struct Q4K {  // d, dmin, sc, m, qs; 8 scales and mins of 32: w = d * sc * q - dmin * m
  static constexpr int kBlock = 256, kMax = 15;
  static constexpr bool kHalves = false, kPaired = false;
  const uint8_t *d, *dm, *sc, *m, *qs;
  Q4K(const Fields& f, int64_t n)
      : d(f.row(0, n)), dm(f.row(1, n)), sc(f.row(2, n)), m(f.row(3, n)), qs(f.row(4, n)) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
    const float db = f16_at(d, b), mb = f16_at(dm, b);
    for (int p = 0; p < 4; ++p) {  // element 64p + c: low nibble of byte 32p + c, + 32: high
      const u8x32 v = load<u8x32>(qs + 128 * b + 32 * p);
      for (int h = 0; h < 2; ++h) {
        const int j = 2 * p + h;
        const float s = db * float(sc[8 * b + j]), c = -mb * float(m[8 * b + j]);
        use(8 * b + j, h ? u8x32(v >> 4) : u8x32(v & 15), Scales{{s, s}, {c, c}});
      }
    }
  }
  Scales8 scales8(int64_t b) const {
    const f8 s = bcast<f8>(f16_at(d, b)) * to_f8(widen(sc + 8 * b));
    const f8 c = bcast<f8>(-f16_at(dm, b)) * to_f8(widen(m + 8 * b));
    return {s, s, c, c};
  }
};

struct Q6K {  // d, sc (int8), ql, qh; 16 scales of 16: w = d * sc * (q - 32)
  static constexpr int kBlock = 256, kMax = 63;
  static constexpr bool kHalves = true, kPaired = false;
  const uint8_t *d, *ql, *qh;
  const int8_t* sc;
  Q6K(const Fields& f, int64_t n)
      : d(f.row(0, n)), ql(f.row(2, n)), qh(f.row(3, n)),
        sc(reinterpret_cast<const int8_t*>(f.row(1, n))) {}

  template <typename Use>
  inline void block(int64_t b, Use&& use) const {
    const float db = f16_at(d, b);
    for (int h = 0; h < 2; ++h) {  // element 128h + 32s + c: see cpu_qmatmul.cc's Q6K
      const uint8_t* l = ql + 128 * b + 64 * h;
      const u8x32 a = load<u8x32>(l), c = load<u8x32>(l + 32);
      const u8x32 hv = load<u8x32>(qh + 64 * b + 32 * h);
      const u8x32 u[4] = {(a & 15) | ((hv & 3) << 4), (c & 15) | (((hv >> 2) & 3) << 4),
                          (a >> 4) | (((hv >> 4) & 3) << 4), (c >> 4) | ((hv >> 6) << 4)};
      for (int s = 0; s < 4; ++s) {
        const int j = 4 * h + s;
        const float s0 = db * float(sc[16 * b + 2 * j]), s1 = db * float(sc[16 * b + 2 * j + 1]);
        use(8 * b + j, u[s], Scales{{s0, s1}, {-32.f * s0, -32.f * s1}});
      }
    }
  }
  Scales8 scales8(int64_t b) const {
    const i32x8 a = widen(sc + 16 * b), z = widen(sc + 16 * b + 8);
    const f8 db = bcast<f8>(f16_at(d, b));
    const f8 s0 = db * to_f8(__builtin_shufflevector(a, z, 0, 2, 4, 6, 8, 10, 12, 14));
    const f8 s1 = db * to_f8(__builtin_shufflevector(a, z, 1, 3, 5, 7, 9, 11, 13, 15));
    return {s0, s1, bcast<f8>(-32.f) * s0, bcast<f8>(-32.f) * s1};
  }
};

template <typename D>
constexpr D* tag = nullptr;

// f(decoder type) for a runtime type; false for the types left to cpu_qmatmul.cc
template <typename F>
inline bool dispatch(QType t, F&& f) {
  switch (t) {
    case Q4_0: return f(tag<Legacy<Q4_0>>), true;
    case Q4_1: return f(tag<Legacy<Q4_1>>), true;
    case Q5_0: return f(tag<Legacy<Q5_0>>), true;
    case Q5_1: return f(tag<Legacy<Q5_1>>), true;
    case Q8_0: return f(tag<Legacy<Q8_0>>), true;
    case Q4_K: return f(tag<Q4K>), true;
    case Q6_K: return f(tag<Q6K>), true;
    default: return false;
  }
}

struct Problem {
  Fields f;
  const QuantX* x;
  float* y;  // [tokens, rows]
  int64_t tokens, rows, nb, nj;  // nb: weight blocks a row, nj: 32-blocks
};

// -- the float sums: one order whatever the call holds ------------------------------------------
//
// A token's y must not depend on the tokens beside it in the call (greedy output would depend on
// batching), so both paths below do the same float operations for each (token, row): 8 sums,
// lane k taking the 32-blocks j = k, k + 8, ... below nj8 (nj rounded down to 8) in turn, y their
// lane_sum, then the last nj - nj8 blocks added to y in turn; each block adds
//   float(q . u) * (s * d)    (kHalves: the first 16's, then the next 16's)
//   c * (d * sum(q))          (kHalves: the first 16's, then the next 16's)
// as multiply-adds (fused where the build has FMA). The integer dots are exact, so however a
// path splits q . u into lanes and instructions its value is the same.

// acc + dot * (s * d), dot an integer dot (< 2^24: exact in float)
template <typename V>
inline V add_dot(V acc, V dot, V s, V d) {
  return madd(dot, s * d, acc);
}

// acc + the minimums' terms: c * sum32, or (kHalves) c * sum16 then c' * sum16'
template <bool kHalves, typename V>
inline V add_mins(V acc, V c, V c1, V sum32, V sum16, V sum16b) {
  return kHalves ? madd(c1, sum16b, madd(c, sum16, acc)) : madd(c, sum32, acc);
}

// the 8 sums' total: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)), a(k) the sum of lane k
template <typename V, typename A>
inline V lane_sum(A a) {
  return ((a(0) + a(4)) + (a(2) + a(6))) + ((a(1) + a(5)) + (a(3) + a(7)));
}

// the same of an f8's lanes, in shuffles
inline float lane_sum(f8 a) {
  typedef float f4 __attribute__((vector_size(16)));
  f4 h = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  h += __builtin_shufflevector(h, h, 2, 3, 0, 1);
  return h[0] + h[1];
}

// -- few tokens: a row at a time ---------------------------------------------------------------

// one 32-block's terms (see add_dot) from its Scales and x's sums (x[k * nj], QuantX::sums);
// lo, hi: the integer dots of the first and the next 16 weights (kHalves), else lo the whole
// dot (hi unused)
template <bool kHalves, typename V>
inline V add_block(V acc, V lo, V hi, V s, V s1, V c, V c1, const float* x, int64_t nj) {
  const V d = load<V>(x);
  acc = kHalves ? add_dot(add_dot(acc, lo, s, d), hi, s1, d) : add_dot(acc, lo, s, d);
  return add_mins<kHalves>(acc, c, c1, load<V>(x + nj), load<V>(x + 2 * nj), load<V>(x + 3 * nj));
}

// d[k]: block k's dot spread over 8 lanes (0-3: its first 16 weights, 4-7: the next 16) ->
// lane k of lo, hi: the sum of d[k]'s lanes 0-3, 4-7
inline void block_sums(const i32x8 (&d)[8], i32x8* lo, i32x8* hi) {
#if defined(__AVX2__)
  auto half = [&](int k) {  // [d_k's 0-3 sum, .., d_k+3's | d_k's 4-7 sum, .., d_k+3's]
    const __m256i a = _mm256_hadd_epi32((__m256i)d[k], (__m256i)d[k + 1]);
    return _mm256_hadd_epi32(a, _mm256_hadd_epi32((__m256i)d[k + 2], (__m256i)d[k + 3]));
  };
  const __m256i a = half(0), b = half(4);
  *lo = (i32x8)_mm256_permute2x128_si256(a, b, 0x20);
  *hi = (i32x8)_mm256_permute2x128_si256(a, b, 0x31);
#else
  for (int k = 0; k < 8; ++k) {
    (*lo)[k] = d[k][0] + d[k][1] + d[k][2] + d[k][3];
    (*hi)[k] = d[k][4] + d[k][5] + d[k][6] + d[k][7];
  }
#endif
}

// d[m]: the dots of blocks 2m (lanes 0-3), 2m + 1 (4-7) -> lane k: block k's
inline i32x8 pair_sums(const i32x8 (&d)[4]) {
#if defined(__AVX2__)
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32((__m256i)d[0], (__m256i)d[1]),
                                      _mm256_hadd_epi32((__m256i)d[2], (__m256i)d[3]));
  return (i32x8)_mm256_permutevar8x32_epi32(a, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
#else
  i32x8 r{};
  for (int k = 0; k < 8; ++k)
    for (int i = 4 * (k & 1); i < 4 * (k & 1) + 4; ++i) r[k] += d[k / 2][i];
  return r;
#endif
}

// Row n times TT tokens, 8 blocks at a time: each block's dot with a token in one vector (two
// blocks' in one where kPaired: a 4-bit pair's one load unpacks with 2 and/shift operations),
// the 8 reduced at once (block_sums, pair_sums) into lane k of the float sums; then a legacy
// row's last nj % 8 blocks one by one. One row at a time: each field one stream (4 rows' blocks
// in turn, 4 streams a field, were 1.3x slower on the 49152-row lm_head from memory)
template <typename D, int TT>
__attribute__((always_inline)) inline void row_dots(const Problem& p, int64_t n) {
  constexpr int kPer = 256 / D::kBlock;  // the decoder's blocks in 8 32-blocks
  const D row(p.f, n);
  f8 acc[TT] = {};
  for (int64_t g = 0; g < p.nj / 8; ++g) {
    const Scales8 sc = row.scales8(g);
    if constexpr (D::kPaired) {
      u8x32 lo[4], hi[4];
#pragma GCC unroll 4
      for (int m = 0; m < 4; ++m) row.pair(8 * g + 2 * m, lo + m, hi + m);
#pragma GCC unroll 4
      for (int t = 0; t < TT; ++t) {
        const int8_t* xq = p.x->qpair(t, 8 * g);
        i32x8 d[4];
#pragma GCC unroll 4
        for (int m = 0; m < 4; ++m)
          d[m] = dot<D::kMax>(dot<D::kMax>(i32x8{}, lo[m], load<i8x32>(xq + 64 * m)), hi[m],
                              load<i8x32>(xq + 64 * m + 32));
        acc[t] = add_block<false>(acc[t], to_f8(pair_sums(d)), f8{}, sc.s, sc.s1, sc.c, sc.c1,
                                  p.x->sums(t, 8 * g), p.nj);
      }
      continue;
    }
    u8x32 w[8];
#pragma GCC unroll 8
    for (int i = 0; i < kPer; ++i)
      row.block(kPer * g + i, [&](int64_t j, u8x32 u, const Scales&) { w[j - 8 * g] = u; });
#pragma GCC unroll 4
    for (int t = 0; t < TT; ++t) {
      const int8_t* xq = p.x->qb(t, 8 * g);
      i32x8 d[8], lo, hi;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) d[i] = dot<D::kMax>(i32x8{}, w[i], load<i8x32>(xq + 32 * i));
      block_sums(d, &lo, &hi);
      acc[t] = add_block<D::kHalves>(acc[t], to_f8(D::kHalves ? lo : lo + hi), to_f8(hi), sc.s,
                                     sc.s1, sc.c, sc.c1, p.x->sums(t, 8 * g), p.nj);
    }
  }
  float y[TT];
  for (int t = 0; t < TT; ++t) y[t] = lane_sum(acc[t]);
  for (int64_t b = p.nj / 8 * 8 * 32 / D::kBlock; b < p.nb; ++b)
    row.block(b, [&](int64_t j, u8x32 u, const Scales& w) {
      for (int t = 0; t < TT; ++t) {
        i32x8 q = dot<D::kMax>(i32x8{}, u, load<i8x32>(p.x->qb(t, j)));
        q += __builtin_shufflevector(q, q, 2, 3, 0, 1, 6, 7, 4, 5);
        q += __builtin_shufflevector(q, q, 1, 0, 3, 2, 5, 4, 7, 6);  // 0: the first 16's, 4: next
        const int32_t lo = D::kHalves ? q[0] : q[0] + q[4];
        y[t] = add_block<D::kHalves>(y[t], float(lo), float(q[4]), w.s[0], w.s[1], w.c[0],
                                     w.c[1], p.x->sums(t, j), p.nj);
      }
    });
  for (int t = 0; t < TT; ++t) p.y[t * p.rows + n] = y[t];
}

// measured: the Q8_0 lm_head at 3-4 tokens 1.5-1.9x faster here than in tiles
constexpr int64_t kFewTokens = 4;

// The bytes of the row kAhead rows on are asked for before each row: one core's misses from
// memory otherwise left the Q8_0 lm_head at ~24 GB/s (prefetching 16 rows on: ~31; 8: ~28)
constexpr int64_t kAhead = 16;

template <typename D, int TT>
void few_rows(const Problem& p, int64_t n0, int64_t n1) {
  int nf = 0;
  while (nf < kMaxFields && p.f.base[nf]) ++nf;
  for (int64_t n = n0; n < n1; ++n) {
    if (n + kAhead < n1)
      for (int i = 0; i < nf; ++i)
        for (int64_t o = 0; o < p.f.stride[i]; o += 64)
          __builtin_prefetch(p.f.row(i, n + kAhead) + o, 0, 3);
    row_dots<D, TT>(p, n);
  }
}

// -- many tokens: panels of kRows rows times kTileTokens tokens ---------------------------------
//
// A row vector holds one int32 (4 bytes' dot) of each of kLanes rows: 16 with AVX-512 VNNI (a
// zmm vpdpbusd, full width on cores with 512-bit units: 2x the 256-bit form's products), else 8

#if defined(VLLM_JAX_AVX512) && defined(__AVX512VNNI__)
constexpr int kLanes = 16;
typedef i32x16 RowI;
typedef f32x16 RowF;
template <int kMax>
inline RowI dot_rows(RowI acc, const uint8_t* w, int32_t x4) {
  return (RowI)_mm512_dpbusd_epi32((__m512i)acc, _mm512_loadu_si512(w), _mm512_set1_epi32(x4));
}
#else
constexpr int kLanes = 8;
typedef i32x8 RowI;
typedef f8 RowF;
template <int kMax>
inline RowI dot_rows(RowI acc, const uint8_t* w, int32_t x4) {
  return dot<kMax>(acc, load<u8x32>(w), (i8x32)(i32x8{} + x4));
}
#endif
constexpr int kRows = 2 * kLanes;  // two row vectors

struct PanelBlock {  // one 32-block of kRows rows
  uint8_t u[8][4 * kRows];  // [group g][row][4]: bytes 4g..4g+3 of each row
  float s[2][kRows], c[2][kRows];  // [first or next 16 weights][row]
};

// rows [n, n + nrows) -> panel [nj] (rows past nrows repeat the last)
template <typename D>
void build_panel(const Problem& p, int64_t n, int nrows, PanelBlock* panel) {
  for (int r = 0; r < kRows; ++r) {
    const D row(p.f, n + std::min(r, nrows - 1));
    for (int64_t b = 0; b < p.nb; ++b)
      row.block(b, [&](int64_t j, u8x32 u, const Scales& sc) {
        store(&panel[j].u[0][0] + 32 * r, u);  // row-major until transposed
        for (int h = 0; h < 2; ++h) panel[j].s[h][r] = sc.s[h], panel[j].c[h][r] = sc.c[h];
      });
  }
  const int64_t nj = p.nb * D::kBlock / 32;
  for (int64_t j = 0; j < nj; ++j) {
    alignas(64) float rows[kRows][8];  // row-major kRows rows of 8 dwords -> group-major
    std::memcpy(rows, panel[j].u, sizeof rows);
    for (int r0 = 0; r0 < kRows; r0 += 8) {
      f8 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load<f8>(rows[r0 + i]);
      transpose8(r);
      for (int g = 0; g < 8; ++g) store(&panel[j].u[g][4 * r0], r[g]);
    }
  }
}

// acc + block j's terms (see add_dot) for NT tokens from t0 times the panel's rows
template <typename D, int NT>
__attribute__((always_inline)) inline void tile_block(const Problem& p, const PanelBlock& pb,
                                                      int64_t j, int64_t t0,
                                                      RowF (&acc)[NT][2]) {
  const int8_t* xq = p.x->tile_q(t0) + 32 * NT * j;  // [j][i][NT][4]
  const float* xs = p.x->tile_s(t0) + 4 * NT * j;    // [j][d, s32, s16, s16'][NT]
  RowI qd[NT][2] = {};
  auto flush = [&](int h) {  // the integer dots of 16 (h) or all 32 weights, scaled
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t)
      for (int v = 0; v < 2; ++v) {
        acc[t][v] = add_dot(acc[t][v], __builtin_convertvector(qd[t][v], RowF),
                            load<RowF>(pb.s[h] + kLanes * v), bcast<RowF>(xs[t]));
        qd[t][v] = RowI{};
      }
  };
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i, xq += 4 * NT) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const int32_t x4 = load<int32_t>(xq + 4 * t);
      qd[t][0] = dot_rows<D::kMax>(qd[t][0], pb.u[i], x4);
      qd[t][1] = dot_rows<D::kMax>(qd[t][1], pb.u[i] + 4 * kLanes, x4);
    }
    if (D::kHalves && i == 3) flush(0);
  }
  flush(D::kHalves ? 1 : 0);
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 2; ++v)
      acc[t][v] = add_mins<D::kHalves>(
          acc[t][v], load<RowF>(pb.c[0] + kLanes * v), load<RowF>(pb.c[1] + kLanes * v),
          bcast<RowF>(xs[NT + t]), bcast<RowF>(xs[2 * NT + t]), bcast<RowF>(xs[3 * NT + t]));
}

// NT tokens from t0 (a whole tile of QuantX's, or the last) times the panel's rows from n, in
// the order of the float sums (see add_dot): the blocks j = k mod 8 below nj8 for each k in
// turn, each (token, row) a sum per k, then the last blocks into their lane_sum
template <typename D, int NT>
inline void tile(const Problem& p, const PanelBlock* panel, int64_t nj, int64_t n, int nrows,
                 int64_t t0) {
  const int64_t nj8 = nj / 8 * 8;
  RowF lanes[8][NT][2];
  for (int k = 0; k < 8; ++k) {
    RowF acc[NT][2] = {};
    for (int64_t j = k; j < nj8; j += 8) tile_block<D, NT>(p, panel[j], j, t0, acc);
    for (int t = 0; t < NT; ++t)
      for (int v = 0; v < 2; ++v) lanes[k][t][v] = acc[t][v];
  }
  RowF acc[NT][2];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 2; ++v) acc[t][v] = lane_sum<RowF>([&](int k) { return lanes[k][t][v]; });
  for (int64_t j = nj8; j < nj; ++j) tile_block<D, NT>(p, panel[j], j, t0, acc);
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < 2 && kLanes * v < nrows; ++v)
      store_first(p.y + (t0 + t) * p.rows + n + kLanes * v, acc[t][v],
                  std::min(kLanes, nrows - kLanes * v));
}

// the last p.tokens - t0 (< kTileTokens) tokens
template <typename D>
inline void tail_tile(const Problem& p, const PanelBlock* panel, int64_t nj, int64_t n, int nrows,
                      int64_t t0) {
  switch (p.tokens - t0) {
    case 0: return;
    case 1: return tile<D, 1>(p, panel, nj, n, nrows, t0);
    case 2: return tile<D, 2>(p, panel, nj, n, nrows, t0);
    case 3: return tile<D, 3>(p, panel, nj, n, nrows, t0);
    case 4: return tile<D, 4>(p, panel, nj, n, nrows, t0);
    default: return tile<D, 5>(p, panel, nj, n, nrows, t0);
  }
}
static_assert(kTileTokens <= 6, "tail_tile takes up to 5 tokens");

template <typename D>
void many_rows(const Problem& p, int64_t n0, int64_t n1) {
  const int64_t nj = p.nb * D::kBlock / 32;
  thread_local std::vector<PanelBlock> panel;
  if (int64_t(panel.size()) < nj) panel.resize(nj);
  for (int64_t n = n0; n < n1; n += kRows) {
    const int nrows = int(std::min<int64_t>(kRows, n1 - n));
    build_panel<D>(p, n, nrows, panel.data());
    int64_t t0 = 0;
    for (; t0 + kTileTokens <= p.tokens; t0 += kTileTokens)
      tile<D, kTileTokens>(p, panel.data(), nj, n, nrows, t0);
    tail_tile<D>(p, panel.data(), nj, n, nrows, t0);
  }
}

constexpr int64_t kSliceTokens = 256;  // tokens per pass over the weights (their q in L2)

// ws[i].y = x . W_i^T for each weight: x is quantized once and one parallel_for covers every
// weight's rows
ffi::Error Q8Dot(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args, ffi::RemainingRets ys,
                 ffi::Span<const int64_t> qtypes, ffi::Span<const int64_t> counts) {
  const int64_t tokens = x.dimensions()[0], cols = x.dimensions()[1];
  std::vector<Weight> ws;
  bool ok = read_weights(args, ys, qtypes, counts, tokens, &ws);
  for (const Weight& w : ws) ok = ok && dispatch(w.t, [](auto) {}) && cols % block_elems(w.t) == 0;
  if (!ok) return ffi::Error::InvalidArgument("vllm_jax_q8dot: bad type or weight fields");
  std::vector<Problem> probs;
  std::vector<int64_t> rows;
  for (const Weight& w : ws) {
    Problem p{};
    p.f = w.f, p.rows = w.rows, p.nb = cols / block_elems(w.t), p.nj = cols / 32;
    probs.push_back(p), rows.push_back(w.rows);
  }
  thread_local QuantX qx;
  const int64_t used = rows_in_use(x.typed_data(), tokens, cols);
  for (const Weight& w : ws) zero_rows(w.y, used, tokens, w.rows);
  for (int64_t s0 = 0; s0 < used; s0 += kSliceTokens) {
    const int64_t n = std::min(kSliceTokens, used - s0);
    for (size_t i = 0; i < ws.size(); ++i)
      probs[i].tokens = n, probs[i].x = &qx, probs[i].y = ws[i].y + s0 * rows[i];
    const float* xs = x.typed_data() + s0 * cols;
    const bool few = n <= kFewTokens;
    qx.resize(n, cols, !few);
    QuantX* q = &qx;
    // a decode batch's few rows on this thread alone: a second hand-off to the helpers per call
    // costs more than quantizing them (~1 us a token) where the cores are shared
    parallel_for(n, 64, [=](int64_t a, int64_t b) { quantize_rows(xs, a, b, q); });
    static_assert(kFewTokens == 4, "few_rows takes 1..4 tokens");
    parallel_for_each(rows, kRows, [&](size_t i, int64_t n0, int64_t n1) {
      const Problem& p = probs[i];
      dispatch(ws[i].t, [&](auto* tag) {
        using D = std::remove_pointer_t<decltype(tag)>;
        if (!few) return many_rows<D>(p, n0, n1);
        switch (p.tokens) {
          case 1: return few_rows<D, 1>(p, n0, n1);
          case 2: return few_rows<D, 2>(p, n0, n1);
          case 3: return few_rows<D, 3>(p, n0, n1);
          default: return few_rows<D, 4>(p, n0, n1);
        }
      });
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_q8dot, Q8Dot,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("qtypes")
                                  .Attr<ffi::Span<const int64_t>>("counts"));

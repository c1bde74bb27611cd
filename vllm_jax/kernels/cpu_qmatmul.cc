// GGUF-quantized matmul for the CPU, XLA FFI custom calls (built by kernels/cpu.py).
//
// XLA on the CPU cannot fuse bit unpacking into a dot, so a step with packed weights would
// materialize every weight in float32. Here each thread takes a few weight rows at a time,
// dequantizes them into a small buffer that stays in L1/L2 (the same float32 arithmetic as
// gguf-py, so the weights are bit-identical to `gguf.quants.dequantize`), and multiplies them
// by every token row while they are hot. Memory traffic is the packed bytes, ~5 bits a weight.
//
// The targets read the fields of kernels/quant.py's `repack` layout ([rows, ...] arrays, or E
// experts stacked as [E, rows, ...], passed in the order of FIELDS in kernels/cpu.py):
//   vllm_jax_qmatmul          x f32 [T, cols], fields... -> y f32 [T, rows]; attr qtype
//   vllm_jax_grouped_qmatmul  x f32 [T, cols] (rows sorted by expert), group_sizes i32 [E],
//                             fields... [E, rows, ...] -> y f32 [T, rows] (0 past the groups)
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace vllm_jax;

enum QType : int64_t { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K };
constexpr int64_t kMaxFields = 6;

struct Fields {  // row n of field i starts at base[i] + n * stride[i] (bytes)
  const uint8_t* base[kMaxFields];
  int64_t stride[kMaxFields];
  const uint8_t* row(int i, int64_t n) const { return base[i] + n * stride[i]; }
};

float f16_at(const uint8_t* p, int64_t i) {
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
  return f16(h);
}

// Q4_0..Q8_0, 32 weights a block: w = d * q (+ m), decoded 8 lanes at a time into registers.
template <QType t>
struct Legacy {
  static constexpr bool has_m = t == Q4_1 || t == Q5_1, has_h = t == Q5_0 || t == Q5_1;
  const uint8_t *d, *m, *qh, *qs;

  Legacy(const Fields& f, int64_t n)
      : d(f.row(0, n)), m(has_m ? f.row(1, n) : nullptr),
        qh(has_h ? f.row(has_m ? 2 : 1, n) : nullptr), qs(f.row(has_m + has_h + 1, n)) {}

  inline void decode(int64_t b, f8 w[4]) const {
    i32x8 v[4];
    if constexpr (t == Q8_0) {
      for (int g = 0; g < 4; ++g) v[g] = widen(reinterpret_cast<const int8_t*>(qs) + 32 * b + 8 * g);
    } else {
      const i32x8 a = widen(qs + 16 * b), c = widen(qs + 16 * b + 8);
      v[0] = a & 15, v[1] = c & 15, v[2] = a >> 4, v[3] = c >> 4;
      if constexpr (has_h) {
        uint32_t h;
        std::memcpy(&h, qh + 4 * b, 4);
        const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
        for (int g = 0; g < 4; ++g) v[g] |= (((i32x8{} + int32_t(h)) >> (lane + 8 * g)) & 1) << 4;
      }
    }
    const f8 db = splat(f16_at(d, b));
    if constexpr (has_m) {
      const f8 mb = splat(f16_at(m, b));
      for (int g = 0; g < 4; ++g) w[g] = db * to_f8(v[g]) + mb;
    } else {
      constexpr int offset = t == Q4_0 ? 8 : t == Q5_0 ? 16 : 0;
      for (int g = 0; g < 4; ++g) w[g] = db * to_f8(v[g] - offset);
    }
  }
};

template <QType t>
void dequant_row_legacy(const Fields& f, int64_t n, int64_t nb, float* out) {
  const Legacy<t> row(f, n);
  for (int64_t b = 0; b < nb; ++b, out += 32) {
    f8 w[4];
    row.decode(b, w);
    for (int g = 0; g < 4; ++g) store(out + 8 * g, w[g]);
  }
}

// One weight row -> out[cols]. Products are computed as gguf-py does (scale * q, then +/- min);
// they are exact in float32, so contracting them into FMAs changes nothing. K-quants go one
// scale's 16 or 32 weights at a time, a loop the compiler vectorizes: per element (index
// arithmetic for every weight) they decoded 5-15x slower, and decode is what few tokens wait on.
void dequant_row(QType t, const Fields& f, int64_t n, int64_t nb, float* out) {
  switch (t) {
    case Q4_0: return dequant_row_legacy<Q4_0>(f, n, nb, out);
    case Q4_1: return dequant_row_legacy<Q4_1>(f, n, nb, out);
    case Q5_0: return dequant_row_legacy<Q5_0>(f, n, nb, out);
    case Q5_1: return dequant_row_legacy<Q5_1>(f, n, nb, out);
    case Q8_0: return dequant_row_legacy<Q8_0>(f, n, nb, out);
    case Q2_K: {  // fields d, dmin, sc, qs
      const uint8_t *d = f.row(0, n), *dm = f.row(1, n), *sc = f.row(2, n), *qs = f.row(3, n);
      for (int64_t b = 0; b < nb; ++b) {
        const float db = f16_at(d, b), mb = f16_at(dm, b);
        for (int j = 0; j < 16; ++j, out += 16) {  // 16 weights of scale j: element 16j + i
          const int s = sc[16 * b + j], shift = 2 * ((j >> 1) & 3);
          const float dl = db * float(s & 15), ml = mb * float(s >> 4);
          const uint8_t* q2 = qs + 64 * b + 32 * (j >> 3) + 16 * (j & 1);
          for (int i = 0; i < 16; ++i) out[i] = dl * float((q2[i] >> shift) & 3) - ml;
        }
      }
      return;
    }
    case Q3_K: {  // fields d, sc (int8, -32..31), hmask, qs
      const uint8_t *d = f.row(0, n), *hm = f.row(2, n), *qs = f.row(3, n);
      const int8_t* sc = reinterpret_cast<const int8_t*>(f.row(1, n));
      for (int64_t b = 0; b < nb; ++b) {
        const float db = f16_at(d, b);
        for (int j = 0; j < 16; ++j, out += 16) {
          const float dl = db * float(sc[16 * b + j]);
          const uint8_t* q2 = qs + 64 * b + 32 * (j >> 3) + 16 * (j & 1);
          const uint8_t* h1 = hm + 32 * b + 16 * (j & 1);
          const int shift = 2 * ((j >> 1) & 3);
          for (int i = 0; i < 16; ++i) {
            const int low = (q2[i] >> shift) & 3, high = (h1[i] >> (j >> 1)) & 1;
            out[i] = dl * float(low - 4 + 4 * high);
          }
        }
      }
      return;
    }
    case Q4_K: case Q5_K: {  // fields d, dmin, sc, m, (qh,) qs
      const bool five = t == Q5_K;
      const uint8_t *d = f.row(0, n), *dm = f.row(1, n), *sc = f.row(2, n), *m = f.row(3, n);
      const uint8_t* qh = five ? f.row(4, n) : nullptr;
      const uint8_t* qs = f.row(five ? 5 : 4, n);
      for (int64_t b = 0; b < nb; ++b) {
        const float db = f16_at(d, b), mb = f16_at(dm, b);
        for (int j = 0; j < 8; ++j, out += 32) {  // 32 weights of scale j: element 32j + i
          const float dl = db * float(sc[8 * b + j]), ml = mb * float(m[8 * b + j]);
          const uint8_t* q4 = qs + 128 * b + 32 * (j >> 1);
          for (int i = 0; i < 32; ++i) {
            int q = (q4[i] >> (4 * (j & 1))) & 15;
            if (five) q |= ((qh[32 * b + i] >> j) & 1) << 4;
            out[i] = dl * float(q) - ml;
          }
        }
      }
      return;
    }
    case Q6_K: {  // fields d, sc (int8), ql, qh
      const uint8_t *d = f.row(0, n), *ql = f.row(2, n), *qh = f.row(3, n);
      const int8_t* sc = reinterpret_cast<const int8_t*>(f.row(1, n));
      for (int64_t b = 0; b < nb; ++b) {
        const float db = f16_at(d, b);
        for (int j = 0; j < 16; ++j, out += 16) {
          const float dl = db * float(sc[16 * b + j]);
          const uint8_t* lo4 = ql + 128 * b + 64 * (j >> 3) + 16 * (j & 3);
          const uint8_t* hi2 = qh + 64 * b + 32 * (j >> 3) + 16 * (j & 1);
          for (int i = 0; i < 16; ++i) {
            const int lo = (lo4[i] >> (4 * ((j >> 2) & 1))) & 15;
            const int hi = (hi2[i] >> (2 * ((j >> 1) & 3))) & 3;
            out[i] = dl * float((lo | hi << 4) - 32);
          }
        }
      }
      return;
    }
  }
}

int64_t block_elems(QType t) { return t <= Q8_0 ? 32 : 256; }

// -- the products: y[t, n] = x[t, :] . w[n, :], 8 lanes along cols, summed at the end --------

struct Out {  // y [tokens, rows] with the tile's first token and row
  float* y;
  int64_t rows, t0, n0;
};

template <int R, int TT>
inline void write(const f8 (&acc)[R][TT], const Out& o, int nrows) {
  for (int r = 0; r < nrows; ++r)
    for (int i = 0; i < TT; ++i) o.y[(o.t0 + i) * o.rows + o.n0 + r] = hsum(acc[r][i]);
}

// R dequantized rows w (stride cols) times TT token rows of x: R * TT accumulators, the weight
// vectors loaded once and reused by every token (12 accumulators + 4 weights = 16 registers).
template <int R, int TT>
void tile(const float* x, int64_t cols, const float* w, const Out& o, int nrows) {
  f8 acc[R][TT] = {};
  for (int64_t k = 0; k < cols; k += 8) {
    f8 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load<f8>(w + r * cols + k);
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      const f8 xi = load<f8>(x + (o.t0 + i) * cols + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][i] += xi * wv[r];
    }
  }
  write(acc, o, nrows);
}

// One row of a legacy type decoded block by block in registers, times TT (few) tokens: no buffer.
template <QType t, int TT>
void fused(const Fields& f, int64_t nb, const float* x, int64_t cols, const Out& o) {
  f8 acc[1][TT] = {};
  const Legacy<t> row(f, o.n0);
  for (int64_t b = 0; b < nb; ++b) {
    f8 w[4];
    row.decode(b, w);
#pragma GCC unroll 8
    for (int i = 0; i < TT; ++i) {
      const float* xb = x + (o.t0 + i) * cols + 32 * b;
      acc[0][i] += load<f8>(xb) * w[0] + load<f8>(xb + 8) * w[1] + load<f8>(xb + 16) * w[2] +
                   load<f8>(xb + 24) * w[3];
    }
  }
  write(acc, o, 1);
}

// Each field is [rows, ...] (ndim 2) or [experts, rows, ...] (ndim 3, the grouped target), all
// contiguous: row n of the whole [experts * rows, ...] starts at base + n * stride.
bool read_fields(const ffi::RemainingArgs& args, size_t first, size_t ndim, Fields* f,
                 int64_t* experts, int64_t* rows) {
  if (args.size() <= first || args.size() - first > size_t(kMaxFields)) return false;
  for (size_t i = first; i < args.size(); ++i) {
    auto buf = args.get<ffi::AnyBuffer>(i);
    if (buf.has_error() || buf->dimensions().size() != ndim) return false;
    auto dims = buf->dimensions();
    const int64_t e = ndim == 3 ? dims[0] : 1, r = dims[ndim - 2];
    if (i == first) *experts = e, *rows = r;
    if (e != *experts || r != *rows) return false;
    f->base[i - first] = static_cast<const uint8_t*>(buf->untyped_data());
    f->stride[i - first] = int64_t(buf->size_bytes() / std::max<int64_t>(e * r, 1));
  }
  return true;
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
    int64_t i = 0;
    for (; i + 2 <= p.tokens; i += 2) fused<Q, 2>(p.f, p.nb, p.x, p.cols, {p.y, p.rows, i, n});
    if (i < p.tokens) fused<Q, 1>(p.f, p.nb, p.x, p.cols, {p.y, p.rows, i, n});
  }
}

// R rows dequantized in `w` times V * 8 tokens of xt, starting at token i: each weight is
// broadcast against 8 tokens at once, so the sums come out per token with no horizontal adds
// (2 x loads + 6 broadcasts per 12 FMAs: the GEMM micro-kernel shape).
template <int R, int V>
void tile_t(const Problem& p, const float* w, int64_t n, int nrows, int64_t i) {
  f8 acc[R][V] = {};
  const float* xt = p.xt + i;
  for (int64_t k = 0; k < p.cols; ++k) {
    f8 xv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) xv[v] = load<f8>(xt + k * p.padded_tokens + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const f8 wb = splat(w[r * p.cols + k]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] += xv[v] * wb;
    }
  }
  for (int r = 0; r < nrows; ++r)
    for (int j = 0; j < 8 * V && i + j < p.tokens; ++j)
      p.y[(i + j) * p.rows + n + r] = acc[r][j / 8][j % 8];
}

// Asks for the packed bytes of rows [n0, n1) while the current panel is multiplied: the
// hardware prefetcher alone leaves the next panel's dequantization waiting on memory.
void prefetch_rows(const Fields& f, int64_t n0, int64_t n1) {
  for (int i = 0; i < kMaxFields && f.base[i]; ++i)
    for (const uint8_t *a = f.row(i, n0), *e = f.row(i, n1); a < e; a += 64)
      __builtin_prefetch(a, 0, 3);
}

constexpr int kPanel = 6;  // rows dequantized together for many tokens

void buffered_rows(const Problem& p, int64_t n0, int64_t n1, float* buf) {
  const int group = p.xt ? kPanel : 4;
  for (int64_t n = n0; n < n1; n += group) {
    const int nr = int(std::min<int64_t>(group, n1 - n));
    for (int r = 0; r < group; ++r)
      dequant_row(p.t, p.f, n + std::min(r, nr - 1), p.nb, buf + r * p.cols);
    if (p.xt) {
      prefetch_rows(p.f, std::min(n + group, n1), std::min(n + 2 * group, n1));
      int64_t i = 0;
      for (; i + 16 <= p.padded_tokens; i += 16) tile_t<kPanel, 2>(p, buf, n, nr, i);
      if (i < p.padded_tokens) tile_t<kPanel, 1>(p, buf, n, nr, i);
      continue;
    }
    int64_t i = 0;
    for (; i + 3 <= p.tokens; i += 3) tile<4, 3>(p.x, p.cols, buf, {p.y, p.rows, i, n}, nr);
    if (p.tokens - i == 2) tile<4, 2>(p.x, p.cols, buf, {p.y, p.rows, i, n}, nr);
    if (p.tokens - i == 1) tile<4, 1>(p.x, p.cols, buf, {p.y, p.rows, i, n}, nr);
  }
}

void matmul_rows(const Problem& p, int64_t n0, int64_t n1) {
  if (!p.xt) {
    switch (p.t) {
      case Q4_0: return fused_rows<Q4_0>(p, n0, n1);
      case Q4_1: return fused_rows<Q4_1>(p, n0, n1);
      case Q5_0: return fused_rows<Q5_0>(p, n0, n1);
      case Q5_1: return fused_rows<Q5_1>(p, n0, n1);
      case Q8_0: return fused_rows<Q8_0>(p, n0, n1);
      default: break;
    }
  }
  thread_local std::vector<float> buf;
  buf.resize(std::max<size_t>(buf.size(), kPanel * p.cols));
  buffered_rows(p, n0, n1, buf.data());
}

constexpr int64_t kSliceTokens = 64;  // tokens per pass over the weights (x^T slice in L2)

// x [tokens, cols] -> xt [cols, padded_tokens] (zero padded), 8 x 8 blocks in registers.
void transpose(const float* x, int64_t tokens, int64_t cols, int64_t padded_tokens, float* xt) {
  for (int64_t i = 0; i < padded_tokens; i += 8)
    for (int64_t k = 0; k < cols; k += 8) {
      f8 r[8], t[8], u[8];
      for (int j = 0; j < 8; ++j) r[j] = i + j < tokens ? load<f8>(x + (i + j) * cols + k) : f8{};
      for (int j = 0; j < 8; j += 2) {
        t[j] = __builtin_shufflevector(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[j + 1] = __builtin_shufflevector(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
      for (int j = 0; j < 8; j += 4)
        for (int h = 0; h < 2; ++h) {
          u[j + 2 * h] = __builtin_shufflevector(t[j + h], t[j + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
          u[j + 2 * h + 1] =
              __builtin_shufflevector(t[j + h], t[j + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
      float* dst = xt + k * padded_tokens + i;  // column c of the block is u[c % 4] / u[c % 4 + 4]
      for (int c = 0; c < 4; ++c) {
        store(dst + c * padded_tokens,
              __builtin_shufflevector(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11));
        store(dst + (c + 4) * padded_tokens,
              __builtin_shufflevector(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15));
      }
    }
}

ffi::Error QMatmul(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                   ffi::ResultBuffer<ffi::F32> y, int64_t qtype) {
  Problem whole{};
  whole.t = QType(qtype);
  int64_t experts;
  if (qtype < Q4_0 || qtype > Q6_K || !read_fields(args, 0, 2, &whole.f, &experts, &whole.rows))
    return ffi::Error::InvalidArgument("vllm_jax_qmatmul: bad quantized weight fields");
  const int64_t tokens = x.dimensions()[0], rows = whole.rows;
  whole.cols = x.dimensions()[1], whole.nb = whole.cols / block_elems(whole.t);
  thread_local std::vector<float> xt;
  // Many tokens (a prefill) go in slices: each dequantizes the weights again (~7% of the work
  // at 64 tokens), which beats materializing a float32 copy of every weight per step
  for (int64_t t0 = 0; t0 < tokens; t0 += kSliceTokens) {
    Problem p = whole;
    p.tokens = std::min(kSliceTokens, tokens - t0);
    p.x = x.typed_data() + t0 * p.cols, p.y = y->typed_data() + t0 * rows;
    p.padded_tokens = (p.tokens + 7) / 8 * 8;
    if (p.tokens > kFewTokens) {
      xt.resize(p.cols * p.padded_tokens);
      transpose(p.x, p.tokens, p.cols, p.padded_tokens, xt.data());
      p.xt = xt.data();
    }
    parallel_for(rows, 12, [&p](int64_t n0, int64_t n1) { matmul_rows(p, n0, n1); });
  }
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
  if (qtype < Q4_0 || qtype > Q6_K || !read_fields(args, 0, 3, &whole.f, &experts, &whole.rows) ||
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
      p.padded_tokens = (p.tokens + 7) / 8 * 8;
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
  // costs [v0, v1) takes the rows whose cost starts in it, in runs of 12 rows as qmatmul's
  std::vector<int64_t> start(probs.size() + 1, 0);
  for (size_t i = 0; i < probs.size(); ++i)
    start[i + 1] = start[i] + rows * (kRowCost + probs[i].tokens);
  auto first_row = [&](size_t i, int64_t v) {
    const int64_t cost = kRowCost + probs[i].tokens;
    const int64_t n = (std::max<int64_t>(0, v - start[i]) + cost - 1) / cost;
    return std::min(rows, (n + 11) / 12 * 12);
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_grouped_qmatmul, GroupedQMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("qtype"));

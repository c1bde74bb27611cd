// Dense matmul with 16-bit weights kept as they are in memory, an XLA FFI custom call (built by
// kernels/cpu.py):
//   vllm_jax_dense_matmul  x [T, K] f32|bf16|f16, weights w_i [N_i, K] of one dtype, bf16|f16|f32
//                          -> y_i f32 [T, N_i] = x . w_i^T
//
// XLA's CPU dot runs a decode step's bfloat16 operands 3-25x slower than float32 ones, and a
// float32 copy of the weights would double the bytes a decode step streams. Here each weight is
// widened to float32 in registers (bfloat16: a 16-bit shift; float16: vcvtph2ps / F16C), so the
// products are of the exact values (an FMA rounds a float32 activation times a widened weight
// once, in the sum) and the sums are float32. With bfloat16 activations and weights on a CPU
// with AVX512-BF16, vdpbf16ps multiplies pairs of adjacent columns as they are instead (exact
// products, float32 sums, 32 products an instruction; it reads subnormal inputs as 0 and
// flushes subnormal sums).
//
// The shapes of cpu_qmatmul.cc: up to 8 tokens (decode, memory-bound), each thread streams its
// run of rows once and multiplies each vector of a row by every token; more tokens
// (compute-bound), a register tile multiplies a panel of rows by 1-2 vectors of tokens of the
// transposed activations, each weight broadcast from the panel (widened into L1 a chunk ahead
// of its FMAs, and reused by the tile's later token vectors).
//
// The activations are packed (converted, zero-padded, transposed for the tiles) into "lanes":
// what one 32-bit lane holds, a float32 (G = 1 column a lane) or a bfloat16 pair (G = 2). Rows
// of kq lanes are padded to a multiple of L; the weights' last partial chunk comes through a
// zeroed copy (never read past a row, and no garbage times the zero padding: Inf * 0 is NaN).
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace vllm_jax;

#if defined(__AVX512BF16__) && defined(VLLM_JAX_AVX512)
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// acc + x * w lane by lane: an FMA (G = 1), or the two products of each lane's pair (G = 2)
template <int G>
inline fv mac(fv acc, fv x, fv w) {
#if defined(__AVX512BF16__) && defined(VLLM_JAX_AVX512)
  if constexpr (G == 2) return (fv)_mm512_dpbf16_ps((__m512)acc, (__m512bh)x, (__m512bh)w);
#endif
  return acc + x * w;
}

// L lanes of weights from p: widened to float32 (G = 1), or bfloat16 pairs as they are (G = 2)
template <int G>
inline fv widen_w(const float* p) { return load<fv>(p); }

template <int G>
inline fv widen_w(const bfloat16* p) {
  if constexpr (G == 2) return load<fv>(p);
  typedef uint16_t u16v __attribute__((vector_size(2 * L)));
  typedef uint32_t u32v __attribute__((vector_size(4 * L)));
  const u32v bits = __builtin_convertvector(load<u16v>(p), u32v) << 16;
  fv r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

template <int G>
inline fv widen_w(const half* p) {
#if defined(VLLM_JAX_AVX512)
  return (fv)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return load8(p);
#endif
}

// the last chunk of a row: its n < G * L weights, zero after them
template <int G, typename W>
inline fv widen_tail(const W* p, int64_t n) {
  W tmp[G * L] = {};
  std::memcpy(tmp, p, n * sizeof(W));
  return widen_w<G>(tmp);
}

// chunk c (lanes c * L..) of a row of `cols` weights
template <int G, typename W>
inline fv wchunk(const W* row, int64_t c, int64_t cols) {
  const int64_t k = c * G * L;
  return cols - k >= G * L ? widen_w<G>(row + k) : widen_tail<G>(row + k, cols - k);
}

// 8 lanes of an activation row from lane k: float32 (G = 1) or bfloat16 pairs, zero past cols
template <int G, typename X>
inline f8 x8(const X* row, int64_t k, int64_t cols) {
  const int64_t c0 = G * k, n = cols - c0;
  X tmp[8 * G] = {};
  const X* p = row + c0;
  if (n < 8 * G) {
    if (n > 0) std::memcpy(tmp, p, n * sizeof(X));
    p = tmp;
  }
  if constexpr (G == 2) return load<f8>(p);
  else return load8(p);
}

struct Dense {
  const void* w;   // [rows, cols]
  const float* x;  // packed lanes: [tokens, kq] (few tokens) or [kq, padded] (many, transposed)
  float* y;        // [tokens, rows]
  int64_t tokens, padded, rows, cols, kq;
};

// -- few tokens: y[t, n] = sum over the row's vectors, summed across lanes at the end ----------
//
// Each token has A sums that the row's chunks take turns in, so the FMAs do not wait on each
// other's latency (one chain a token ran well below the cache's rate). Up to 8 tokens: a tile
// pads them to 16 and broadcasts each weight, 5-8 tokens here were 1.5-2x faster. The rows
// are one stream, asked for kAhead bytes ahead (on top of the hardware's prefetch: ~10% faster
// from memory).
constexpr int64_t kFewTokens = 8, kAhead = 4096;

template <int G, typename W, int TT>
void few_rows(const Dense& p, int64_t n0, int64_t n1) {
  constexpr int A = TT == 1 ? 4 : TT <= 4 ? 2 : 1;
  const int64_t full = p.cols / (G * L), chunks = p.kq / L;
  const float* x = p.x;
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = static_cast<const W*>(p.w) + n * p.cols;
    fv acc[TT][A] = {};
    auto add = [&](int a, int64_t c, fv w) {
#pragma GCC unroll 8
      for (int t = 0; t < TT; ++t)
        acc[t][a] = mac<G>(acc[t][a], load<fv>(x + t * p.kq + c * L), w);
    };
    int64_t c = 0;
    for (; c + A <= full; c += A)
#pragma GCC unroll 4
      for (int a = 0; a < A; ++a) {
        const W* at = row + (c + a) * G * L;
        __builtin_prefetch(reinterpret_cast<const char*>(at) + kAhead);
        add(a, c + a, widen_w<G>(at));
      }
    for (; c < full; ++c) add(0, c, widen_w<G>(row + c * G * L));
    if (c < chunks) add(0, c, widen_tail<G>(row + c * G * L, p.cols - c * G * L));
    for (int t = 0; t < TT; ++t) {
      fv sum = acc[t][0];
      for (int a = 1; a < A; ++a) sum += acc[t][a];
      p.y[t * p.rows + n] = hsum(sum);
    }
  }
}

// -- many tokens: register tiles ---------------------------------------------------------------
//
// R rows of a panel from its row r0 times NV * L tokens from token i (the GEMM micro-kernel of
// cpu_qmatmul.cc's tile_t): each lane of weights is broadcast against vectors of tokens, so sums
// come out per token with no horizontal adds. The panel holds kRows rows' widened lanes as
// [kq / L][kRows][L] (one pointer, constant offsets); the first tile on a panel (Fill) writes
// each next chunk there between its FMAs, so it is in L1 when used, and asks for the next
// panel's rows (contiguous: one stream) a few lines a chunk (without, a 49152-row matrix ran at
// half the memory's rate); the other tiles reuse the panel. Rows past nrows repeat the last one.
// Panels of 24 rows with 12 x 2-vector tiles measured 10% faster at 128 tokens than 12-row ones,
// and than 6 x 4 and 8 x 2 tiles.
#if defined(VLLM_JAX_AVX512)
constexpr int kRows = 24, kTile = 12;  // 12 x 2 or 12 x 1 accumulators of the 32 registers
#else
constexpr int kRows = 6, kTile = 6;  // 6 x 2 or 6 x 1 of the 16
#endif

template <int G, typename W, int NV, bool Fill>
void tile(const Dense& p, int64_t n, int nrows, int r0, int64_t i, float* panel) {
  constexpr int R = kTile;
  const W* const w0 = static_cast<const W*>(p.w) + n * p.cols;
  const int64_t chunks = p.kq / L;
  const char* pf = reinterpret_cast<const char*>(w0 + kRows * p.cols);
  const char* const pf_end = reinterpret_cast<const char*>(
      static_cast<const W*>(p.w) + std::min(p.rows, n + 2 * kRows) * p.cols);
  const int64_t pf_step = (kRows * p.cols * int64_t(sizeof(W)) / 64 + chunks - 1) / chunks * 64;
  auto fill = [&](int64_t c) {
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const W* row = w0 + std::min(r, nrows - 1) * p.cols;
      store(panel + (c * kRows + r) * L, wchunk<G>(row, c, p.cols));
    }
    for (const char* e = std::min(pf + pf_step, pf_end); pf < e; pf += 64) __builtin_prefetch(pf);
  };
  if (Fill && chunks) fill(0);
  fv acc[R][NV] = {};
  for (int64_t c = 0; c < chunks; ++c) {
    const float* w = panel + (c * kRows + r0) * L;
    const float* xt = p.x + c * L * p.padded + i;
    for (int kk = 0; kk < L; ++kk) {
      fv xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = load<fv>(xt + kk * p.padded + L * v);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const fv wb = bcast<fv>(w[r * L + kk]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = mac<G>(acc[r][v], xv[v], wb);
      }
    }
    if (Fill && c + 1 < chunks) fill(c + 1);
  }
  write_t(p.y, p.rows, p.tokens, acc, n + r0, std::min(R, nrows - r0), i);
}

// rows [n0, n1), a panel of kRows at a time: its tiles of kTile rows times 2 vectors of tokens,
// and 1 for an odd last vector
template <int G, typename W>
void many_rows(const Dense& p, int64_t n0, int64_t n1, float* panel) {
  const int64_t vecs = p.padded / L;
  for (int64_t n = n0; n < n1; n += kRows) {
    const int nr = int(std::min<int64_t>(kRows, n1 - n));
    for (int64_t v = 0; v < vecs; v += 2)
      for (int r0 = 0; r0 < nr; r0 += kTile) {
        const bool first = v == 0 && r0 == 0;
        if (v + 2 <= vecs)
          (first ? tile<G, W, 2, true> : tile<G, W, 2, false>)(p, n, nr, r0, v * L, panel);
        else
          (first ? tile<G, W, 1, true> : tile<G, W, 1, false>)(p, n, nr, r0, v * L, panel);
      }
  }
}

template <int G, typename W>
void rows_of(const Dense& p, int64_t n0, int64_t n1) {
  switch (p.tokens <= kFewTokens ? p.tokens : 0) {
    case 1: return few_rows<G, W, 1>(p, n0, n1);
    case 2: return few_rows<G, W, 2>(p, n0, n1);
    case 3: return few_rows<G, W, 3>(p, n0, n1);
    case 4: return few_rows<G, W, 4>(p, n0, n1);
    case 5: return few_rows<G, W, 5>(p, n0, n1);
    case 6: return few_rows<G, W, 6>(p, n0, n1);
    case 7: return few_rows<G, W, 7>(p, n0, n1);
    case 8: return few_rows<G, W, 8>(p, n0, n1);
  }
  thread_local std::vector<float> panel;
  panel.resize(std::max<size_t>(panel.size(), kRows * p.kq));
  many_rows<G, W>(p, n0, n1, panel.data());
}

constexpr int64_t kSliceTokens = 128;  // tokens per pass over the weights (4% faster than 64)

struct Weight {  // one weight [rows, cols] of a call and its output y [tokens, rows]
  const void* w;
  float* y;
  int64_t rows;
};

// ws[i].y = x . w_i^T for each weight (all of type W): x packed once, one parallel_for over
// every weight's rows
template <int G, typename W, typename X>
void dense(const std::vector<Weight>& ws, const X* x, int64_t tokens, int64_t cols) {
  thread_local std::vector<float> xbuf;  // the caller's: the helpers see it through p.x
  std::vector<Dense> ps(ws.size());
  std::vector<int64_t> rows;
  for (const Weight& w : ws) rows.push_back(w.rows);
  for (int64_t t0 = 0; t0 < tokens; t0 += kSliceTokens) {
    Dense p{nullptr, nullptr, nullptr, std::min(kSliceTokens, tokens - t0), 0, 0, cols,
            (cols + G * L - 1) / (G * L) * L};
    const X* xs = x + t0 * cols;
    if (p.tokens <= kFewTokens) {  // [tokens, kq]
      p.padded = p.tokens;
      xbuf.resize(p.tokens * p.kq);
      for (int64_t t = 0; t < p.tokens; ++t)
        for (int64_t k = 0; k < p.kq; k += 8)
          store(&xbuf[t * p.kq + k], x8<G>(xs + t * cols, k, cols));
    } else {  // [kq, padded], 8 x 8 blocks transposed in registers
      p.padded = (p.tokens + L - 1) / L * L;
      xbuf.resize(p.kq * p.padded);
      for (int64_t i = 0; i < p.padded; i += 8)
        for (int64_t k = 0; k < p.kq; k += 8) {
          f8 r[8];
          for (int j = 0; j < 8; ++j)
            r[j] = i + j < p.tokens ? x8<G>(xs + (i + j) * cols, k, cols) : f8{};
          transpose8(r);
          for (int c = 0; c < 8; ++c) store(&xbuf[(k + c) * p.padded + i], r[c]);
        }
    }
    p.x = xbuf.data();
    for (size_t i = 0; i < ws.size(); ++i) {
      ps[i] = p;
      ps[i].w = ws[i].w, ps[i].y = ws[i].y + t0 * ws[i].rows, ps[i].rows = ws[i].rows;
    }
    parallel_for_each(rows, kRows,
                      [&](size_t i, int64_t n0, int64_t n1) { rows_of<G, W>(ps[i], n0, n1); });
  }
}

template <int G, typename W>
bool with_x(const ffi::AnyBuffer& x, const std::vector<Weight>& ws) {
  const int64_t tokens = x.dimensions()[0], cols = x.dimensions()[1];
  const void* xd = x.untyped_data();
  auto run = [&](auto* xp) {
    const int64_t used = rows_in_use(xp, tokens, cols);
    dense<G, W>(ws, xp, used, cols);
    for (const Weight& w : ws) zero_rows(w.y, used, tokens, w.rows);
  };
  switch (x.element_type()) {  // pairs (G = 2): bfloat16 activations only
    case ffi::DataType::BF16: return run(static_cast<const bfloat16*>(xd)), true;
    case ffi::DataType::F32: if constexpr (G == 1) return run(static_cast<const float*>(xd)), true;
    case ffi::DataType::F16: if constexpr (G == 1) return run(static_cast<const half*>(xd)), true;
    default: return false;
  }
}

ffi::Error DenseMatmul(ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets ys) {
  const auto xd = x.dimensions();
  std::vector<Weight> ws;
  ffi::DataType wt = ffi::DataType::INVALID;
  bool ok = xd.size() == 2 && args.size() == ys.size() && !args.empty();
  for (size_t i = 0; ok && i < args.size(); ++i) {
    auto w = args.get<ffi::AnyBuffer>(i);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    ok = !w.has_error() && !y.has_error() && w->dimensions().size() == 2 &&
         w->dimensions()[1] == xd[1] && (i == 0 || w->element_type() == wt) &&
         (*y)->dimensions().size() == 2 && (*y)->dimensions()[0] == xd[0] &&
         (*y)->dimensions()[1] == w->dimensions()[0];
    if (ok) {
      wt = w->element_type();
      ws.push_back({w->untyped_data(), (*y)->typed_data(), w->dimensions()[0]});
    }
  }
  if (!ok)
    return ffi::Error::InvalidArgument(
        "vllm_jax_dense_matmul: x [T, K] and weights [N_i, K] of one dtype expected");
  ok = false;
  switch (wt) {
    case ffi::DataType::BF16:
      if constexpr (kBf16Dot)
        if (x.element_type() == ffi::DataType::BF16) {
          ok = with_x<2, bfloat16>(x, ws);
          break;
        }
      ok = with_x<1, bfloat16>(x, ws);
      break;
    case ffi::DataType::F16: ok = with_x<1, half>(x, ws); break;
    case ffi::DataType::F32: ok = with_x<1, float>(x, ws); break;
    default: break;
  }
  if (!ok) return ffi::Error::InvalidArgument("vllm_jax_dense_matmul: unsupported dtypes");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_dense_matmul, DenseMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());

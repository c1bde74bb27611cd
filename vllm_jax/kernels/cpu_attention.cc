// Paged attention for the CPU, XLA FFI custom calls (built by kernels/cpu.py).
//
// The XLA reference (paged_attention.decode_attention) gathers whole chunks of pages into new
// arrays and loops in a while loop; for one query a row that is mostly copying. Here each
// (sequence, KV head) reads its own keys and values in place through the block table, once:
// scores for the G query heads that share the KV head, an exact softmax over each 1024-key span of
// the context (max first, then exp) and the weighted sum of values; the spans' partials merge
// exactly (log-sum-exp), so one long context is shared by the threads, and every row's result
// depends on its own context only (a decode row gives the same bits in either call).
//
//   vllm_jax_decode_attention  q f32 [S, H, D], k_cache/v_cache [KVH, P, PS, D] of float32,
//                              float16 or bfloat16 (read as float32; all math in float32),
//                              block_tables i32 [S, B], context_lens i32 [S]
//                              -> o f32 [S, H, D]; attrs scale, window (0 = none)
//   vllm_jax_ragged_attention  the same, but q/o hold T query tokens, each of its own sequence
//                              (seq_idx i32 [T]) at its own position (positions i32 [T], -1 for
//                              padding), causal: decode rows and prompt chunks in one call.
//                              Each token is one decode-style query over keys 0..position.
#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace vllm_jax;

// exp for 8 lanes (Cephes' expf: 2^n * e^r, |r| <= ln2 / 2, a degree-6 polynomial; ~1 ulp)
inline f8 exp8(f8 x) {
  x = x < -87.33654f ? splat(-87.33654f) : x;
  const f8 t = x * 1.44269504088896341f;
  f8 n = __builtin_convertvector(__builtin_convertvector(t + 0.5f, i32x8), f8);
  n = n > t + 0.5f ? n - 1.f : n;  // floor(t + 0.5)
  const f8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i32x8 scale = (__builtin_convertvector(n, i32x8) + 127) << 23;
  f8 two_n;
  std::memcpy(&two_n, &scale, sizeof two_n);
  return p * two_n;
}

template <typename T>  // the caches' element type: float, half or bfloat16
struct Attn {
  const float* q;
  const T *k, *v;
  const int32_t *tables, *lens;
  const int32_t *seq_idx, *positions;  // null for decode: query row s is sequence s, at the end
  float* o;
  int64_t heads, kv_heads, dim, pages, page_size, num_seqs, max_pages;
  float scale;
  int64_t window;
};

// The sequence query row `row` reads and how many of its keys (0: a padding row).
template <typename T>
inline int64_t row_context(const Attn<T>& a, int64_t row, int64_t& seq) {
  if (!a.seq_idx) {
    seq = row;
    return a.lens[row];
  }
  seq = a.seq_idx[row];
  if (seq < 0 || seq >= a.num_seqs) return 0;
  return a.lens[seq] > 0 ? std::min<int64_t>(a.positions[row] + 1, a.lens[seq]) : 0;
}

template <typename T>
inline const T* kv_row(const Attn<T>& a, const T* cache, int64_t s, int64_t h, int64_t j) {
  const int64_t page = a.tables[s * a.max_pages + j / a.page_size];
  return cache + ((h * a.pages + page) * a.page_size + j % a.page_size) * a.dim;
}

// 8 vectors -> one vector of their 8 sums (a transposing reduction: 7 adds, no scalar work).
inline f8 sum8(const f8 (&a)[8]) {
  f8 p[4], q[2];
  for (int i = 0; i < 4; ++i)
    p[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)
    q[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(q[0], q[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(q[0], q[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// A page's rows are contiguous, and so are a sequence's pages where they were handed out in a
// run: the hardware prefetcher follows those (in a streaming read on this Zen 4, also across 4 KiB
// pages), and prefetching every row ahead was slower than none. What it cannot guess is a jump:
// the first rows of a page that does not follow the one before it in memory, and of V after K.
// Those are asked for kAhead rows early, their first kJumpBytes.
constexpr int64_t kAhead = 32, kJumpBytes = 1024;

// Prefetches the first kJumpBytes (from key j0 on, in its page) of the pages that start among keys
// [j0, j1) of sequence s (KV head h) and do not follow their predecessor in the cache; `first`:
// the page of key j0 too. (The empty asm is an effect GCC 12 keeps: to its mod-ref analysis a
// helper with only __builtin_prefetch in it is free of side effects, and the calls were dropped.)
template <typename T>
inline void prefetch_jumps(const Attn<T>& a, const T* cache, int64_t s, int64_t h, int64_t j0,
                           int64_t j1, bool first = false) {
  const int32_t* table = a.tables + s * a.max_pages;
  const int64_t ps = a.page_size;
  for (int64_t p = first ? j0 / ps : (j0 + ps - 1) / ps; p * ps < j1; ++p) {
    if (p * ps >= j0 && p > 0 && table[p] == table[p - 1] + 1) continue;
    const int64_t row = std::max<int64_t>(j0 - p * ps, 0);  // of the page
    const T* r = cache + ((h * a.pages + table[p]) * ps + row) * a.dim;
    const int64_t bytes = std::min<int64_t>(kJumpBytes, (ps - row) * a.dim * int64_t(sizeof(T)));
    for (int64_t b = 0; b < bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(r) + b, 0, 3);
    asm volatile("");
  }
}

// Heads a V vector is read for (converted once for them) and the output vectors of each kept in
// registers over a block of rows, by register count: the fastest of 1-3 heads and 4 or 8 vectors
// on Zen 4, native and -march=haswell, from memory and from cache. (Two heads a K vector read
// was faster from cache but slower from memory.)
#if defined(VLLM_JAX_AVX512)  // 32 vector registers
constexpr int kVHeads = 2, kVVecs = 8;
#else  // 16
constexpr int kVHeads = 2, kVVecs = 4;
#endif

// A row's context (from its window's first key) is cut into spans of kSpan keys at fixed offsets
// (shorter spans cost more: 512-key spans took ~15% more CPU than one pass at 8k keys, 1024 4-8%).
// Each span gives a partial: per head g of the group, m[g] its highest score, l[g] its sum of
// exp(score - m[g]) and acc[g] = sum_j exp(score_j - m[g]) v_j; the partials are merged in span
// order by merge_into, whichever thread computed them. So a row's result depends on its context
// only (not on the batch, the thread count or which path ran), and a context of one span is the
// plain softmax: acc * (1 / l). Part layout: [G] m, [G] l, [G * D] acc.
constexpr int64_t kSpan = 1024;
// The (row, KV head, span) split (partials in one shared buffer, merged after) is used while the
// buffer stays this small; past it (a prompt chunk: many rows) a thread takes whole rows.
constexpr int64_t kSplitBytes = 1 << 20;
constexpr int64_t kBlockRows = 16;  // query rows a thread takes at once on the other path

struct Scratch {
  std::vector<float> scores, run, part;
  std::vector<f8> acc;
};

// The keys row `row` attends to: [lo, lo + n) of sequence s (n = 0: a padding row).
template <typename T>
inline int64_t row_span(const Attn<T>& a, int64_t row, int64_t& s, int64_t& lo) {
  const int64_t ctx = row_context(a, row, s);
  lo = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0;
  return std::max<int64_t>(0, ctx - lo);
}

// Keys [j0, j0 + n) of sequence s for query row `row` and KV head h -> its partial in `part`.
// Keys come in blocks of 8 rows (scores of 8 rows at once for each head, summed by sum8); values
// in blocks of up to 16 rows (kVHeads heads' outputs, kVVecs vectors each, stay in registers over
// the block). D8 is the head dimension in vectors (0: read it at run time).
template <int D8, typename T>
void attend_span(const Attn<T>& a, int64_t row, int64_t s, int64_t h, int64_t j0, int64_t n,
                 Scratch& w, float* part) {
  const int64_t g_count = a.heads / a.kv_heads, d8 = D8 ? D8 : a.dim / 8;
  const int64_t stride = (n + 7) / 8 * 8;
  w.scores.resize(g_count * stride);
  w.acc.assign(2 * g_count * d8, f8{});
  const float* q = a.q + (row * a.heads + h * g_count) * a.dim;  // G rows of dim
  f8* qs = w.acc.data() + g_count * d8;  // q * scale, as the reference scales it
  for (int64_t i = 0; i < g_count * d8; ++i) qs[i] = load<f8>(q + 8 * i) * a.scale;
  prefetch_jumps(a, a.v, s, h, j0, j0 + 1, true);
  for (int64_t j = 0; j < n; j += 8) {  // scores
    prefetch_jumps(a, a.k, s, h, j0 + std::min(j + kAhead, n), j0 + std::min(j + kAhead + 8, n));
    const T* kr[8];
    for (int r = 0; r < 8; ++r) kr[r] = kv_row(a, a.k, s, h, j0 + std::min(j + r, n - 1));
    for (int64_t g = 0; g < g_count; ++g) {
      f8 dot[8] = {};
      const f8* qg = qs + g * d8;
      for (int64_t i = 0; i < d8; ++i)
        for (int r = 0; r < 8; ++r) dot[r] += qg[i] * load8(kr[r] + 8 * i);
      store(w.scores.data() + g * stride + j, sum8(dot));
    }
  }
  float *m = part, *l = part + g_count;
  for (int64_t g = 0; g < g_count; ++g) {  // softmax numerators, in place
    float* sc = w.scores.data() + g * stride;
    std::fill(sc + n, sc + stride, -INFINITY);
    f8 top = splat(-INFINITY);
    for (int64_t j = 0; j < stride; j += 8) {
      const f8 x = load<f8>(sc + j);
      top = top > x ? top : x;
    }
    m[g] = *std::max_element(&top[0], &top[0] + 8);
    f8 total = {};
    for (int64_t j = 0; j < stride; j += 8) {
      const f8 e = exp8(load<f8>(sc + j) - m[g]);
      store(sc + j, e);
      total += e;
    }
    l[g] = hsum(total);
  }
  for (int64_t j = 0; j < n; j += 16) {  // acc[g] = sum_j p[g][j] v[j]
    const int rows = int(std::min<int64_t>(16, n - j));
    prefetch_jumps(a, a.v, s, h, j0 + std::min(j + kAhead, n), j0 + std::min(j + kAhead + 16, n));
    const T* vr[16];
    for (int r = 0; r < rows; ++r) vr[r] = kv_row(a, a.v, s, h, j0 + j + r);
    for (int64_t g0 = 0; g0 < g_count; g0 += kVHeads) {  // kVHeads heads a V vector read
      const int heads = int(std::min<int64_t>(kVHeads, g_count - g0));
      const float* p = w.scores.data() + g0 * stride + j;
      for (int64_t c = 0; c < d8; c += kVVecs) {  // kVVecs output vectors a head at a time
        f8 o[kVHeads][kVVecs];
        for (int g = 0; g < kVHeads; ++g)
          for (int i = 0; i < kVVecs; ++i)
            if (g < heads && c + i < d8) o[g][i] = w.acc[(g0 + g) * d8 + c + i];
        for (int r = 0; r < rows; ++r) {
          f8 v[kVVecs];
          for (int i = 0; i < kVVecs; ++i)
            if (c + i < d8) v[i] = load8(vr[r] + 8 * (c + i));
          for (int g = 0; g < kVHeads; ++g) {
            if (g >= heads) continue;
            const f8 pr = splat(p[g * stride + r]);
            for (int i = 0; i < kVVecs; ++i)
              if (c + i < d8) o[g][i] += pr * v[i];
          }
        }
        for (int g = 0; g < kVHeads; ++g)
          for (int i = 0; i < kVVecs; ++i)
            if (g < heads && c + i < d8) w.acc[(g0 + g) * d8 + c + i] = o[g][i];
      }
    }
  }
  std::memcpy(part + 2 * g_count, w.acc.data(), g_count * a.dim * sizeof(float));
}

// run <- run merged with the next span's partial: both rescaled to the larger max.
inline void merge_into(float* run, const float* part, int64_t g_count, int64_t dim) {
  for (int64_t g = 0; g < g_count; ++g) {
    const float top = std::max(run[g], part[g]);
    const float x = std::exp(run[g] - top), y = std::exp(part[g] - top);
    run[g] = top;
    run[g_count + g] = x * run[g_count + g] + y * part[g_count + g];
    float* acc = run + 2 * g_count + g * dim;
    const float* add = part + 2 * g_count + g * dim;
    for (int64_t i = 0; i < dim; i += 8) store(acc + i, x * load<f8>(acc + i) + y * load8(add + i));
  }
}

// The merged partial of a row's G heads -> their outputs (run null: a padding row, zeros).
inline void finish(const float* run, float* out, int64_t g_count, int64_t dim) {
  if (!run) {
    std::fill(out, out + g_count * dim, 0.f);
    return;
  }
  for (int64_t g = 0; g < g_count; ++g) {
    const float inv = 1.f / run[g_count + g];
    const float* acc = run + 2 * g_count + g * dim;
    for (int64_t i = 0; i < dim; i += 8) store(out + g * dim + i, load<f8>(acc + i) * inv);
  }
}

template <typename T>
inline float* row_out(const Attn<T>& a, int64_t row, int64_t h) {
  return a.o + (row * a.heads + h * (a.heads / a.kv_heads)) * a.dim;
}

// Query rows [r0, r1) (a block of a prompt chunk) and KV head h, by one thread: span by span,
// each span's keys for every row of the block in turn (the rows of one chunk share their spans:
// read once from memory, then from the core's cache), each row's partials merged in span order.
template <int D8, typename T>
void attend_rows(const Attn<T>& a, int64_t r0, int64_t r1, int64_t h, Scratch& w) {
  const int64_t g_count = a.heads / a.kv_heads, part = g_count * (a.dim + 2);
  int64_t seq[kBlockRows], lo[kBlockRows], n[kBlockRows], longest = 0;
  w.run.resize((r1 - r0) * part), w.part.resize(part);
  for (int64_t r = r0; r < r1; ++r) {
    n[r - r0] = row_span(a, r, seq[r - r0], lo[r - r0]);
    longest = std::max(longest, n[r - r0]);
  }
  for (int64_t j = 0; j < longest; j += kSpan)
    for (int64_t r = r0, i = 0; r < r1; ++r, ++i) {
      if (n[i] <= j) continue;
      float* run = w.run.data() + i * part;
      float* dst = j == 0 ? run : w.part.data();
      attend_span<D8>(a, r, seq[i], h, lo[i] + j, std::min(n[i] - j, kSpan), w, dst);
      if (j > 0) merge_into(run, dst, g_count, a.dim);
    }
  for (int64_t r = r0, i = 0; r < r1; ++r, ++i)
    finish(n[i] ? w.run.data() + i * part : nullptr, row_out(a, r, h), g_count, a.dim);
}

// Few rows (decode steps): every (row, KV head, span) is one item for the threads; each pair's
// partials are merged after, in span order. first[pair] is the pair's first item (first[pairs]
// the count); spans of a row are whole kSpan blocks but the last.
template <int D8, typename T>
void attend_split(const Attn<T>& a, int64_t rows, const std::vector<int64_t>& first) {
  const int64_t g_count = a.heads / a.kv_heads, part = g_count * (a.dim + 2);
  const int64_t pairs = rows * a.kv_heads;
  std::vector<float> parts(first[pairs] * part);
  // One item a take off the pool's counter (a span is one long read: no need for contiguous
  // ranges a thread), so the threads finish together.
  Pool::get().run(first[pairs], [&](int64_t i) {
    thread_local Scratch w;
    const int64_t pair = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1;
    const int64_t row = pair / a.kv_heads, j = (i - first[pair]) * kSpan;
    int64_t s, lo;
    const int64_t n = row_span(a, row, s, lo);
    attend_span<D8>(a, row, s, pair % a.kv_heads, lo + j, std::min(n - j, kSpan), w,
                    parts.data() + i * part);
  });
  for (int64_t pair = 0; pair < pairs; ++pair) {
    float* run = first[pair] == first[pair + 1] ? nullptr : parts.data() + first[pair] * part;
    for (int64_t i = first[pair] + 1; i < first[pair + 1]; ++i)
      merge_into(run, parts.data() + i * part, g_count, a.dim);
    finish(run, row_out(a, pair / a.kv_heads, pair % a.kv_heads), g_count, a.dim);
  }
}

template <typename T>
ffi::Error Run(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
               ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lens, const int32_t* seq_idx,
               const int32_t* positions, float* o, float scale, int64_t window) {
  Attn<T> a;
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (kd.size() != 4 || !std::equal(kd.begin(), kd.end(), vd.begin(), vd.end()))
    return ffi::Error::InvalidArgument("vllm_jax paged attention: unsupported shapes");
  a.heads = qd[1], a.dim = qd[2], a.kv_heads = kd[0], a.pages = kd[1], a.page_size = kd[2];
  a.num_seqs = tables.dimensions()[0], a.max_pages = tables.dimensions()[1];
  if (a.dim % 8 || a.dim > 256 || a.heads % a.kv_heads || kd[3] != a.dim)
    return ffi::Error::InvalidArgument("vllm_jax paged attention: unsupported shapes");
  a.q = q.typed_data(), a.o = o;
  a.k = static_cast<const T*>(k.untyped_data()), a.v = static_cast<const T*>(v.untyped_data());
  a.tables = tables.typed_data(), a.lens = lens.typed_data();
  a.seq_idx = seq_idx, a.positions = positions;
  a.scale = scale, a.window = window;
  const int64_t rows = qd[0], kvh = a.kv_heads, part = a.heads / kvh * (a.dim + 2);
  std::vector<int64_t> first(rows * kvh + 1, 0);
  for (int64_t pair = 0, s, lo; pair < rows * kvh; ++pair)
    first[pair + 1] = first[pair] + (row_span(a, pair / kvh, s, lo) + kSpan - 1) / kSpan;
  const bool d64 = a.dim == 64, d128 = a.dim == 128, d256 = a.dim == 256;  // 256: Gemma 3
  if (first.back() * part * int64_t(sizeof(float)) <= kSplitBytes) {
    (d64 ? attend_split<8, T> : d128 ? attend_split<16, T> : d256 ? attend_split<32, T>
                                                              : attend_split<0, T>)(a, rows, first);
    return ffi::Error::Success();
  }
  const auto f = d64 ? attend_rows<8, T> : d128 ? attend_rows<16, T> : d256 ? attend_rows<32, T>
                                                                       : attend_rows<0, T>;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  parallel_for(blocks * kvh, 1, [&a, kvh, rows, f](int64_t i0, int64_t i1) {
    thread_local Scratch w;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i / kvh * kBlockRows;
      f(a, r0, std::min(rows, r0 + kBlockRows), i % kvh, w);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Dispatch(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lens,
                    const int32_t* seq_idx, const int32_t* positions,
                    ffi::ResultBuffer<ffi::F32> o, float scale, int64_t window) {
  if (v.element_type() != k.element_type())
    return ffi::Error::InvalidArgument("vllm_jax paged attention: K and V dtypes differ");
  float* out = o->typed_data();
  switch (k.element_type()) {
    case ffi::DataType::F32:
      return Run<float>(q, k, v, tables, lens, seq_idx, positions, out, scale, window);
    case ffi::DataType::F16:
      return Run<half>(q, k, v, tables, lens, seq_idx, positions, out, scale, window);
    case ffi::DataType::BF16:
      return Run<bfloat16>(q, k, v, tables, lens, seq_idx, positions, out, scale, window);
    default:
      return ffi::Error::InvalidArgument("vllm_jax paged attention: cache dtype must be "
                                         "float32, float16 or bfloat16");
  }
}

ffi::Error DecodeAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lens,
                           ffi::ResultBuffer<ffi::F32> o, float scale, int64_t window) {
  return Dispatch(q, k, v, tables, lens, nullptr, nullptr, o, scale, window);
}

ffi::Error RaggedAttention(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> seq_idx, ffi::Buffer<ffi::S32> positions,
                           ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> lens,
                           ffi::ResultBuffer<ffi::F32> o, float scale, int64_t window) {
  const int64_t t = q.dimensions()[0];
  if (seq_idx.element_count() != t || positions.element_count() != t)
    return ffi::Error::InvalidArgument("vllm_jax_ragged_attention: one seq_idx and position "
                                       "per query token");
  return Dispatch(q, k, v, tables, lens, seq_idx.typed_data(), positions.typed_data(), o, scale,
                  window);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(vllm_jax_ragged_attention, RaggedAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window"));

// Shared by the CPU kernels (cpu_qmatmul.cc, cpu_dense.cc, cpu_attention.cc): float vectors
// written with GCC/Clang vector extensions (8 lanes: AVX2, NEON on ARM; 16 with AVX-512), the
// register tiles' transposes and the helper-thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vllm_jax {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store(void* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

inline f8 splat(float v) { return f8{v, v, v, v, v, v, v, v}; }
// 8 bytes -> 8 int32 lanes (GCC scalarizes __builtin_convertvector from 8-byte vectors)
template <typename Byte>
inline i32x8 widen(const Byte* p) {
#if defined(__AVX2__)
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (i32x8)(std::is_signed_v<Byte> ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
#else
  i32x8 r;
  for (int i = 0; i < 8; ++i) r[i] = p[i];
  return r;
#endif
}
inline f8 to_f8(i32x8 v) { return __builtin_convertvector(v, f8); }

#if defined(__F16C__)
inline float f16(uint16_t h) { return _cvtsh_ss(h); }
#else
inline float f16(uint16_t h) {  // exact IEEE half -> float, subnormals included
  uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man) {
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 1024));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 1023) << 13);
  } else {
    bits = sign;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
#endif

// 8 cache elements -> 8 floats: float32, IEEE half (F16C) or bfloat16 (the top 16 bits)
inline f8 load8(const float* p) { return load<f8>(p); }

struct half { uint16_t bits; };
struct bfloat16 { uint16_t bits; };

inline f8 load8(const half* p) {
#if defined(__F16C__)
  return (f8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  f8 r;
  for (int i = 0; i < 8; ++i) r[i] = f16(p[i].bits);
  return r;
#endif
}

inline f8 load8(const bfloat16* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  const u32x8 bits = __builtin_convertvector(load<u16x8>(p), u32x8) << 16;
  f8 r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

inline float hsum(f8 v) {
  typedef float f4 __attribute__((vector_size(16)));
  f4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  a += __builtin_shufflevector(a, a, 2, 3, 0, 1);
  a += __builtin_shufflevector(a, a, 1, 0, 3, 2);
  return a[0];
}

// 16-lane vectors where the build has AVX-512 (F, BW, VL; -march=native picks the path per
// machine): one instruction each on cores with 512-bit units (2x the FMAs of 8 lanes on Zen 5).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VLLM_JAX_AVX512 1
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline float hsum(f32x16 v) {
  return hsum(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}
#endif
typedef uint8_t u8x32 __attribute__((vector_size(32)));

// The kernels' vectors: 16 lanes where the build has AVX-512, else 8
#if defined(VLLM_JAX_AVX512)
constexpr int L = 16;
typedef f32x16 fv;
typedef i32x16 iv;
#else
constexpr int L = 8;
typedef f8 fv;
typedef i32x8 iv;
#endif
// s in every lane (V{} + s would add 0.f first: -0.f is not a no-op, so an add is emitted)
template <typename V>
inline V bcast(float s);
template <>
inline f8 bcast<f8>(float s) { return f8{s, s, s, s, s, s, s, s}; }
#if defined(VLLM_JAX_AVX512)
template <>
inline f32x16 bcast<f32x16>(float s) {
  return f32x16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s};
}
#endif
inline fv splat_v(float s) { return bcast<fv>(s); }

// In-register transposes: r[j] lane c -> r[c] lane j
inline void transpose8(f8 (&r)[8]) {
  f8 t[8];
  for (int j = 0; j < 8; j += 2) {
    t[j] = __builtin_shufflevector(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[j + 1] = __builtin_shufflevector(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  f8 u[8];
  for (int j = 0; j < 8; j += 4)
    for (int h = 0; h < 2; ++h) {
      u[j + 2 * h] = __builtin_shufflevector(t[j + h], t[j + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[j + 2 * h + 1] =
          __builtin_shufflevector(t[j + h], t[j + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int c = 0; c < 4; ++c) {  // column c is u[c] / u[c + 4]'s low halves, c + 4 their high
    r[c] = __builtin_shufflevector(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[c + 4] = __builtin_shufflevector(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// the first n (<= lanes) floats of v to p
inline void store_first(float* p, f8 v, int n) {
#if defined(VLLM_JAX_AVX512)
  _mm256_mask_storeu_ps(p, __mmask8((1u << n) - 1), (__m256)v);
#elif defined(__AVX2__)
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  _mm256_maskstore_ps(p, (__m256i)(lane < n), (__m256)v);
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}

#if defined(VLLM_JAX_AVX512)
inline void transpose16(f32x16 (&r)[16]) {
  f32x16 t[16], u[16];
  for (int j = 0; j < 16; j += 2) {  // 32-bit interleave within 128-bit lanes
    t[j] = __builtin_shufflevector(r[j], r[j + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12,
                                   28, 13, 29);
    t[j + 1] = __builtin_shufflevector(r[j], r[j + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27,
                                       14, 30, 15, 31);
  }
  for (int j = 0; j < 16; j += 4)  // 64-bit: 128-bit lane q of u[j + c]: rows j.. of column 4q + c
    for (int h = 0; h < 2; ++h) {
      u[j + 2 * h] = __builtin_shufflevector(t[j + h], t[j + h + 2], 0, 1, 16, 17, 4, 5, 20, 21,
                                             8, 9, 24, 25, 12, 13, 28, 29);
      u[j + 2 * h + 1] = __builtin_shufflevector(t[j + h], t[j + h + 2], 2, 3, 18, 19, 6, 7, 22,
                                                 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
  for (int c = 0; c < 4; ++c) {  // 128-bit lanes: column 4q + c is lane q of u[c + 4k], k < 4
    const f32x16 p0 = __builtin_shufflevector(u[c], u[4 + c], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                              19, 20, 21, 22, 23);
    const f32x16 p1 = __builtin_shufflevector(u[c], u[4 + c], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                              25, 26, 27, 28, 29, 30, 31);
    const f32x16 q0 = __builtin_shufflevector(u[8 + c], u[12 + c], 0, 1, 2, 3, 4, 5, 6, 7, 16,
                                              17, 18, 19, 20, 21, 22, 23);
    const f32x16 q1 = __builtin_shufflevector(u[8 + c], u[12 + c], 8, 9, 10, 11, 12, 13, 14, 15,
                                              24, 25, 26, 27, 28, 29, 30, 31);
    r[c] = __builtin_shufflevector(p0, q0, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26,
                                   27);
    r[4 + c] = __builtin_shufflevector(p0, q0, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                                       29, 30, 31);
    r[8 + c] = __builtin_shufflevector(p1, q1, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25,
                                       26, 27);
    r[12 + c] = __builtin_shufflevector(p1, q1, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28,
                                        29, 30, 31);
  }
}

inline void store_first(float* p, f32x16 v, int n) {
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), (__m512)v);
}
#endif

// acc[r][v] lane j (row n + r, token i + VL * v + j) -> y [tokens, ldy]: transposed in registers
// so each token gets its nrows outputs in one store (extracting lanes one by one cost ~10 cycles
// an output)
template <typename V, int R, int NV>
inline void write_t(float* y, int64_t ldy, int64_t tokens, const V (&acc)[R][NV], int64_t n,
                    int nrows, int64_t i) {
  constexpr int VL = sizeof(V) / sizeof(float);
  for (int r0 = 0; r0 < nrows; r0 += VL)
    for (int v = 0; v < NV; ++v) {
      V t[VL];
      for (int r = 0; r < VL; ++r) t[r] = r0 + r < R ? acc[std::min(r0 + r, R - 1)][v] : V{};
      if constexpr (VL == 8) transpose8(t);
#if defined(VLLM_JAX_AVX512)
      if constexpr (VL == 16) transpose16(t);
#endif
      const int cnt = std::min(VL, nrows - r0);
      for (int j = 0; j < VL && i + VL * v + j < tokens; ++j)
        store_first(y + (i + VL * v + j) * ldy + n + r0, t[j], cnt);
    }
}

// -- threads: the caller and a few helpers take chunks of rows off one counter ----------------
//
// One step makes ~120-200 of these calls (a layer's q, k, v share one, as its gate and up do),
// each only 20-200 us of work, so waking a sleeping thread for each (tens of us in a VM) would
// eat the gain: helpers spin (yielding the core) for a while after each job and only then sleep.
// A second caller arriving while a job runs (several XLA devices in one process) does its own
// job alone.

struct Job {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
  std::function<void(int64_t)> body;

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      body(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: its threads live as long as the process
    return *pool;
  }

  int64_t threads() const { return int64_t(threads_.size()) + 1; }

  void run(int64_t chunks, std::function<void(int64_t)> body) {
    auto job = std::make_shared<Job>();
    job->chunks = chunks;
    job->body = std::move(body);
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (busy.owns_lock() && chunks > 1 && !threads_.empty()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        job_ = job;
        generation_.fetch_add(1, std::memory_order_release);
      }
      cv_.notify_all();
    }
    job->run();
    while (job->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
  }

 private:
  Pool() {
    int n = int(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("VLLM_JAX_CPU_THREADS")) n = std::atoi(env);
    for (int i = 1; i < n; ++i) threads_.emplace_back([this] { work(); });
    for (auto& t : threads_) t.detach();
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinUs);
      while (generation_.load(std::memory_order_acquire) == seen &&
             std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_relaxed) != seen; });
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      job->run();
    }
  }

  static constexpr int kSpinUs = 500;
  std::vector<std::thread> threads_;
  std::mutex submit_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
};

// body(n0, n1) over [0, n) in two contiguous ranges a thread, each a multiple of `multiple`
// (but the last): a thread streams long runs of rows (finely interleaved rows made both cores'
// prefetchers fetch each other's lines: 2x slower)
template <typename F>
void parallel_for(int64_t n, int64_t multiple, F body) {
  Pool& pool = Pool::get();
  const int64_t per = (n + 2 * pool.threads() - 1) / (2 * pool.threads());
  const int64_t step = std::max<int64_t>(1, (per + multiple - 1) / multiple) * multiple;
  pool.run((n + step - 1) / step, [=](int64_t c) { body(c * step, std::min(n, (c + 1) * step)); });
}

// body(i, n0, n1) over rows [0, rows[i]) of several problems (one x times several weights) in
// one parallel_for: one hand-off to the helpers and one wait for them instead of one a problem.
// Each problem's rows start at a multiple of `multiple` of the joint range.
template <typename F>
void parallel_for_each(const std::vector<int64_t>& rows, int64_t multiple, F body) {
  std::vector<int64_t> start(rows.size() + 1, 0);
  for (size_t i = 0; i < rows.size(); ++i)
    start[i + 1] = start[i] + (rows[i] + multiple - 1) / multiple * multiple;
  parallel_for(start.back(), multiple, [&](int64_t v0, int64_t v1) {
    for (size_t i = 0; i < rows.size(); ++i) {
      const int64_t n0 = std::max<int64_t>(0, v0 - start[i]);
      const int64_t n1 = std::min(rows[i], v1 - start[i]);
      if (n0 < n1) body(i, n0, n1);
    }
  });
}

// The matmul kernels' inputs x [tokens, cols]: rows past the last one with a nonzero value (+0
// and -0 are zero) are a step's padding tokens, whose embeddings and attention outputs are 0 so
// that every layer's input row for them is 0 (models/layers.py). Their products with finite
// weights are 0: the kernels multiply rows [0, rows_in_use) and zero the output rows after.
template <typename T>  // float, half or bfloat16
inline int64_t rows_in_use(const T* x, int64_t tokens, int64_t cols) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  constexpr Bits magnitude = Bits(~Bits(0)) >> 1;
  for (; tokens > 0; --tokens) {
    Bits any = 0;
    const T* row = x + (tokens - 1) * cols;
    for (int64_t c = 0; c < cols; ++c) {
      Bits b;
      std::memcpy(&b, row + c, sizeof(b));
      any |= b & magnitude;
    }
    if (any) break;
  }
  return tokens;
}

// y [tokens, rows]: rows [from, tokens) set to 0
inline void zero_rows(float* y, int64_t from, int64_t tokens, int64_t rows) {
  if (tokens > from) std::memset(y + from * rows, 0, sizeof(float) * (tokens - from) * rows);
}

}  // namespace vllm_jax

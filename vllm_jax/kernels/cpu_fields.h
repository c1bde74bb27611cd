// The packed weight fields as the quantized-matmul kernels (cpu_qmatmul.cc, cpu_q8dot.cc) read
// them: kernels/quant.py's `repack` arrays, passed in the order of FIELDS in kernels/cpu.py.
#pragma once

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace vllm_jax {

enum QType : int64_t { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K };
constexpr int64_t kMaxFields = 6;

struct Fields {  // row n of field i starts at base[i] + n * stride[i] (bytes)
  const uint8_t* base[kMaxFields];
  int64_t stride[kMaxFields];
  const uint8_t* row(int i, int64_t n) const { return base[i] + n * stride[i]; }
};

inline int64_t block_elems(QType t) { return t <= Q8_0 ? 32 : 256; }

inline float f16_at(const uint8_t* p, int64_t i) {
  uint16_t h;
  std::memcpy(&h, p + 2 * i, 2);
  return f16(h);
}

// `count` fields from args[first] (count 0: all that are left), each [rows, ...] (ndim 2) or
// [experts, rows, ...] (ndim 3, the grouped target), all contiguous: row n of the whole
// [experts * rows, ...] starts at base + n * stride.
inline bool read_fields(const ffi::RemainingArgs& args, size_t first, size_t count, size_t ndim,
                        Fields* f, int64_t* experts, int64_t* rows) {
  if (args.size() <= first) return false;
  if (!count) count = args.size() - first;
  if (count > size_t(kMaxFields) || count > args.size() - first) return false;
  for (size_t i = first; i < first + count; ++i) {
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

// One weight of a multi-weight call and its output y [tokens, rows]
struct Weight {
  QType t;
  Fields f;
  int64_t rows;
  float* y;
};

// The weights of a call that multiplies one x [tokens, cols] by several weights: weight i is of
// type qtypes[i], its counts[i] fields next in args (all of them used), its output ys[i]
// float32 [tokens, rows * rows_each] (rows_each: the weight rows a field row holds, 16 for
// cpu_q8panel.cc's panels). False where they disagree.
inline bool read_weights(const ffi::RemainingArgs& args, const ffi::RemainingRets& ys,
                         ffi::Span<const int64_t> qtypes, ffi::Span<const int64_t> counts,
                         int64_t tokens, std::vector<Weight>* out, int64_t rows_each = 1) {
  if (qtypes.size() != counts.size() || qtypes.size() != ys.size() || ys.empty())
    return false;
  size_t first = 0;
  for (size_t i = 0; i < qtypes.size(); ++i) {
    Weight w{};
    int64_t experts;
    if (qtypes[i] < Q4_0 || qtypes[i] > Q6_K || counts[i] < 1 ||
        !read_fields(args, first, size_t(counts[i]), 2, &w.f, &experts, &w.rows))
      return false;
    first += size_t(counts[i]);
    auto y = ys.get<ffi::Buffer<ffi::F32>>(i);
    if (y.has_error() || (*y)->dimensions().size() != 2 || (*y)->dimensions()[0] != tokens ||
        (*y)->dimensions()[1] != w.rows * rows_each)
      return false;
    w.t = QType(qtypes[i]), w.y = (*y)->typed_data();
    out->push_back(w);
  }
  return first == args.size();
}

}  // namespace vllm_jax

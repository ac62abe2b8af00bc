// Winograd F(m x m, 3x3) transforms of NCHW tensors as ONNX Runtime custom operators (CPU, float32):
//
//   vita.ops::WinogradInput  (tile)        x (N, C, H, W) -> v (P, C, T)
//   vita.ops::WinogradOutput (tile, relu)  products (P, Cout, T), shape (4,) int64 = x's shape, bias (Cout)
//                                          -> y (N, Cout, H, W) = A^T products A + bias, then ReLU when relu = 1
//
// P = (tile + 2)^2 Winograd points and T = N * ceil(H / tile) * ceil(W / tile) tiles in (image, tile row,
// tile column) order. Between the two a standard MatMul by the transformed weights (P, Cout, C) multiplies
// every point's tiles at once: runtime/backends/onnxruntime_winograd.py writes that subgraph in place of a
// stride-1, padding-1 3x3 Conv. Padding is one zero pixel on every side. The per-axis transforms are
// winograd_core.h's, in the torch operators' order (the same products and sums); here their lanes are 16
// neighbouring columns or tiles of one channel's plane, and the work is split over planes on ONNX Runtime's
// intra-op threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "ort_api_min.h"
#include "winograd_core.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace vita_winograd_ort {

using vita_winograd::input_axis;
using vita_winograd::kBlock;
using vita_winograd::output_axis;

constexpr const char* kInputName = "WinogradInput";
constexpr const char* kOutputName = "WinogradOutput";

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t lanes(int64_t n) { return ceil_div(n, kBlock) * kBlock; }

struct Geometry {
  int64_t n, c, h, w, th, tw;
};

// A window row's tile columns, deinterleaved: s[j * twp + t] = r[t * M + j] for the K = M + 2 columns j of
// each of the tw tiles (r holds at least tw * M + 2 columns). Columns M and M + 1 of a tile are the next
// tile's columns 0 and 1. With AVX2, 8 tiles at a time as a 4x8 (M = 4) or 2x8 (M = 2) transpose in registers.
template <int M>
inline void deinterleave(const float* r, int64_t tw, int64_t twp, float* s) {
  constexpr int K = M + 2;
  int64_t t = 0;
#ifdef __AVX2__
  if constexpr (M == 4) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; t + 8 <= tw; t += 8) {
      const float* x = r + t * 4;
      const __m256 a0 = _mm256_loadu_ps(x), a1 = _mm256_loadu_ps(x + 8), a2 = _mm256_loadu_ps(x + 16),
                   a3 = _mm256_loadu_ps(x + 24);
      const __m256 b0 = _mm256_unpacklo_ps(a0, a1), b1 = _mm256_unpackhi_ps(a0, a1);
      const __m256 b2 = _mm256_unpacklo_ps(a2, a3), b3 = _mm256_unpackhi_ps(a2, a3);
      _mm256_storeu_ps(s + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(b0, b2, _MM_SHUFFLE(1, 0, 1, 0)), order));
      _mm256_storeu_ps(s + twp + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(b0, b2, _MM_SHUFFLE(3, 2, 3, 2)), order));
      _mm256_storeu_ps(s + 2 * twp + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(b1, b3, _MM_SHUFFLE(1, 0, 1, 0)), order));
      _mm256_storeu_ps(s + 3 * twp + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(b1, b3, _MM_SHUFFLE(3, 2, 3, 2)), order));
    }
  } else if constexpr (M == 2) {
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    for (; t + 8 <= tw; t += 8) {
      const __m256 a0 = _mm256_loadu_ps(r + t * 2), a1 = _mm256_loadu_ps(r + t * 2 + 8);
      _mm256_storeu_ps(s + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a0, a1, _MM_SHUFFLE(2, 0, 2, 0)), order));
      _mm256_storeu_ps(s + twp + t, _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a0, a1, _MM_SHUFFLE(3, 1, 3, 1)), order));
    }
  }
#endif
  for (; t < tw; ++t) {
    for (int j = 0; j < M; ++j) s[j * twp + t] = r[t * M + j];
  }
  for (int j = M; j < K; ++j) {
    float* sj = s + j * twp;
    const float* next = s + (j - M) * twp + 1;
    for (int64_t u = 0; u + 1 < tw; ++u) sj[u] = next[u];
    sj[tw - 1] = r[(tw - 1) * M + j];
  }
}

// One output tile row's values (o[b * twp + t], column b of tile t) -> a row of the plane, plus bias and
// floored at ``floor``: row[t * M + b], the columns inside the width. AVX2: 8 whole tiles at a time.
template <int M>
inline void interleave(const float* o, int64_t twp, int64_t tw, int64_t width, float bias, float floor, float* row) {
  int64_t t = 0;
#ifdef __AVX2__
  const __m256 vb = _mm256_set1_ps(bias), vf = _mm256_set1_ps(floor);
  if constexpr (M == 4) {
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (; (t + 8) * 4 <= width && t + 8 <= tw; t += 8) {
      __m256 c[4];
      for (int b = 0; b < 4; ++b) {
        c[b] = _mm256_permutevar8x32_ps(_mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(o + b * twp + t), vb), vf), order);
      }
      const __m256 lo01 = _mm256_unpacklo_ps(c[0], c[1]), lo23 = _mm256_unpacklo_ps(c[2], c[3]);
      const __m256 hi01 = _mm256_unpackhi_ps(c[0], c[1]), hi23 = _mm256_unpackhi_ps(c[2], c[3]);
      float* y = row + t * 4;
      _mm256_storeu_ps(y, _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(1, 0, 1, 0)));
      _mm256_storeu_ps(y + 8, _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(3, 2, 3, 2)));
      _mm256_storeu_ps(y + 16, _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(1, 0, 1, 0)));
      _mm256_storeu_ps(y + 24, _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
  } else if constexpr (M == 2) {
    for (; (t + 8) * 2 <= width && t + 8 <= tw; t += 8) {
      const __m256 c0 = _mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(o + t), vb), vf);
      const __m256 c1 = _mm256_max_ps(_mm256_add_ps(_mm256_loadu_ps(o + twp + t), vb), vf);
      const __m256 lo = _mm256_unpacklo_ps(c0, c1), hi = _mm256_unpackhi_ps(c0, c1);
      _mm256_storeu_ps(row + t * 2, _mm256_permute2f128_ps(lo, hi, 0x20));
      _mm256_storeu_ps(row + t * 2 + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
  }
#endif
  for (; t < tw; ++t) {
    for (int b = 0; b < M && t * M + b < width; ++b) row[t * M + b] = std::max(o[b * twp + t] + bias, floor);
  }
}

// One image plane of x -> its tiles' transformed windows: v[p * point_stride + tile], tiles of this plane
// numbered from 0 (the caller offsets v).
template <int M>
void input_plane(const float* plane, const Geometry& g, float* v, int64_t point_stride, std::vector<float>& buf) {
  constexpr int K = M + 2;
  const int64_t wp = lanes(g.tw * M + 2), twp = lanes(g.tw);  // columns -1 .. tw*M of a window row; tile lanes
  buf.assign(2 * K * wp + 2 * K * twp, 0.f);
  float* d = buf.data();   // K window rows, column j is pixel j - 1, zero outside the image
  float* r = d + K * wp;   // B^T down the columns
  float* s = r + K * wp;   // one of those rows' tile columns, deinterleaved by window column
  float* o = s + K * twp;  // B^T along the row
  for (int64_t ty = 0; ty < g.th; ++ty) {
    for (int i = 0; i < K; ++i) {
      float* row = d + i * wp;
      const int64_t y = ty * M - 1 + i;
      if (y < 0 || y >= g.h) {
        std::fill(row, row + wp, 0.f);
      } else {
        std::memcpy(row + 1, plane + y * g.w, g.w * sizeof(float));  // row[0] and the tail stay 0
      }
    }
    for (int64_t x = 0; x < wp; x += kBlock) input_axis<M>(d + x, wp, r + x, wp);
    float* out = v + ty * g.tw;
    for (int i = 0; i < K; ++i) {
      deinterleave<M>(r + i * wp, g.tw, twp, s);
      for (int64_t t = 0; t < twp; t += kBlock) input_axis<M>(s + t, twp, o + t, twp);
      for (int j = 0; j < K; ++j) std::memcpy(out + (i * K + j) * point_stride, o + j * twp, g.tw * sizeof(float));
    }
  }
}

// The products of one output plane's tiles (p[q * point_stride + tile]) -> that plane of y, plus bias, floored
// at ``floor`` (0 for ReLU, -inf otherwise).
template <int M>
void output_plane(const float* p, int64_t point_stride, const Geometry& g, float bias, float floor, float* plane,
                  std::vector<float>& buf) {
  constexpr int K = M + 2;
  const int64_t twp = lanes(g.tw);
  buf.assign((K * K + M * K + M * M) * twp, 0.f);
  float* q = buf.data();   // this tile row's products, lanes = tile columns
  float* u = q + K * K * twp;  // A^T down the window columns: u[a][j]
  float* o = u + M * K * twp;  // then along the rows: o[a][b]
  for (int64_t ty = 0; ty < g.th; ++ty) {
    for (int k = 0; k < K * K; ++k) std::memcpy(q + k * twp, p + k * point_stride + ty * g.tw, g.tw * sizeof(float));
    for (int j = 0; j < K; ++j) {
      for (int64_t t = 0; t < twp; t += kBlock) output_axis<M>(q + j * twp + t, K * twp, u + j * twp + t, K * twp);
    }
    for (int a = 0; a < M; ++a) {
      for (int64_t t = 0; t < twp; t += kBlock) output_axis<M>(u + a * K * twp + t, twp, o + a * M * twp + t, twp);
    }
    for (int a = 0; a < M && ty * M + a < g.h; ++a) {
      interleave<M>(o + a * M * twp, twp, g.tw, g.w, bias, floor, plane + (ty * M + a) * g.w);
    }
  }
}

struct Kernel {
  vita_ort::Api api;
  int64_t tile;
  bool relu;
};

struct InputJob {
  const float* x;
  float* v;
  Geometry g;
  int64_t tile;
};

struct OutputJob {
  const float* p;
  const float* bias;
  float* y;
  Geometry g;
  int64_t cout, tile;
  float floor;
};

inline void input_task(void* data, size_t task) {
  const InputJob& job = *static_cast<const InputJob*>(data);
  const Geometry& g = job.g;
  const int64_t b = static_cast<int64_t>(task) / g.c, c = static_cast<int64_t>(task) % g.c;
  const int64_t tiles = g.n * g.th * g.tw;
  const float* plane = job.x + (b * g.c + c) * g.h * g.w;
  float* v = job.v + c * tiles + b * g.th * g.tw;
  thread_local std::vector<float> buf;
  if (job.tile == 2) {
    input_plane<2>(plane, g, v, g.c * tiles, buf);
  } else {
    input_plane<4>(plane, g, v, g.c * tiles, buf);
  }
}

inline void output_task(void* data, size_t task) {
  const OutputJob& job = *static_cast<const OutputJob*>(data);
  const Geometry& g = job.g;
  const int64_t b = static_cast<int64_t>(task) / job.cout, c = static_cast<int64_t>(task) % job.cout;
  const int64_t tiles = g.n * g.th * g.tw;
  const float* p = job.p + c * tiles + b * g.th * g.tw;
  float* plane = job.y + (b * job.cout + c) * g.h * g.w;
  thread_local std::vector<float> buf;
  if (job.tile == 2) {
    output_plane<2>(p, job.cout * tiles, g, job.bias[c], job.floor, plane, buf);
  } else {
    output_plane<4>(p, job.cout * tiles, g, job.bias[c], job.floor, plane, buf);
  }
}

inline OrtStatus* fail(const vita_ort::Api& api, const char* op, const std::string& what) {
  const std::string msg = std::string(op) + ": " + what;
  return api.CreateStatus(kOrtInvalidArgument, msg.c_str());
}

inline OrtStatus* compute_input(void* op_kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(op_kernel);
  const vita_ort::Api& api = k.api;
  const OrtValue* in = nullptr;
  int type = 0;
  std::vector<int64_t> dims;
  if (OrtStatus* s = api.KernelContext_GetInput(context, 0, &in)) return s;
  if (OrtStatus* s = vita_ort::describe(api, in, &type, &dims)) return s;
  if (type != kOrtFloat || dims.size() != 4) {
    return fail(api, kInputName, "x must be a float32 (N, C, H, W) tensor, got " + vita_ort::dims_text(dims));
  }
  const int64_t m = k.tile;
  const Geometry g{dims[0], dims[1], dims[2], dims[3], ceil_div(dims[2], m), ceil_div(dims[3], m)};
  const int64_t out_dims[3] = {(m + 2) * (m + 2), g.c, g.n * g.th * g.tw};
  OrtValue* out = nullptr;
  if (OrtStatus* s = api.KernelContext_GetOutput(context, 0, out_dims, 3, &out)) return s;
  void *x = nullptr, *v = nullptr;
  if (OrtStatus* s = api.GetTensorMutableData(const_cast<OrtValue*>(in), &x)) return s;
  if (OrtStatus* s = api.GetTensorMutableData(out, &v)) return s;
  if (g.n * g.c * g.h * g.w == 0) return nullptr;
  InputJob job{static_cast<const float*>(x), static_cast<float*>(v), g, m};
  return api.KernelContext_ParallelFor(context, input_task, static_cast<size_t>(g.n * g.c), 0, &job);
}

inline OrtStatus* compute_output(void* op_kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(op_kernel);
  const vita_ort::Api& api = k.api;
  const OrtValue* in[3];
  int types[3];
  std::vector<int64_t> dims[3];
  for (size_t i = 0; i < 3; ++i) {
    if (OrtStatus* s = api.KernelContext_GetInput(context, i, &in[i])) return s;
    if (OrtStatus* s = vita_ort::describe(api, in[i], &types[i], &dims[i])) return s;
  }
  if (types[0] != kOrtFloat || types[1] != kOrtInt64 || types[2] != kOrtFloat || dims[0].size() != 3 ||
      dims[1].size() != 1 || dims[1][0] != 4 || dims[2].size() != 1) {
    return fail(api, kOutputName, "inputs must be products (P, Cout, T) float32, shape (4,) int64 and bias (Cout) "
                                  "float32, got " + vita_ort::dims_text(dims[0]) + ", " +
                                  vita_ort::dims_text(dims[1]) + ", " + vita_ort::dims_text(dims[2]));
  }
  void* raw[3];
  for (size_t i = 0; i < 3; ++i) {
    if (OrtStatus* s = api.GetTensorMutableData(const_cast<OrtValue*>(in[i]), &raw[i])) return s;
  }
  const int64_t* shape = static_cast<const int64_t*>(raw[1]);
  const int64_t m = k.tile, cout = dims[0][1];
  const Geometry g{shape[0], shape[1], shape[2], shape[3], ceil_div(shape[2], m), ceil_div(shape[3], m)};
  if (g.n < 0 || g.h < 0 || g.w < 0 || dims[0][0] != (m + 2) * (m + 2) || dims[0][2] != g.n * g.th * g.tw ||
      dims[2][0] != cout) {
    return fail(api, kOutputName, "products " + vita_ort::dims_text(dims[0]) + " and bias " +
                                      vita_ort::dims_text(dims[2]) + " do not fit tile " + std::to_string(m) +
                                      " of an input of shape " + vita_ort::dims_text({shape, shape + 4}));
  }
  const int64_t out_dims[4] = {g.n, cout, g.h, g.w};
  OrtValue* out = nullptr;
  if (OrtStatus* s = api.KernelContext_GetOutput(context, 0, out_dims, 4, &out)) return s;
  void* y = nullptr;
  if (OrtStatus* s = api.GetTensorMutableData(out, &y)) return s;
  if (g.n * cout * g.h * g.w == 0) return nullptr;
  const float floor = k.relu ? 0.f : -std::numeric_limits<float>::infinity();
  OutputJob job{static_cast<const float*>(raw[0]), static_cast<const float*>(raw[2]), static_cast<float*>(y), g,
                cout, m, floor};
  return api.KernelContext_ParallelFor(context, output_task, static_cast<size_t>(g.n * cout), 0, &job);
}

inline OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi* table, const OrtKernelInfo* info, void** kernel) {
  const vita_ort::Api api(table);
  const bool output = op->GetInputTypeCount(op) == 3;
  int64_t tile = 0, relu = 0;
  if (OrtStatus* s = api.KernelInfoGetAttribute_int64(info, "tile", &tile)) return s;
  if (output) {
    if (OrtStatus* s = api.KernelInfoGetAttribute_int64(info, "relu", &relu)) return s;
  }
  if (tile != 2 && tile != 4) {
    return fail(api, output ? kOutputName : kInputName, "tile must be 2 or 4 (F(2x2,3x3) or F(4x4,3x3)), got " +
                                                            std::to_string(tile));
  }
  *kernel = new Kernel{api, tile, relu != 0};
  return nullptr;
}

template <bool Output>
OrtCustomOp make_op() {
  OrtCustomOp op = vita_ort::cpu_op_base();
  op.GetName = [](const OrtCustomOp*) { return Output ? kOutputName : kInputName; };
  op.GetInputType = [](const OrtCustomOp*, size_t i) {
    return Output && i == 1 ? static_cast<int>(kOrtInt64) : static_cast<int>(kOrtFloat);
  };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return Output ? 3 : 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = Output ? compute_output : compute_input;
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  return op;
}

}  // namespace vita_winograd_ort

// The operators' descriptions, built once.
inline const OrtCustomOp* winograd_input_op() {
  static const OrtCustomOp op = vita_winograd_ort::make_op<false>();
  return &op;
}

inline const OrtCustomOp* winograd_output_op() {
  static const OrtCustomOp op = vita_winograd_ort::make_op<true>();
  return &op;
}

// The per-axis transforms of Winograd's F(2x2,3x3) and F(4x4,3x3) (Lavin & Gray's matrices, interpolation
// points 0, +-1, +-2 and infinity), shared by the torch operators (winograd_cpu.cpp: the 16 lanes are channels)
// and the ONNX Runtime operators (winograd_ort.h: the lanes are neighbouring columns or tiles of one plane).
// Each call transforms kBlock independent lanes; points lie ds (ps) floats apart, outputs rs (os) apart.
#pragma once

#include <cstdint>

namespace vita_winograd {

// lanes handled per call: two AVX2 (one AVX-512) vectors, the loops below vectorise over them
constexpr int64_t kBlock = 16;

// B^T applied along one axis of the (m + 2)-point input window; d and r step by ds and rs floats
template <int M>
inline void input_axis(const float* d, int64_t ds, float* r, int64_t rs);

template <>
inline void input_axis<2>(const float* d, int64_t ds, float* r, int64_t rs) {
#pragma omp simd
  for (int64_t c = 0; c < kBlock; ++c) {
    const float d0 = d[c], d1 = d[ds + c], d2 = d[2 * ds + c], d3 = d[3 * ds + c];
    r[c] = d0 - d2;
    r[rs + c] = d1 + d2;
    r[2 * rs + c] = d2 - d1;
    r[3 * rs + c] = d1 - d3;
  }
}

template <>
inline void input_axis<4>(const float* d, int64_t ds, float* r, int64_t rs) {
#pragma omp simd
  for (int64_t c = 0; c < kBlock; ++c) {
    const float d0 = d[c], d1 = d[ds + c], d2 = d[2 * ds + c];
    const float d3 = d[3 * ds + c], d4 = d[4 * ds + c], d5 = d[5 * ds + c];
    r[c] = 4.f * d0 - 5.f * d2 + d4;
    r[rs + c] = -4.f * (d1 + d2) + d3 + d4;
    r[2 * rs + c] = 4.f * (d1 - d2) - d3 + d4;
    r[3 * rs + c] = 2.f * (d3 - d1) - d2 + d4;
    r[4 * rs + c] = 2.f * (d1 - d3) - d2 + d4;
    r[5 * rs + c] = 4.f * d1 - 5.f * d3 + d5;
  }
}

// A^T applied along one axis: (m + 2) products -> m outputs
template <int M>
inline void output_axis(const float* p, int64_t ps, float* o, int64_t os);

template <>
inline void output_axis<2>(const float* p, int64_t ps, float* o, int64_t os) {
#pragma omp simd
  for (int64_t c = 0; c < kBlock; ++c) {
    const float p0 = p[c], p1 = p[ps + c], p2 = p[2 * ps + c], p3 = p[3 * ps + c];
    o[c] = p0 + p1 + p2;
    o[os + c] = p1 - p2 - p3;
  }
}

template <>
inline void output_axis<4>(const float* p, int64_t ps, float* o, int64_t os) {
#pragma omp simd
  for (int64_t c = 0; c < kBlock; ++c) {
    const float p0 = p[c], p1 = p[ps + c], p2 = p[2 * ps + c];
    const float p3 = p[3 * ps + c], p4 = p[4 * ps + c], p5 = p[5 * ps + c];
    const float s12 = p1 + p2, d12 = p1 - p2, s34 = p3 + p4, d34 = p3 - p4;
    o[c] = p0 + s12 + s34;
    o[os + c] = d12 + 2.f * d34;
    o[2 * os + c] = s12 + 4.f * s34;
    o[3 * os + c] = d12 + 8.f * d34 + p5;
  }
}

}  // namespace vita_winograd

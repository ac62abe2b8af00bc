// Multi-scale deformable attention for CPU inference, fused from the two projections to the output: the part
// that needs no framework. Two front ends include it: ms_deform_attn_cpu.cpp (a torch operator) and
// ms_deform_attn_ort.cpp (an ONNX Runtime custom operator); each checks its inputs and splits the work.
//
// One pass per (query, head): softmax of the attention logits, sampling positions from the reference point
// and the pixel offsets, and the bilinear taps gathered straight from the value table, accumulated in fp32.
// Semantics of kernels.reference.ms_deform_attn_from_projections (grid_sample, bilinear, zeros padding,
// align_corners=False).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fast_math.h"

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#define VITA_MSDA_AVX2_TAPS 1
#endif

namespace vita_msda {

using vita_math::exp_nonpositive;

// Pixels of the value table are indexed with 32-bit integers (they vectorise twice as wide), and a level's
// height and width are exact as floats (the position math): the front ends refuse larger inputs.
constexpr int64_t kMaxPixels = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxSide = int64_t{1} << 24;

// One (query, head): the bilinear taps of its samples (level, point), weighted and summed into ``dst``.
// ``cw`` and ``pixels`` hold each sample's four corner weights and the corners' pixels in the value table (at
// ``corner * stride + sample``), worked out beforehand for every sample of the query in one flat, vectorised loop
// (prepare_taps); ``inside`` is 0 for a sample with no corner in its level, which is skipped.
//
// The order of the sums, the same in every path below (so that a bf16 table gives the float32 result on the
// same values, rounded once): two chains of ``d`` floats, the top corners' (00 then 01, sample by sample) and
// the bottom corners' (10 then 11), added at the end. One shared chain made every tap wait for the previous
// one's multiply-add (measured: most of the kernel's time); four, one per corner, need more registers than
// AVX2 has for 32 channels: five sums went through the stack on every tap (AMD EPYC Zen 2: the kernel 20% slower
// alone, 8% inside the detector, than with two chains in registers).
// ``acc`` holds the two chains.
template <typename scalar_t, int64_t kD>
inline void sample_head(float* __restrict acc, int64_t d_runtime, const scalar_t* v_head, int64_t row, const float* cw,
                        const int32_t* pixels, const float* inside, int64_t stride, int64_t count, scalar_t* dst) {
  const int64_t d = kD > 0 ? kD : d_runtime;
  for (int64_t c = 0; c < 2 * d; ++c) acc[c] = 0.f;
  for (int64_t i = 0; i < count; ++i) {
    if (inside[i] == 0.f) continue;
    const float c00 = cw[i], c01 = cw[stride + i], c10 = cw[2 * stride + i], c11 = cw[3 * stride + i];
    const scalar_t* __restrict r00 = v_head + static_cast<int64_t>(pixels[i]) * row;
    const scalar_t* __restrict r01 = v_head + static_cast<int64_t>(pixels[stride + i]) * row;
    const scalar_t* __restrict r10 = v_head + static_cast<int64_t>(pixels[2 * stride + i]) * row;
    const scalar_t* __restrict r11 = v_head + static_cast<int64_t>(pixels[3 * stride + i]) * row;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) {
      acc[c] += c00 * static_cast<float>(r00[c]);
      acc[d + c] += c10 * static_cast<float>(r10[c]);
      acc[c] += c01 * static_cast<float>(r01[c]);
      acc[d + c] += c11 * static_cast<float>(r11[c]);
    }
  }
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(acc[c] + acc[d + c]);
}

#ifdef VITA_MSDA_AVX2_TAPS
// sample_head for float32 heads of 32 channels on AVX2, in registers: the two chains of four vectors each, with
// no memset of an accumulator array per (query, head). The same multiply-adds in the same order.
inline void sample_head_f32x32_avx2(const float* v_head, int64_t row, const float* cw, const int32_t* pixels,
                                    const float* inside, int64_t stride, int64_t count, float* dst) {
  __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps(), t2 = _mm256_setzero_ps(), t3 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  // one corner's row, weighted, into a chain's four vectors
  const auto tap = [](__m256 weight, const float* r, __m256& a0, __m256& a1, __m256& a2, __m256& a3) {
    a0 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(r), a0);
    a1 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(r + 8), a1);
    a2 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(r + 16), a2);
    a3 = _mm256_fmadd_ps(weight, _mm256_loadu_ps(r + 24), a3);
  };
  for (int64_t i = 0; i < count; ++i) {
    if (inside[i] == 0.f) continue;
    const float* r00 = v_head + static_cast<int64_t>(pixels[i]) * row;
    const float* r01 = v_head + static_cast<int64_t>(pixels[stride + i]) * row;
    const float* r10 = v_head + static_cast<int64_t>(pixels[2 * stride + i]) * row;
    const float* r11 = v_head + static_cast<int64_t>(pixels[3 * stride + i]) * row;
    tap(_mm256_broadcast_ss(cw + i), r00, t0, t1, t2, t3);
    tap(_mm256_broadcast_ss(cw + 2 * stride + i), r10, b0, b1, b2, b3);
    tap(_mm256_broadcast_ss(cw + stride + i), r01, t0, t1, t2, t3);
    tap(_mm256_broadcast_ss(cw + 3 * stride + i), r11, b0, b1, b2, b3);
  }
  _mm256_storeu_ps(dst, _mm256_add_ps(t0, b0));
  _mm256_storeu_ps(dst + 8, _mm256_add_ps(t1, b1));
  _mm256_storeu_ps(dst + 16, _mm256_add_ps(t2, b2));
  _mm256_storeu_ps(dst + 24, _mm256_add_ps(t3, b3));
}
#endif

// sample_head for a bf16 value table (the one 16-bit type the front ends pass) with an even head width: each
// 32-bit word of a row holds two channels, 2c in its low half and 2c + 1 in its high half, and a bf16 is the
// top half of the float32 it stands for, so a shift and a mask give both floats, with no lane shuffles (the
// per-channel conversion spent most of the loop on widening shuffles). Channels are accumulated as even and
// odd planes and interleaved once per (query, head). The same multiply-adds per channel in the same order as
// sample_head: bit-identical results.
template <typename scalar_t, int64_t kD>
inline void sample_head_bf16(const scalar_t* v_head, int64_t row, const float* cw, const int32_t* pixels,
                             const float* inside, int64_t stride, int64_t count, scalar_t* dst) {
  static_assert(sizeof(scalar_t) == 2 && kD > 0 && kD % 2 == 0, "bf16 rows with an even, fixed head width");
  typedef uint32_t __attribute__((may_alias)) word_t;
  constexpr int64_t kW = kD / 2;
  float ev_top[kW] = {}, ev_bottom[kW] = {}, od_top[kW] = {}, od_bottom[kW] = {};
  for (int64_t i = 0; i < count; ++i) {
    if (inside[i] == 0.f) continue;
    const float c00 = cw[i], c01 = cw[stride + i], c10 = cw[2 * stride + i], c11 = cw[3 * stride + i];
    const word_t* __restrict r00 = reinterpret_cast<const word_t*>(v_head + static_cast<int64_t>(pixels[i]) * row);
    const word_t* __restrict r01 = reinterpret_cast<const word_t*>(v_head + static_cast<int64_t>(pixels[stride + i]) * row);
    const word_t* __restrict r10 = reinterpret_cast<const word_t*>(v_head + static_cast<int64_t>(pixels[2 * stride + i]) * row);
    const word_t* __restrict r11 = reinterpret_cast<const word_t*>(v_head + static_cast<int64_t>(pixels[3 * stride + i]) * row);
#pragma omp simd
    for (int64_t c = 0; c < kW; ++c) {
      const uint32_t a = r00[c], b = r01[c], e = r10[c], f = r11[c];
      ev_top[c] += c00 * __builtin_bit_cast(float, a << 16);
      od_top[c] += c00 * __builtin_bit_cast(float, a & 0xFFFF0000u);
      ev_bottom[c] += c10 * __builtin_bit_cast(float, e << 16);
      od_bottom[c] += c10 * __builtin_bit_cast(float, e & 0xFFFF0000u);
      ev_top[c] += c01 * __builtin_bit_cast(float, b << 16);
      od_top[c] += c01 * __builtin_bit_cast(float, b & 0xFFFF0000u);
      ev_bottom[c] += c11 * __builtin_bit_cast(float, f << 16);
      od_bottom[c] += c11 * __builtin_bit_cast(float, f & 0xFFFF0000u);
    }
  }
  for (int64_t c = 0; c < kW; ++c) {
    dst[2 * c] = static_cast<scalar_t>(ev_top[c] + ev_bottom[c]);
    dst[2 * c + 1] = static_cast<scalar_t>(od_top[c] + od_bottom[c]);
  }
}

// For ``count`` samples: pixel positions (xs, ys), normalised attention weights ``a`` and each sample's level
// (size fw x fh, first pixel ``start``) -> corner weights, corner pixels (< 2^31: the front ends check the value
// length) and the inside flag. A corner outside its level reads a clamped pixel with weight 0 (no branch per
// tap). Positions are clamped to [-1, size] first: samples outside are skipped anyway, and the conversions to
// integers then stay defined. The same arithmetic as one sample at a time, so results are unchanged; it
// vectorises only without trapping math (std::floor), which the builds ask for: 5x faster than per sample.
inline void prepare_taps(int64_t count, const float* __restrict xs, const float* __restrict ys,
                         const float* __restrict a, const float* __restrict fw, const float* __restrict fh,
                         const int32_t* __restrict start, float* __restrict cw,
                         int32_t* __restrict pixels, float* __restrict inside) {
  float* __restrict c00 = cw;
  float* __restrict c01 = cw + count;
  float* __restrict c10 = cw + 2 * count;
  float* __restrict c11 = cw + 3 * count;
  int32_t* __restrict r00 = pixels;
  int32_t* __restrict r01 = pixels + count;
  int32_t* __restrict r10 = pixels + 2 * count;
  int32_t* __restrict r11 = pixels + 3 * count;
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float w = fw[i], h = fh[i];
    float x = xs[i], y = ys[i];
    inside[i] = (x > -1.f && x < w && y > -1.f && y < h) ? 1.f : 0.f;  // false for NaN too
    x = x > -1.f ? x : -1.f;
    x = x < w ? x : w;
    y = y > -1.f ? y : -1.f;
    y = y < h ? y : h;
    const float x0 = std::floor(x), y0 = std::floor(y);
    const float fx = x - x0, fy = y - y0;
    const float vx0 = x0 >= 0.f ? 1.f : 0.f, vx1 = x0 + 1.f < w ? 1.f : 0.f;
    const float vy0 = y0 >= 0.f ? 1.f : 0.f, vy1 = y0 + 1.f < h ? 1.f : 0.f;
    const float xa = x0 > 0.f ? x0 : 0.f, xb = x0 + 1.f < w - 1.f ? x0 + 1.f : w - 1.f;
    const float ya = y0 > 0.f ? y0 : 0.f, yb = y0 + 1.f < h - 1.f ? y0 + 1.f : h - 1.f;
    const float ai = a[i];
    c00[i] = ai * (1.f - fx) * (1.f - fy) * vx0 * vy0;
    c01[i] = ai * fx * (1.f - fy) * vx1 * vy0;
    c10[i] = ai * (1.f - fx) * fy * vx0 * vy1;
    c11[i] = ai * fx * fy * vx1 * vy1;
    const int32_t wl = static_cast<int32_t>(w), s = start[i];
    const int32_t ia = static_cast<int32_t>(xa), ib = static_cast<int32_t>(xb);
    const int32_t ja = static_cast<int32_t>(ya), jb = static_cast<int32_t>(yb);
    r00[i] = s + ja * wl + ia;
    r01[i] = s + ja * wl + ib;
    r10[i] = s + jb * wl + ia;
    r11[i] = s + jb * wl + ib;
  }
}

// The sizes and strides of one call. value (N, S, heads, D) contiguous; offsets (N, Lq, heads*L*P*2) and
// logits (N, Lq, heads*L*P) with unit last stride; reference points (1 or N, Lq, 2) contiguous float32;
// output (N, Lq, heads*D) contiguous.
struct Problem {
  int64_t n_batch, s_len, heads, d, lq, levels, points;
  int64_t off_n, off_q, att_n, att_q;
  int64_t ref_batch;  // 0 when one set of reference points serves every batch item, else Lq*2
};

// Per-call tables: each level's size and start in the value table, and per sample (head, level, point) its
// level's size as floats and first pixel, for the position math.
struct Levels {
  std::vector<int64_t> starts, hs, ws;
  std::vector<float> sample_w, sample_h;
  std::vector<int32_t> sample_start;

  Levels(const int64_t* hw, int64_t levels, int64_t heads, int64_t points)
      : starts(levels), hs(levels), ws(levels), sample_w(heads * levels * points), sample_h(heads * levels * points),
        sample_start(heads * levels * points) {
    int64_t start = 0;
    for (int64_t l = 0; l < levels; ++l) {
      hs[l] = hw[2 * l];
      ws[l] = hw[2 * l + 1];
      starts[l] = start;
      start += hs[l] * ws[l];
    }
    const int64_t lp = levels * points;
    for (int64_t i = 0; i < heads * lp; ++i) {
      const int64_t l = (i % lp) / points;
      sample_w[i] = static_cast<float>(ws[l]);
      sample_h[i] = static_cast<float>(hs[l]);
      sample_start[i] = static_cast<int32_t>(starts[l]);
    }
  }

  int64_t total() const { return hs.empty() ? 0 : starts.back() + hs.back() * ws.back(); }
};

// Rows [begin, end) of the flattened (N * Lq) queries. Each caller's thread runs its own range.
template <typename scalar_t, int64_t kD>
void run_range(const Problem& pr, const Levels& lv, const scalar_t* v, const float* r, const scalar_t* off,
               const scalar_t* att, scalar_t* o, int64_t begin, int64_t end) {
  const int64_t heads = pr.heads, d = pr.d, lq = pr.lq, points = pr.points;
  const int64_t lp = pr.levels * points, samples = heads * lp;
  const int64_t row = heads * d;  // value-table stride between pixels
  const float* sw = lv.sample_w.data();
  const float* sh = lv.sample_h.data();
  std::vector<float> acc(2 * d), w_buf(samples), xs_buf(samples), ys_buf(samples), shift_buf(samples),
      inside_buf(samples), cw_buf(4 * samples);
  std::vector<int32_t> pixels_buf(4 * samples);
  // plain restrict pointers: through the vectors the compiler reloads their data pointers and cannot vectorise
  float* __restrict w = w_buf.data();
  float* __restrict xs = xs_buf.data();
  float* __restrict ys = ys_buf.data();
  float* __restrict shift = shift_buf.data();
  float* __restrict inside = inside_buf.data();
  float* __restrict cw = cw_buf.data();
  int32_t* __restrict pixels = pixels_buf.data();
  for (int64_t m = begin; m < end; ++m) {
    const int64_t n = m / lq, q = m % lq;
    const float rx = r[n * pr.ref_batch + q * 2], ry = r[n * pr.ref_batch + q * 2 + 1];
    const scalar_t* om = off + n * pr.off_n + q * pr.off_q;
    const scalar_t* am = att + n * pr.att_n + q * pr.att_q;
    // softmax over each head's levels*points logits, all heads in flat (vectorised) loops
    for (int64_t h = 0; h < heads; ++h) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < lp; ++i) {
        const float a = static_cast<float>(am[h * lp + i]);
        mx = a > mx ? a : mx;
      }
      for (int64_t i = 0; i < lp; ++i) shift[h * lp + i] = mx;
    }
    for (int64_t i = 0; i < samples; ++i) w[i] = static_cast<float>(am[i]) - shift[i];
#pragma omp simd
    for (int64_t i = 0; i < samples; ++i) w[i] = exp_nonpositive(w[i]);
    for (int64_t h = 0; h < heads; ++h) {
      float total = 0.f;
      for (int64_t i = 0; i < lp; ++i) total += w[h * lp + i];
      const float inv = 1.f / total;
      for (int64_t i = 0; i < lp; ++i) w[h * lp + i] *= inv;
    }
    // pixel coordinates: (reference + offset / size) * size - 0.5 (grid_sample, align_corners=False)
    for (int64_t i = 0; i < samples; ++i) {
      xs[i] = rx * sw[i] + static_cast<float>(om[2 * i]) - 0.5f;
      ys[i] = ry * sh[i] + static_cast<float>(om[2 * i + 1]) - 0.5f;
    }
    prepare_taps(samples, xs, ys, w, sw, sh, lv.sample_start.data(), cw, pixels, inside);
    for (int64_t h = 0; h < heads; ++h) {
      scalar_t* dst = o + m * row + h * d;
      const scalar_t* v_head = v + n * pr.s_len * row + h * d;
      const int64_t first = h * lp;
      if constexpr (kD > 0 && kD % 2 == 0 && sizeof(scalar_t) == 2) {
        sample_head_bf16<scalar_t, kD>(v_head, row, cw + first, pixels + first, inside + first, samples, lp, dst);
#ifdef VITA_MSDA_AVX2_TAPS
      } else if constexpr (kD == 32 && sizeof(scalar_t) == 4) {
        sample_head_f32x32_avx2(v_head, row, cw + first, pixels + first, inside + first, samples, lp, dst);
#endif
      } else if constexpr (kD > 0) {
        float acc2[2 * kD];  // a fixed size: the compiler keeps the two chains in registers
        sample_head<scalar_t, kD>(acc2, d, v_head, row, cw + first, pixels + first, inside + first, samples, lp, dst);
      } else {
        sample_head<scalar_t, kD>(acc.data(), d, v_head, row, cw + first, pixels + first, inside + first, samples, lp, dst);
      }
    }
  }
}

// run_range with the head width as a compile-time constant where it is the usual 32 (256 channels, 8 heads).
template <typename scalar_t>
void run_range_any_d(const Problem& pr, const Levels& lv, const scalar_t* v, const float* r, const scalar_t* off,
                     const scalar_t* att, scalar_t* o, int64_t begin, int64_t end) {
  if (pr.d == 32) {
    run_range<scalar_t, 32>(pr, lv, v, r, off, att, o, begin, end);
  } else {
    run_range<scalar_t, 0>(pr, lv, v, r, off, att, o, begin, end);
  }
}

}  // namespace vita_msda

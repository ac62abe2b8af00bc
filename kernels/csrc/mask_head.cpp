// Final masks from mask logits in one pass per (query, frame): the bilinear resize to the padded size
// (only the crop that holds the resized frame), the mask-quality sums, the resize to the original size and
// the threshold, without full-resolution float temporaries. Torch-free, loaded with ctypes by
// runtime/backends/mask_kernel.py; the plain reference is runtime/backends/numpy_ops.py (MaskHead), whose
// float32 arithmetic this follows operation for operation (built with -ffp-contract=off: no fused
// multiply-adds), so the resized logits, and so the masks, are bit-identical to it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "fast_math.h"

namespace {

struct Taps {
  std::vector<int> lo, hi;
  std::vector<float> w_lo, w_hi;
};

// ATen's bilinear source taps for align_corners=False without a scale factor, for the first `count` outputs:
// src = max(0, in/out * (dst + 0.5) - 0.5), the product rounded once to float32 (as the numpy twin does)
Taps linear_taps(int in_size, int out_size, int count) {
  Taps t;
  t.lo.resize(count);
  t.hi.resize(count);
  t.w_lo.resize(count);
  t.w_hi.resize(count);
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int i = 0; i < count; ++i) {
    float src = static_cast<float>(static_cast<double>(scale) * (static_cast<double>(i) + 0.5) - 0.5);
    src = std::max(src, 0.0f);
    const int lo = std::min(static_cast<int>(std::floor(src)), in_size - 1);
    const int hi = std::min(lo + 1, in_size - 1);
    const float w_hi = std::min(std::max(src - static_cast<float>(lo), 0.0f), 1.0f);
    t.lo[i] = lo;
    t.hi[i] = hi;
    t.w_hi[i] = w_hi;
    t.w_lo[i] = 1.0f - w_hi;
  }
  return t;
}

// (in_h, in_w) -> the top-left block the taps give: columns first, then rows (ATen's grouping); an axis
// without taps (null) is taken as it is, as the numpy twin skips an axis resized to its own size
void resize(const float* in, int in_h, int in_w, const Taps* ty, const Taps* tx, std::vector<float>& cols,
            float* out) {
  const int out_w = tx ? static_cast<int>(tx->lo.size()) : in_w;
  const float* rows = in;
  if (tx) {
    float* c = out;
    if (ty) {
      cols.resize(static_cast<size_t>(in_h) * out_w);
      c = cols.data();
    }
    for (int r = 0; r < in_h; ++r) {
      const float* row = in + static_cast<size_t>(r) * in_w;
      float* o = c + static_cast<size_t>(r) * out_w;
      for (int x = 0; x < out_w; ++x) o[x] = row[tx->lo[x]] * tx->w_lo[x] + row[tx->hi[x]] * tx->w_hi[x];
    }
    rows = c;
  }
  if (ty) {
    for (size_t y = 0; y < ty->lo.size(); ++y) {
      const float* a = rows + static_cast<size_t>(ty->lo[y]) * out_w;
      const float* b = rows + static_cast<size_t>(ty->hi[y]) * out_w;
      const float wl = ty->w_lo[y], wh = ty->w_hi[y];
      float* o = out + y * out_w;
      for (int x = 0; x < out_w; ++x) o[x] = a[x] * wl + b[x] * wh;
    }
  } else if (!tx) {
    std::copy(in, in + static_cast<size_t>(in_h) * in_w, out);
  }
}

// Above this, sigmoid(x) > 0.5 in float32 whatever exponential rounds it (1 + exp(-x) < 2 - 2^-24 needs only
// x > ~9e-8); at or below it, the decision is taken with the C library's expf, as the numpy twin computes it.
constexpr float kSurelyInside = 1e-6f;

// sum of sigmoid(x) and count of pixels where sigmoid(x) > 0.5 (the twin: 1 / (exp(-max(x, 0)) + 1) > 0.5);
// ``soft`` is scratch of n floats
void mask_quality_sums(const float* __restrict x, float* __restrict soft, size_t n, double& soft_sum, double& count) {
  // the pixels surely inside, with the fast exponential (0 elsewhere), counting those at the threshold itself
  int64_t at_threshold = 0;
#pragma omp simd reduction(+ : at_threshold)
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float s = 1.0f / (vita_math::exp_nonpositive(v > 0.0f ? -v : 0.0f) + 1.0f);
    soft[i] = v > kSurelyInside ? s : 0.0f;
    at_threshold += (v > 0.0f) & !(v > kSurelyInside) ? 1 : 0;
  }
  // `omp simd` allows the lane-wise (reordered) sums
  double acc = 0.0;
  int64_t cnt = 0;
#pragma omp simd reduction(+ : acc, cnt)
  for (size_t i = 0; i < n; ++i) {
    acc += soft[i];
    cnt += soft[i] > 0.0f ? 1 : 0;
  }
  // the rare pixels at the threshold itself; the scan only where there are some: its sign test mispredicts
  // along every mask edge (1.2 ms of 1.5 for a 360x640 map)
  for (size_t i = 0; at_threshold > 0 && i < n; ++i) {
    const float v = x[i];
    if (v > 0.0f && !(v > kSurelyInside)) {
      const float s = 1.0f / (std::exp(-v) + 1.0f);
      if (s > 0.5f) {
        acc += s;
        cnt += 1;
      }
    }
  }
  soft_sum += acc;
  count += static_cast<double>(cnt);
}

}  // namespace

// logits (k, t, h, w) float32 -> masks (k, t, out_h, out_w) bytes 0/1; per (query, frame) pair the sum of
// sigmoid over the hard mask (sigmoid > 0.5) and its pixel count at the crop, into sums (k * t, 2) doubles.
// The crop is the top-left (crop_h, crop_w) of the padded-size resize; it is resized to (out_h, out_w) when
// that differs (an axis of equal size is taken as it is, as in the numpy twin). Returns 0, or -1 on bad sizes.
extern "C" __attribute__((visibility("default"))) int vita_masks_from_logits(
    const float* logits, int k, int t, int h, int w, int padded_h, int padded_w, int crop_h, int crop_w,
    int out_h, int out_w, uint8_t* masks, double* sums, int threads) {
  if (k < 0 || t < 0 || h <= 0 || w <= 0 || crop_h <= 0 || crop_w <= 0 || out_h <= 0 || out_w <= 0 ||
      crop_h > padded_h || crop_w > padded_w)
    return -1;
  const bool same_y1 = (h == padded_h && padded_h == crop_h), same_x1 = (w == padded_w && padded_w == crop_w);
  const bool same_y2 = (crop_h == out_h), same_x2 = (crop_w == out_w);
  const Taps ty1 = linear_taps(h, padded_h, crop_h), tx1 = linear_taps(w, padded_w, crop_w);
  const Taps ty2 = linear_taps(crop_h, out_h, out_h), tx2 = linear_taps(crop_w, out_w, out_w);
  const int pairs = k * t;
  auto work = [&](int first, int step) {
    std::vector<float> crop(static_cast<size_t>(crop_h) * crop_w), soft(crop.size()), full, cols;
    for (int p = first; p < pairs; p += step) {
      const float* in = logits + static_cast<size_t>(p) * h * w;
      // stage 1: the crop at the resized scale
      resize(in, h, w, same_y1 ? nullptr : &ty1, same_x1 ? nullptr : &tx1, cols, crop.data());
      // the mask-quality sums over the hard mask, sigmoid(x) > 0.5, which needs x > 0
      double soft_sum = 0.0, count = 0.0;
      mask_quality_sums(crop.data(), soft.data(), crop.size(), soft_sum, count);
      sums[2 * p] = soft_sum;
      sums[2 * p + 1] = count;
      // stage 2: to the original size, then the threshold on logits
      uint8_t* m = masks + static_cast<size_t>(p) * out_h * out_w;
      const float* final_logits = crop.data();
      if (!(same_y2 && same_x2)) {
        full.resize(static_cast<size_t>(out_h) * out_w);
        resize(crop.data(), crop_h, crop_w, same_y2 ? nullptr : &ty2, same_x2 ? nullptr : &tx2, cols, full.data());
        final_logits = full.data();
      }
      const size_t n = static_cast<size_t>(out_h) * out_w;
      for (size_t i = 0; i < n; ++i) m[i] = final_logits[i] > 0.0f;
    }
  };
  const int n_threads = std::max(1, std::min(threads, pairs));
  std::vector<std::thread> pool;
  for (int i = 1; i < n_threads; ++i) pool.emplace_back(work, i, n_threads);
  work(0, n_threads);
  for (auto& th : pool) th.join();
  return 0;
}

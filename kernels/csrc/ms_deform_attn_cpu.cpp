// Multi-scale deformable attention for CPU inference, fused from the two projections to the output.
//
// One pass per (query, head): softmax of the attention logits, sampling positions from the reference point
// and the pixel offsets, and the bilinear taps gathered straight from the value table, accumulated in fp32.
// Semantics of kernels.reference.ms_deform_attn_from_projections (grid_sample, bilinear, zeros padding,
// align_corners=False). No autograd: the Python side uses it only where no gradient is asked for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp for x <= 0 (softmax after subtracting the maximum), branch-free so that the compiler vectorises the
// loop around it: Cody-Waite reduction by ln 2 and Cephes' degree-6 polynomial, within 2 ulp of expf
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // (not std::max: its reference result blocks vectorisation) exp(-87) is still a normal float; the softmax weight is 0 to fp32 anyway
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

// One (query, head): the bilinear taps of every level and point, weighted and summed into ``dst``.
// ``acc`` holds four accumulators of ``d`` floats, one per tap corner: with one shared accumulator every
// tap waited for the previous one's multiply-add (measured: that chain was most of the kernel's time).
// A tap outside its level reads a clamped pixel with weight 0 (no branch per tap).
template <typename scalar_t, int64_t kD>
inline void sample_head(float* __restrict acc, int64_t d_runtime, const scalar_t* v_head, int64_t row,
                        const std::vector<int64_t>& hs, const std::vector<int64_t>& ws,
                        const std::vector<int64_t>& starts, const float* xs, const float* ys, const float* w,
                        float inv, int64_t points, scalar_t* dst) {
  const int64_t d = kD > 0 ? kD : d_runtime;
  for (int64_t c = 0; c < 4 * d; ++c) acc[c] = 0.f;
  const int64_t levels = static_cast<int64_t>(hs.size());
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t hl = hs[l], wl = ws[l];
    const float fw = static_cast<float>(wl), fh = static_cast<float>(hl);
    const scalar_t* vl = v_head + starts[l] * row;
    for (int64_t p = 0; p < points; ++p) {
      const int64_t i = l * points + p;
      const float x = xs[i], y = ys[i];
      if (!(x > -1.f && x < fw && y > -1.f && y < fh)) continue;  // no tap inside (NaN too)
      const float a = w[i] * inv;
      const float x0f = std::floor(x), y0f = std::floor(y);
      const float fx = x - x0f, fy = y - y0f;
      const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
      const float vx0 = x0 >= 0 ? 1.f : 0.f, vx1 = x0 + 1 < wl ? 1.f : 0.f;
      const float vy0 = y0 >= 0 ? 1.f : 0.f, vy1 = y0 + 1 < hl ? 1.f : 0.f;
      const int64_t xa = std::max<int64_t>(x0, 0), xb = std::min<int64_t>(x0 + 1, wl - 1);
      const int64_t ya = std::max<int64_t>(y0, 0), yb = std::min<int64_t>(y0 + 1, hl - 1);
      const float c00 = a * (1.f - fx) * (1.f - fy) * vx0 * vy0, c01 = a * fx * (1.f - fy) * vx1 * vy0;
      const float c10 = a * (1.f - fx) * fy * vx0 * vy1, c11 = a * fx * fy * vx1 * vy1;
      const scalar_t* __restrict r00 = vl + (ya * wl + xa) * row;
      const scalar_t* __restrict r01 = vl + (ya * wl + xb) * row;
      const scalar_t* __restrict r10 = vl + (yb * wl + xa) * row;
      const scalar_t* __restrict r11 = vl + (yb * wl + xb) * row;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        acc[c] += c00 * static_cast<float>(r00[c]);
        acc[d + c] += c01 * static_cast<float>(r01[c]);
        acc[2 * d + c] += c10 * static_cast<float>(r10[c]);
        acc[3 * d + c] += c11 * static_cast<float>(r11[c]);
      }
    }
  }
  for (int64_t c = 0; c < d; ++c) {
    dst[c] = static_cast<scalar_t>((acc[c] + acc[d + c]) + (acc[2 * d + c] + acc[3 * d + c]));
  }
}

template <typename scalar_t, int64_t kD>
void run(const at::Tensor& value, const std::vector<int64_t>& shapes, const at::Tensor& refs,
         const at::Tensor& offsets, const at::Tensor& logits, int64_t levels, int64_t points, at::Tensor& out) {
  const int64_t n_batch = value.size(0), s_len = value.size(1), heads = value.size(2), d = value.size(3);
  const int64_t lq = offsets.size(1);
  const int64_t lp = levels * points, samples = heads * lp;
  std::vector<int64_t> starts(levels), hs(levels), ws(levels);
  int64_t acc_start = 0;
  for (int64_t l = 0; l < levels; ++l) {
    hs[l] = shapes[2 * l];
    ws[l] = shapes[2 * l + 1];
    starts[l] = acc_start;
    acc_start += hs[l] * ws[l];
  }
  // per sample (head, level, point): its level's width and height, as floats for the position math
  std::vector<float> sample_w(samples), sample_h(samples);
  for (int64_t i = 0; i < samples; ++i) {
    const int64_t l = (i % lp) / points;
    sample_w[i] = static_cast<float>(ws[l]);
    sample_h[i] = static_cast<float>(hs[l]);
  }
  const scalar_t* v = value.data_ptr<scalar_t>();
  const float* r = refs.data_ptr<float>();
  const int64_t ref_batch = refs.size(0) == 1 ? 0 : lq * 2;
  const scalar_t* off = offsets.data_ptr<scalar_t>();
  const scalar_t* att = logits.data_ptr<scalar_t>();
  const int64_t off_n = offsets.stride(0), off_q = offsets.stride(1);
  const int64_t att_n = logits.stride(0), att_q = logits.stride(1);
  scalar_t* o = out.data_ptr<scalar_t>();
  const int64_t row = heads * d;  // value-table stride between pixels
  const float* sw = sample_w.data();
  const float* sh = sample_h.data();

  at::parallel_for(0, n_batch * lq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(4 * d), w_buf(samples), xs_buf(samples), ys_buf(samples), shift_buf(samples);
    // plain restrict pointers: through the vectors the compiler reloads their data pointers and cannot vectorise
    float* __restrict w = w_buf.data();
    float* __restrict xs = xs_buf.data();
    float* __restrict ys = ys_buf.data();
    float* __restrict shift = shift_buf.data();
    for (int64_t m = begin; m < end; ++m) {
      const int64_t n = m / lq, q = m % lq;
      const float rx = r[n * ref_batch + q * 2], ry = r[n * ref_batch + q * 2 + 1];
      const scalar_t* om = off + n * off_n + q * off_q;
      const scalar_t* am = att + n * att_n + q * att_q;
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
      // pixel coordinates: (reference + offset / size) * size - 0.5 (grid_sample, align_corners=False)
      for (int64_t i = 0; i < samples; ++i) {
        xs[i] = rx * sw[i] + static_cast<float>(om[2 * i]) - 0.5f;
        ys[i] = ry * sh[i] + static_cast<float>(om[2 * i + 1]) - 0.5f;
      }
      for (int64_t h = 0; h < heads; ++h) {
        float total = 0.f;
        for (int64_t i = 0; i < lp; ++i) total += w[h * lp + i];
        const float inv = 1.f / total;
        scalar_t* dst = o + m * row + h * d;
        if constexpr (kD > 0) {
          float acc4[4 * kD];  // a fixed size: the compiler keeps the four chains in registers
          sample_head<scalar_t, kD>(acc4, d, v + n * s_len * row + h * d, row, hs, ws, starts, xs + h * lp,
                                    ys + h * lp, w + h * lp, inv, points, dst);
        } else {
          sample_head<scalar_t, kD>(acc.data(), d, v + n * s_len * row + h * d, row, hs, ws, starts, xs + h * lp,
                                    ys + h * lp, w + h * lp, inv, points, dst);
        }
      }
    }
  });
}

template <typename scalar_t>
void dispatch_d(const at::Tensor& value, const std::vector<int64_t>& shapes, const at::Tensor& refs,
                const at::Tensor& offsets, const at::Tensor& logits, int64_t levels, int64_t points, at::Tensor& out) {
  if (value.size(3) == 32) {
    run<scalar_t, 32>(value, shapes, refs, offsets, logits, levels, points, out);
  } else {
    run<scalar_t, 0>(value, shapes, refs, offsets, logits, levels, points, out);
  }
}

at::Tensor msda_fused(const at::Tensor& value, at::IntArrayRef shapes, const at::Tensor& refs,
                      const at::Tensor& offsets, const at::Tensor& logits, int64_t levels, int64_t points) {
  TORCH_CHECK(value.dim() == 4 && value.is_contiguous(), "value must be a contiguous (N, S, heads, D) tensor");
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 * levels, "shapes must hold (h, w) of every level");
  const int64_t n = value.size(0), heads = value.size(2), lp = levels * points;
  TORCH_CHECK(offsets.dim() == 3 && offsets.size(0) == n && offsets.size(2) == heads * lp * 2 && offsets.stride(2) == 1,
              "offsets must be (N, Lq, heads*levels*points*2) with unit last stride");
  TORCH_CHECK(logits.dim() == 3 && logits.size(0) == n && logits.size(1) == offsets.size(1) &&
              logits.size(2) == heads * lp && logits.stride(2) == 1,
              "logits must be (N, Lq, heads*levels*points) with unit last stride");
  TORCH_CHECK(refs.dim() == 3 && (refs.size(0) == 1 || refs.size(0) == n) && refs.size(1) == offsets.size(1) &&
              refs.size(2) == 2 && refs.scalar_type() == at::kFloat && refs.is_contiguous(),
              "reference points must be contiguous float32 (1 or N, Lq, 2)");
  TORCH_CHECK(offsets.scalar_type() == value.scalar_type() && logits.scalar_type() == value.scalar_type(),
              "value, offsets and logits must share one dtype");
  int64_t total = 0;
  for (int64_t l = 0; l < levels; ++l) total += shapes[2 * l] * shapes[2 * l + 1];
  TORCH_CHECK(total == value.size(1), "the levels' sizes do not add up to the value length");
  std::vector<int64_t> hw(shapes.begin(), shapes.end());
  at::Tensor out = at::empty({n, offsets.size(1), heads * value.size(3)}, value.options());
  if (value.scalar_type() == at::kFloat) {
    dispatch_d<float>(value, hw, refs, offsets, logits, levels, points, out);
  } else if (value.scalar_type() == at::kBFloat16) {
    dispatch_d<c10::BFloat16>(value, hw, refs, offsets, logits, levels, points, out);
  } else {
    TORCH_CHECK(false, "msda_fused takes float32 or bfloat16, got ", value.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(vita_kernels, m) {
  m.def("msda_fused(Tensor value, int[] shapes, Tensor refs, Tensor offsets, Tensor logits, int levels, int points) -> Tensor");
}

TORCH_LIBRARY_IMPL(vita_kernels, CPU, m) {
  m.impl("msda_fused", &msda_fused);
}

// Winograd transforms for 3x3, stride-1, padding-1 convolutions on the CPU, as torch operators
// (``torch.ops.vita_kernels.winograd_input`` / ``winograd_output``). The Python side
// (vita_train/modeling/winograd.py) multiplies the transformed tiles by the transformed weights with one
// grouped 1x1 oneDNN convolution in between. F(2x2,3x3) and F(4x4,3x3), Lavin & Gray's matrices
// (interpolation points 0, +-1, +-2 and infinity). Channels-last, no autograd. The activations (input and
// output) are float32 or bfloat16; the Winograd domain is float32 either way: F(4x4)'s transforms amplify
// rounding, and tiles and products rounded to bf16 were 9x as far from a float64 convolution as bf16's direct
// convolution (F(2x2): 1.7x), while with float32 tiles the bf16 convolution is nearer to it than the direct one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "winograd_core.h"
#include "thread_count.h"

namespace {

using vita_winograd::input_axis;
using vita_winograd::kBlock;
using vita_winograd::output_axis;

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

// float -> bfloat16, rounding to nearest even, as a plain integer expression so that the store loops vectorise
// (the results are finite: sums of finite products)
inline uint16_t bf16_bits(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// x (N, H, W, C) -> v (tiles, (m+2)^2, C): the input window of each m x m tile of output rows [row0, row1)
// (zero outside the image)
template <int M, typename In>
void transform_input(const In* x, int64_t n, int64_t h, int64_t w, int64_t c, int64_t row0, int64_t row1,
                     float* v) {
  constexpr int K = M + 2, P = K * K;
  const int64_t th = (row1 - row0 + M - 1) / M, tw = (w + M - 1) / M;
  vita_threads::parallel_for(0, n * th * tw, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float window[P * kBlock];
    alignas(64) float rows[P * kBlock];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / (th * tw), ty = (tile / tw) % th, tx = tile % tw;
      const int64_t y0 = row0 + ty * M - 1, x0 = tx * M - 1;
      float* out = v + tile * P * c;
      for (int64_t cb = 0; cb < c; cb += kBlock) {
        for (int i = 0; i < K; ++i) {
          const int64_t yy = y0 + i;
          for (int j = 0; j < K; ++j) {
            const int64_t xx = x0 + j;
            float* dst = window + (i * K + j) * kBlock;
            if (yy >= 0 && yy < h && xx >= 0 && xx < w) {
              const In* src = x + ((b * h + yy) * w + xx) * c + cb;
#pragma omp simd
              for (int64_t k = 0; k < kBlock; ++k) dst[k] = widen(src[k]);
            } else {
#pragma omp simd
              for (int64_t k = 0; k < kBlock; ++k) dst[k] = 0.f;
            }
          }
        }
        for (int j = 0; j < K; ++j) input_axis<M>(window + j * kBlock, K * kBlock, rows + j * kBlock, K * kBlock);
        for (int i = 0; i < K; ++i) input_axis<M>(rows + i * K * kBlock, kBlock, out + i * K * c + cb, c);
      }
    }
  });
}

// p (tiles, (m+2)^2, C) -> rows [row0, row1) of y (N, H, W, C): A^T p A per tile, plus bias, then ReLU when
// asked
template <int M, typename Out>
void transform_output(const float* p, const float* bias, bool relu, int64_t n, int64_t h, int64_t w, int64_t c,
                      int64_t row0, int64_t row1, Out* y) {
  constexpr int K = M + 2, P = K * K;
  const int64_t th = (row1 - row0 + M - 1) / M, tw = (w + M - 1) / M;
  const float floor = relu ? 0.f : -std::numeric_limits<float>::infinity();
  vita_threads::parallel_for(0, n * th * tw, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float cols[M * K * kBlock];
    alignas(64) float tile_out[M * M * kBlock];
    alignas(64) float zeros[kBlock] = {};
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t b = tile / (th * tw), ty = (tile / tw) % th, tx = tile % tw;
      const float* src = p + tile * P * c;
      for (int64_t cb = 0; cb < c; cb += kBlock) {
        for (int j = 0; j < K; ++j) output_axis<M>(src + j * c + cb, K * c, cols + j * kBlock, K * kBlock);
        for (int i = 0; i < M; ++i) output_axis<M>(cols + i * K * kBlock, kBlock, tile_out + i * M * kBlock, kBlock);
        const float* bb = bias ? bias + cb : zeros;
        for (int i = 0; i < M && row0 + ty * M + i < row1; ++i) {
          for (int j = 0; j < M && tx * M + j < w; ++j) {
            Out* dst = y + ((b * h + row0 + ty * M + i) * w + tx * M + j) * c + cb;
            const float* o = tile_out + (i * M + j) * kBlock;
            if constexpr (std::is_same_v<Out, float>) {
#pragma omp simd
              for (int64_t k = 0; k < kBlock; ++k) dst[k] = std::max(o[k] + bb[k], floor);
            } else {
              alignas(64) uint16_t bits[kBlock];
#pragma omp simd
              for (int64_t k = 0; k < kBlock; ++k) {
                const float y = o[k] + bb[k];
                bits[k] = bf16_bits(y > floor ? y : floor);
              }
              std::memcpy(dst, bits, sizeof(bits));
            }
          }
        }
      }
    }
  });
}

void check_band(int64_t tile, int64_t h, int64_t row0, int64_t row1) {
  TORCH_CHECK(tile == 2 || tile == 4, "the Winograd tile must be 2 or 4 (F(2x2,3x3) or F(4x4,3x3)), got ", tile);
  TORCH_CHECK(0 <= row0 && row0 < row1 && row1 <= h && row0 % tile == 0,
              "Winograd rows [", row0, ", ", row1, ") must lie in [0, ", h, ") and start on a tile row");
}

int64_t band_tiles(int64_t n, int64_t w, int64_t row0, int64_t row1, int64_t tile) {
  return n * ((row1 - row0 + tile - 1) / tile) * ((w + tile - 1) / tile);
}

at::Tensor winograd_input(const at::Tensor& x, int64_t tile, int64_t row0, int64_t row1) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "winograd_input takes a channels-last float32 or bfloat16 (N, C, H, W) tensor");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  check_band(tile, h, row0, row1);
  TORCH_CHECK(c % kBlock == 0, "winograd_input needs a multiple of 16 channels, got ", c);
  at::Tensor v = at::empty({band_tiles(n, w, row0, row1, tile), (tile + 2) * (tile + 2), c},
                           x.options().dtype(at::kFloat));
  float* vp = v.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16) {
    const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
    tile == 2 ? transform_input<2>(xp, n, h, w, c, row0, row1, vp) : transform_input<4>(xp, n, h, w, c, row0, row1, vp);
  } else {
    const float* xp = x.data_ptr<float>();
    tile == 2 ? transform_input<2>(xp, n, h, w, c, row0, row1, vp) : transform_input<4>(xp, n, h, w, c, row0, row1, vp);
  }
  return v;
}

void winograd_output(const at::Tensor& p, const c10::optional<at::Tensor>& bias, bool relu, at::Tensor& out,
                     int64_t row0, int64_t row1, int64_t tile) {
  TORCH_CHECK(out.dim() == 4 && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16) &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "winograd_output writes into a channels-last float32 or bfloat16 (N, C, H, W) tensor");
  const int64_t n = out.size(0), c = out.size(1), h = out.size(2), w = out.size(3);
  check_band(tile, h, row0, row1);
  TORCH_CHECK(p.dim() == 3 && p.scalar_type() == at::kFloat && p.is_contiguous(),
              "winograd_output takes a contiguous float32 (tiles, points, C) tensor");
  TORCH_CHECK(p.size(0) == band_tiles(n, w, row0, row1, tile) && p.size(1) == (tile + 2) * (tile + 2) && p.size(2) == c,
              "winograd_output: the products' shape does not match the output rows and tile");
  TORCH_CHECK(c % kBlock == 0, "winograd_output needs a multiple of 16 channels, got ", c);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == c && bias->scalar_type() == at::kFloat, "winograd_output: float32 bias of C values");
    b = bias->contiguous();
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* pp = p.data_ptr<float>();
  if (out.scalar_type() == at::kBFloat16) {
    at::BFloat16* yp = out.data_ptr<at::BFloat16>();
    tile == 2 ? transform_output<2>(pp, bp, relu, n, h, w, c, row0, row1, yp)
              : transform_output<4>(pp, bp, relu, n, h, w, c, row0, row1, yp);
  } else {
    float* yp = out.data_ptr<float>();
    tile == 2 ? transform_output<2>(pp, bp, relu, n, h, w, c, row0, row1, yp)
              : transform_output<4>(pp, bp, relu, n, h, w, c, row0, row1, yp);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vita_kernels, m) {
  m.def("winograd_input(Tensor x, int tile, int row_begin, int row_end) -> Tensor");
  m.def("winograd_output(Tensor products, Tensor? bias, bool relu, Tensor(a!) out, int row_begin, int row_end, "
        "int tile) -> ()");
}

TORCH_LIBRARY_IMPL(vita_kernels, CPU, m) {
  m.impl("winograd_input", &winograd_input);
  m.impl("winograd_output", &winograd_output);
}

// Multi-head attention with a boolean mask shared by the heads, for CPU inference, as a torch operator
// (``torch.ops.vita_kernels.masked_attention``): softmax(q k^T / sqrt(d), blocked -> weight 0) v.
//
// For the frame decoder's masked cross-attention (100 queries over a feature map of up to a few thousand
// pixels, 8 heads of 32 channels). PyTorch's CPU flash attention tiles that into 32-query blocks (the
// 100th-query block of 4 rows costs as much as a full one) and turns a boolean mask into a float one on
// every call: 9.2 ms for 3840 keys in bf16, where this kernel's two register-blocked products and one
// softmax pass per row take a few. q, k and v are the projections' (N, L, C) outputs as they lie (head h is
// channels [h*d, (h+1)*d)); the output is (N, Lq, C), what the output projection reads, so no transposes.
// float32 or bfloat16 in and out; the scores, weights and sums are float32 (bf16 inputs widened exactly).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fast_math.h"
#include "thread_count.h"

namespace {

constexpr int64_t kKeys = 16;  // keys per block of the transposed key table: one AVX-512 vector
constexpr int64_t kRows = 4;   // queries computed together (their accumulators stay in registers)
constexpr int64_t kRun = 64;   // keys per partial weighted sum

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

template <typename T>
inline T narrow(float v) {
  return static_cast<T>(v);
}

// one (batch, head): scores, masked softmax and weighted sum for every query, into out; D channels per head
template <typename T, int64_t D>
void attend_head(const T* q, int64_t q_rs, const T* k, int64_t k_rs, const T* v, int64_t v_rs, const uint8_t* mask,
                 int64_t m_rs, int64_t lq, int64_t lk, float scale, T* out, int64_t o_rs) {
  const int64_t blocks = (lk + kKeys - 1) / kKeys, lkp = blocks * kKeys;
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(lkp * D + lk * D + kRows * lkp));
  float* kt = buffer.data();  // (blocks, D, kKeys): the keys transposed, zero past lk
  float* vf = kt + lkp * D;   // (lk, D)
  float* s = vf + lk * D;     // (kRows, lkp): scores, then weights
  for (int64_t j = 0; j < lkp; ++j) {
    float* dst = kt + (j / kKeys) * D * kKeys + j % kKeys;
    for (int64_t c = 0; c < D; ++c) dst[c * kKeys] = j < lk ? widen(k[j * k_rs + c]) : 0.f;
  }
  for (int64_t j = 0; j < lk; ++j) {
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) vf[j * D + c] = widen(v[j * v_rs + c]);
  }
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t i0 = 0; i0 < lq; i0 += kRows) {
    const int64_t rows = std::min(kRows, lq - i0);
    alignas(64) float qf[kRows][D];
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t c = 0; c < D; ++c) qf[r][c] = r < rows ? widen(q[(i0 + r) * q_rs + c]) * scale : 0.f;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      alignas(64) float a[kRows][kKeys] = {};
      const float* kb = kt + b * D * kKeys;
      for (int64_t c = 0; c < D; ++c) {
        for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
          for (int64_t l = 0; l < kKeys; ++l) a[r][l] += qf[r][c] * kb[c * kKeys + l];
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
        for (int64_t l = 0; l < kKeys; ++l) s[r * lkp + b * kKeys + l] = a[r][l];
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      float* sr = s + r * lkp;
      if (r >= rows) {
        std::fill(sr, sr + lk, 0.f);
        continue;
      }
      const uint8_t* m = mask ? mask + (i0 + r) * m_rs : nullptr;
      if (m) {
#pragma omp simd
        for (int64_t j = 0; j < lk; ++j) sr[j] = m[j] ? kNegInf : sr[j];
      }
      // the maximum over 16 lanes (the padding past lk set to -inf): a plain reduction did not vectorise
      for (int64_t j = lk; j < lkp; ++j) sr[j] = kNegInf;
      alignas(64) float lanes[kKeys];
      std::fill(lanes, lanes + kKeys, kNegInf);
      for (int64_t j = 0; j < lkp; j += kKeys) {
#pragma omp simd
        for (int64_t l = 0; l < kKeys; ++l) lanes[l] = sr[j + l] > lanes[l] ? sr[j + l] : lanes[l];
      }
      float top = kNegInf;
      for (int64_t l = 0; l < kKeys; ++l) top = lanes[l] > top ? lanes[l] : top;
      if (top == kNegInf) {  // every key blocked: no weights, a zero output
        std::fill(sr, sr + lk, 0.f);
        continue;
      }
      float sum = 0.f;
      if (m) {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < lk; ++j) {
          // a blocked key's exp(-inf) is clamped to a tiny normal number by exp_nonpositive: zero it exactly
          const float e = vita_math::exp_nonpositive(sr[j] - top) * static_cast<float>(1 - m[j]);
          sr[j] = e;
          sum += e;
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < lk; ++j) {
          const float e = vita_math::exp_nonpositive(sr[j] - top);
          sr[j] = e;
          sum += e;
        }
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t j = 0; j < lk; ++j) sr[j] *= inv;
    }
    // summed in runs of kRun keys, the runs then added: one sum over thousands of keys lost 2-5x the
    // accuracy of SDPA's blocked sums (against float64)
    alignas(64) float acc[kRows][D] = {};
    for (int64_t j0 = 0; j0 < lk; j0 += kRun) {
      alignas(64) float part[kRows][D] = {};
      for (int64_t j = j0; j < std::min(j0 + kRun, lk); ++j) {
        const float* vj = vf + j * D;
        for (int64_t r = 0; r < kRows; ++r) {
          const float p = s[r * lkp + j];
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) part[r][c] += p * vj[c];
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) acc[r][c] += part[r][c];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = out + (i0 + r) * o_rs;
      for (int64_t c = 0; c < D; ++c) dst[c] = narrow<T>(acc[r][c]);
    }
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, int64_t heads,
         at::Tensor& out) {
  const int64_t n = q.size(0), lq = q.size(1), lk = k.size(1), c = q.size(2), d = c / heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const uint8_t* mp = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const int64_t m_bs = mask.defined() ? mask.stride(0) : 0, m_rs = mask.defined() ? mask.stride(1) : 0;
  auto head = d == 16 ? attend_head<T, 16> : d == 32 ? attend_head<T, 32> : attend_head<T, 64>;
  vita_threads::parallel_for(0, n * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / heads, h = t % heads;
      head(qp + b * q.stride(0) + h * d, q.stride(1), kp + b * k.stride(0) + h * d, k.stride(1),
           vp + b * v.stride(0) + h * d, v.stride(1), mp ? mp + b * m_bs : nullptr, m_rs, lq, lk, scale,
           op + b * out.stride(0) + h * d, out.stride(1));
    }
  });
}

at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, int64_t heads) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "masked_attention takes (N, L, C) q, k and v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "masked_attention: q, k and v must all be float32 or all bfloat16");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "masked_attention: q, k and v need contiguous channels");
  const int64_t n = q.size(0), lq = q.size(1), c = q.size(2), lk = k.size(1);
  TORCH_CHECK(heads > 0 && c % heads == 0, "masked_attention: ", c, " channels do not split into ", heads, " heads");
  TORCH_CHECK(c / heads == 16 || c / heads == 32 || c / heads == 64,
              "masked_attention: heads of 16, 32 or 64 channels, got ", c / heads);
  TORCH_CHECK(k.size(0) == n && v.size(0) == n && k.size(2) == c && v.size(2) == c && v.size(1) == lk,
              "masked_attention: q (N, Lq, C), k and v (N, Lk, C) do not match");
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 3 && mask->size(1) == lq &&
                    mask->size(2) == lk && (mask->size(0) == n || mask->size(0) == 1) && mask->stride(2) == 1,
                "masked_attention: the mask is a boolean (N or 1, Lq, Lk) tensor with contiguous rows");
    m = mask->size(0) == n ? *mask : mask->expand({n, lq, lk});
  }
  at::Tensor out = at::empty({n, lq, c}, q.options());
  if (lq == 0 || n == 0) return out;
  if (q.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(q, k, v, m, heads, out);
  } else {
    run<float>(q, k, v, m, heads, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vita_kernels, m) {
  m.def("masked_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(vita_kernels, CPU, m) { m.impl("masked_attention", &masked_attention); }

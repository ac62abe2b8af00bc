// Multi-scale deformable attention for CPU inference as a torch operator (``torch.ops.vita_kernels.msda_fused``):
// checks the tensors and splits the queries over torch's threads; the computation is ms_deform_attn_core.h.
// No autograd: the Python side uses it only where no gradient is asked for.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "ms_deform_attn_core.h"
#include "thread_count.h"

namespace {

template <typename scalar_t>
void run(const at::Tensor& value, const std::vector<int64_t>& shapes, const at::Tensor& refs,
         const at::Tensor& offsets, const at::Tensor& logits, int64_t levels, int64_t points, at::Tensor& out) {
  const vita_msda::Problem pr{value.size(0), value.size(1), value.size(2), value.size(3), offsets.size(1),
                              levels, points, offsets.stride(0), offsets.stride(1), logits.stride(0),
                              logits.stride(1), refs.size(0) == 1 ? 0 : offsets.size(1) * 2};
  const vita_msda::Levels lv(shapes.data(), levels, pr.heads, points);
  const scalar_t* v = value.data_ptr<scalar_t>();
  const float* r = refs.data_ptr<float>();
  const scalar_t* off = offsets.data_ptr<scalar_t>();
  const scalar_t* att = logits.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  vita_threads::parallel_for(0, pr.n_batch * pr.lq, 16, [&](int64_t begin, int64_t end) {
    vita_msda::run_range_any_d<scalar_t>(pr, lv, v, r, off, att, o, begin, end);
  });
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
  for (int64_t l = 0; l < levels; ++l) {
    TORCH_CHECK(shapes[2 * l] <= vita_msda::kMaxSide && shapes[2 * l + 1] <= vita_msda::kMaxSide,
                "a level is over 2^24 pixels high or wide, more than msda_fused takes");
    total += shapes[2 * l] * shapes[2 * l + 1];
  }
  TORCH_CHECK(total == value.size(1), "the levels' sizes do not add up to the value length");
  TORCH_CHECK(total <= vita_msda::kMaxPixels, "the value length is over 2^31 - 1 pixels, more than msda_fused indexes");
  std::vector<int64_t> hw(shapes.begin(), shapes.end());
  at::Tensor out = at::empty({n, offsets.size(1), heads * value.size(3)}, value.options());
  if (value.scalar_type() == at::kFloat) {
    run<float>(value, hw, refs, offsets, logits, levels, points, out);
  } else if (value.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(value, hw, refs, offsets, logits, levels, points, out);
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

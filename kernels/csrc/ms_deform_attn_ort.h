// Multi-scale deformable attention as an ONNX Runtime custom operator, vita.ops::MSDeformAttn (CPU, float32).
//
// inputs   value (N, S, heads, D); spatial_shapes (L, 2) int64 as (H, W); reference_points (1 or N, Lq, 2) as
//          (x, y) in [0, 1]; offsets (N, Lq, heads*L*P*2) in pixels of each level, (x, y) innermost;
//          logits (N, Lq, heads*L*P), softmaxed over each head's L*P
// output   (N, Lq, heads*D)
// The points per level P is logits' last size / (heads * L). Semantics of
// kernels.reference.ms_deform_attn_from_projections; the computation is ms_deform_attn_core.h, split over
// ONNX Runtime's own intra-op threads. Registered by ort_ops.cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "ms_deform_attn_core.h"
#include "ort_api_min.h"

namespace vita_msda_ort {

using vita_ort::describe;
using vita_ort::dims_text;

constexpr const char* kOpName = "MSDeformAttn";
constexpr int64_t kRowsPerTask = 16;

struct Kernel {
  vita_ort::Api api;
};

struct Job {
  const vita_msda::Problem* pr;
  const vita_msda::Levels* lv;
  const float *v, *r, *off, *att;
  float* o;
  int64_t rows;
};

void run_task(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t begin = static_cast<int64_t>(task) * kRowsPerTask;
  const int64_t end = std::min(begin + kRowsPerTask, job.rows);
  vita_msda::run_range_any_d<float>(*job.pr, *job.lv, job.v, job.r, job.off, job.att, job.o, begin, end);
}

OrtStatus* compute(void* op_kernel, OrtKernelContext* context) {
  const vita_ort::Api& api = static_cast<Kernel*>(op_kernel)->api;
  const OrtValue* in[5];
  int types[5];
  std::vector<int64_t> dims[5];
  const char* names[5] = {"value", "spatial_shapes", "reference_points", "offsets", "logits"};
  for (size_t i = 0; i < 5; ++i) {
    if (OrtStatus* s = api.KernelContext_GetInput(context, i, &in[i])) return s;
    if (OrtStatus* s = describe(api, in[i], &types[i], &dims[i])) return s;
    const int want = i == 1 ? kOrtInt64 : kOrtFloat;
    if (types[i] != want) {
      const std::string msg = std::string(kOpName) + ": " + names[i] + " must be " + (i == 1 ? "int64" : "float32");
      return api.CreateStatus(kOrtInvalidArgument, msg.c_str());
    }
  }
  const auto& vd = dims[0];
  const auto& sd = dims[1];
  const auto& rd = dims[2];
  const auto& od = dims[3];
  const auto& ad = dims[4];
  auto bad = [&](const std::string& what) {
    const std::string msg = std::string(kOpName) + ": " + what + " (value " + dims_text(vd) + ", spatial_shapes " +
                            dims_text(sd) + ", reference_points " + dims_text(rd) + ", offsets " + dims_text(od) +
                            ", logits " + dims_text(ad) + ")";
    return api.CreateStatus(kOrtInvalidArgument, msg.c_str());
  };
  if (vd.size() != 4 || sd.size() != 2 || sd[1] != 2 || rd.size() != 3 || od.size() != 3 || ad.size() != 3) {
    return bad("inputs must be value (N, S, heads, D), spatial_shapes (L, 2), reference_points (N, Lq, 2), "
               "offsets (N, Lq, heads*L*P*2) and logits (N, Lq, heads*L*P)");
  }
  const int64_t n = vd[0], heads = vd[2], d = vd[3], levels = sd[0], lq = od[1];
  if (heads <= 0 || levels <= 0 || ad[2] % (heads * levels) != 0 || ad[2] == 0) {
    return bad("logits' last size must be a positive multiple of heads * levels");
  }
  const int64_t points = ad[2] / (heads * levels);
  if (od[0] != n || ad[0] != n || ad[1] != lq || od[2] != 2 * ad[2] || (rd[0] != 1 && rd[0] != n) ||
      rd[1] != lq || rd[2] != 2) {
    return bad("the batch, query and sample sizes of the inputs disagree");
  }
  void* raw[5];
  for (size_t i = 0; i < 5; ++i) {
    if (OrtStatus* s = api.GetTensorMutableData(const_cast<OrtValue*>(in[i]), &raw[i])) return s;
  }
  const int64_t* hw = static_cast<const int64_t*>(raw[1]);
  int64_t total = 0;
  for (int64_t l = 0; l < levels; ++l) {
    if (hw[2 * l] <= 0 || hw[2 * l + 1] <= 0) return bad("every level needs a positive height and width");
    if (hw[2 * l] > vita_msda::kMaxSide || hw[2 * l + 1] > vita_msda::kMaxSide) return bad("a level is over 2^24 pixels high or wide, more than this operator takes");
    total += hw[2 * l] * hw[2 * l + 1];
  }
  if (total != vd[1]) return bad("the levels' sizes (spatial_shapes) do not add up to the value length S");
  if (total > vita_msda::kMaxPixels) return bad("the value length S is over 2^31 - 1 pixels, more than this operator indexes");

  const int64_t out_dims[3] = {n, lq, heads * d};
  OrtValue* out = nullptr;
  if (OrtStatus* s = api.KernelContext_GetOutput(context, 0, out_dims, 3, &out)) return s;
  void* out_raw = nullptr;
  if (OrtStatus* s = api.GetTensorMutableData(out, &out_raw)) return s;
  if (n * lq == 0) return nullptr;

  const vita_msda::Problem pr{n, vd[1], heads, d, lq, levels, points, lq * od[2], od[2], lq * ad[2], ad[2],
                              rd[0] == 1 ? 0 : lq * 2};
  const vita_msda::Levels lv(hw, levels, heads, points);
  Job job{&pr, &lv, static_cast<const float*>(raw[0]), static_cast<const float*>(raw[2]),
          static_cast<const float*>(raw[3]), static_cast<const float*>(raw[4]), static_cast<float*>(out_raw), n * lq};
  const size_t tasks = static_cast<size_t>((job.rows + kRowsPerTask - 1) / kRowsPerTask);
  return api.KernelContext_ParallelFor(context, run_task, tasks, 0, &job);
}

OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo*, void** kernel) {
  *kernel = new Kernel{vita_ort::Api(table)};
  return nullptr;
}

OrtCustomOp make_op() {
  OrtCustomOp op = vita_ort::cpu_op_base();
  op.GetName = [](const OrtCustomOp*) { return kOpName; };
  op.GetInputType = [](const OrtCustomOp*, size_t i) { return i == 1 ? static_cast<int>(kOrtInt64) : static_cast<int>(kOrtFloat); };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 5; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  return op;
}

}  // namespace vita_msda_ort

// The operator's description, built once.
inline const OrtCustomOp* msda_op() {
  static const OrtCustomOp op = vita_msda_ort::make_op();
  return &op;
}

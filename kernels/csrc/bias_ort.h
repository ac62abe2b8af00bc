// A MatMul's bias add and what follows it, in one pass, as ONNX Runtime custom operators (CPU, float32):
//
//   vita.ops::BiasRelu      x (..., N), bias (N)                      -> max(x + bias, 0)
//   vita.ops::BiasResidual  x (..., N), bias (N), residual (same as x) -> (x + bias) + residual
//
// ONNX Runtime fuses a MatMul's bias into Gemm only for 2-D inputs, so the detector's token linears (3-D)
// run MatMul, then an Add over the output, then a Relu or a residual Add over it again: two passes over a
// (5040, 1024) output where one does. runtime/backends/onnxruntime_fusions.py puts these operators in place
// of those pairs. The sums are the pairs' own, in their order (float32, no fused
// multiply-add), so outputs are equal bit for bit. The rows are split over ONNX Runtime's intra-op threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "ort_api_min.h"

namespace vita_bias_ort {

enum class Kind { kBiasRelu, kBiasResidual };

constexpr const char* name_of(Kind k) { return k == Kind::kBiasRelu ? "BiasRelu" : "BiasResidual"; }
constexpr size_t inputs_of(Kind k) { return k == Kind::kBiasResidual ? 3 : 2; }
constexpr int64_t kRowsPerTask = 64;

struct Job {
  const float* x;
  const float* bias;
  const float* residual;  // BiasResidual
  float* y;
  int64_t rows, n;
};

template <Kind K>
void task(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t first = static_cast<int64_t>(index) * kRowsPerTask, last = std::min(first + kRowsPerTask, job.rows);
  const float* __restrict b = job.bias;
  for (int64_t r = first; r < last; ++r) {
    const float* __restrict x = job.x + r * job.n;
    const float* __restrict z = job.residual == nullptr ? nullptr : job.residual + r * job.n;
    float* __restrict y = job.y + r * job.n;
    if constexpr (K == Kind::kBiasRelu) {
      for (int64_t i = 0; i < job.n; ++i) y[i] = std::max(x[i] + b[i], 0.0f);
    } else {
      for (int64_t i = 0; i < job.n; ++i) y[i] = (x[i] + b[i]) + z[i];
    }
  }
}

inline OrtStatus* fail(const vita_ort::Api& api, const char* op, const std::string& what) {
  const std::string msg = std::string(op) + ": " + what;
  return api.CreateStatus(kOrtInvalidArgument, msg.c_str());
}

template <Kind K>
OrtStatus* compute(void* op_kernel, OrtKernelContext* context) {
  const vita_ort::Api& api = *static_cast<vita_ort::Api*>(op_kernel);
  const char* name = name_of(K);
  constexpr size_t count = inputs_of(K);
  const OrtValue* in[count] = {};
  std::vector<int64_t> dims[count];
  for (size_t i = 0; i < count; ++i) {
    if (OrtStatus* s = api.KernelContext_GetInput(context, i, &in[i])) return s;
    int type = 0;
    if (OrtStatus* s = vita_ort::describe(api, in[i], &type, &dims[i])) return s;
    if (type != kOrtFloat) return fail(api, name, "inputs must be float32");
  }
  const int64_t n = dims[0].empty() ? 1 : dims[0].back();
  bool residual_fits = true;
  const float* third = nullptr;
  if constexpr (K == Kind::kBiasResidual) residual_fits = dims[2] == dims[0];
  if (dims[0].empty() || dims[1] != std::vector<int64_t>{n} || !residual_fits) {
    return fail(api, name, "x " + vita_ort::dims_text(dims[0]) + ", bias " + vita_ort::dims_text(dims[1]) +
                               (K == Kind::kBiasResidual ? ", residual " + vita_ort::dims_text(dims[count - 1]) : std::string()) +
                               ": the bias must be the last axis of x" +
                               (K == Kind::kBiasResidual ? " and the residual x's shape" : ""));
  }
  void* raw[count];
  for (size_t i = 0; i < count; ++i) {
    if (OrtStatus* s = api.GetTensorMutableData(const_cast<OrtValue*>(in[i]), &raw[i])) return s;
  }
  OrtValue* out = nullptr;
  if (OrtStatus* s = api.KernelContext_GetOutput(context, 0, dims[0].data(), dims[0].size(), &out)) return s;
  void* y = nullptr;
  if (OrtStatus* s = api.GetTensorMutableData(out, &y)) return s;
  int64_t elements = 1;
  for (int64_t d : dims[0]) elements *= d;
  if (elements == 0) return nullptr;
  const float* first = static_cast<const float*>(raw[0]);
  const float* second = static_cast<const float*>(raw[1]);
  if constexpr (K == Kind::kBiasResidual) third = static_cast<const float*>(raw[2]);
  Job job{first, second, third, static_cast<float*>(y), elements / n, n};
  const size_t tasks = static_cast<size_t>((job.rows + kRowsPerTask - 1) / kRowsPerTask);
  return api.KernelContext_ParallelFor(context, task<K>, tasks, 0, &job);
}

template <Kind K>
OrtCustomOp make_op() {
  OrtCustomOp op = vita_ort::cpu_op_base();
  op.GetName = [](const OrtCustomOp*) { return name_of(K); };
  op.GetInputType = [](const OrtCustomOp*, size_t) { return static_cast<int>(kOrtFloat); };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return inputs_of(K); };
  op.CreateKernelV2 = [](const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo*, void** kernel) -> OrtStatus* {
    *kernel = new vita_ort::Api(table);
    return nullptr;
  };
  op.KernelComputeV2 = compute<K>;
  op.KernelDestroy = [](void* kernel) { delete static_cast<vita_ort::Api*>(kernel); };
  return op;
}

}  // namespace vita_bias_ort

// The operators' descriptions, built once.
inline const OrtCustomOp* bias_relu_op() {
  static const OrtCustomOp op = vita_bias_ort::make_op<vita_bias_ort::Kind::kBiasRelu>();
  return &op;
}

inline const OrtCustomOp* bias_residual_op() {
  static const OrtCustomOp op = vita_bias_ort::make_op<vita_bias_ort::Kind::kBiasResidual>();
  return &op;
}

// GroupNorm with its affine and an optional ReLU in one operator (ONNX Runtime, CPU, float32):
//
//   vita.ops::GroupNorm  x (N, C, ...), gamma (C), beta (C); attributes groups, epsilon, relu
//                        -> y = [relu] ((x - mean_g) / sqrt(var_g + epsilon) * gamma_c + beta_c)
//
// torch exports GroupNorm as Reshape -> InstanceNormalization -> Reshape -> Mul(gamma) -> Add(beta), and the
// pixel decoder's ReLU follows: five passes over a (256, H/4, W/4) map where this makes three (the mean, the
// variance around it, the output), and a group's slice (C/G channels) is still in the cache for the last two.
// runtime/backends/onnxruntime_fusions.py puts it in place of that chain. The statistics are summed in double
// (ONNX Runtime's own sums in float); the variance is the biased one, as GroupNorm's. The (image, group)
// pairs are split over ONNX Runtime's intra-op threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ort_api_min.h"

namespace vita_group_norm_ort {

constexpr const char* kName = "GroupNorm";

struct Kernel {
  vita_ort::Api api;
  int64_t groups;
  float epsilon;
  bool relu;
};

struct Job {
  const float* x;
  const float* gamma;
  const float* beta;
  float* y;
  int64_t channels, groups, spatial;  // spatial: elements per channel
  float epsilon;
  bool relu;
};

// Sums of one group's contiguous slice, four float partial sums per lane group folded into double every row.
inline double sum_of(const float* __restrict x, int64_t count) {
  double total = 0.0;
  constexpr int64_t kChunk = 4096;  // float partial sums stay exact enough over a few thousand terms
  for (int64_t start = 0; start < count; start += kChunk) {
    const int64_t end = std::min(start + kChunk, count);
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      for (int k = 0; k < 8; ++k) part[k] += x[i + k];
    }
    double chunk = 0.0;
    for (int k = 0; k < 8; ++k) chunk += part[k];
    for (; i < end; ++i) chunk += x[i];
    total += chunk;
  }
  return total;
}

inline double squared_deviation_of(const float* __restrict x, int64_t count, float mean) {
  double total = 0.0;
  constexpr int64_t kChunk = 4096;
  for (int64_t start = 0; start < count; start += kChunk) {
    const int64_t end = std::min(start + kChunk, count);
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      for (int k = 0; k < 8; ++k) {
        const float d = x[i + k] - mean;
        part[k] += d * d;
      }
    }
    double chunk = 0.0;
    for (int k = 0; k < 8; ++k) chunk += part[k];
    for (; i < end; ++i) {
      const double d = static_cast<double>(x[i]) - mean;
      chunk += d * d;
    }
    total += chunk;
  }
  return total;
}

inline void task(void* data, size_t index) {
  const Job& job = *static_cast<const Job*>(data);
  const int64_t per_group = job.channels / job.groups;
  const int64_t image = static_cast<int64_t>(index) / job.groups, group = static_cast<int64_t>(index) % job.groups;
  const int64_t first_channel = group * per_group;
  const int64_t offset = (image * job.channels + first_channel) * job.spatial;
  const int64_t count = per_group * job.spatial;
  const float* __restrict x = job.x + offset;
  float* __restrict y = job.y + offset;
  if (count == 0) return;
  const double mean = sum_of(x, count) / static_cast<double>(count);
  const double var = squared_deviation_of(x, count, static_cast<float>(mean)) / static_cast<double>(count);
  const double inv_std = 1.0 / std::sqrt(var + static_cast<double>(job.epsilon));
  const float floor = job.relu ? 0.0f : -INFINITY;
  for (int64_t c = 0; c < per_group; ++c) {
    const double scale = inv_std * job.gamma[first_channel + c];
    const float a = static_cast<float>(scale);
    const float b = static_cast<float>(job.beta[first_channel + c] - mean * scale);
    const float* __restrict xc = x + c * job.spatial;
    float* __restrict yc = y + c * job.spatial;
    for (int64_t i = 0; i < job.spatial; ++i) yc[i] = std::max(xc[i] * a + b, floor);
  }
}

inline OrtStatus* fail(const vita_ort::Api& api, const std::string& what) {
  const std::string msg = std::string(kName) + ": " + what;
  return api.CreateStatus(kOrtInvalidArgument, msg.c_str());
}

inline OrtStatus* compute(void* op_kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(op_kernel);
  const vita_ort::Api& api = k.api;
  const OrtValue* in[3] = {};
  std::vector<int64_t> dims[3];
  for (size_t i = 0; i < 3; ++i) {
    if (OrtStatus* s = api.KernelContext_GetInput(context, i, &in[i])) return s;
    int type = 0;
    if (OrtStatus* s = vita_ort::describe(api, in[i], &type, &dims[i])) return s;
    if (type != kOrtFloat) return fail(api, "inputs must be float32");
  }
  const std::vector<int64_t>& xd = dims[0];
  if (xd.size() < 2 || xd[1] % k.groups != 0 || dims[1] != std::vector<int64_t>{xd[1]} ||
      dims[2] != std::vector<int64_t>{xd[1]}) {
    return fail(api, "x " + vita_ort::dims_text(xd) + ", gamma " + vita_ort::dims_text(dims[1]) + ", beta " +
                         vita_ort::dims_text(dims[2]) + ": x must be (N, C, ...) with C a multiple of " +
                         std::to_string(k.groups) + " groups, gamma and beta (C)");
  }
  void* raw[3];
  for (size_t i = 0; i < 3; ++i) {
    if (OrtStatus* s = api.GetTensorMutableData(const_cast<OrtValue*>(in[i]), &raw[i])) return s;
  }
  OrtValue* out = nullptr;
  if (OrtStatus* s = api.KernelContext_GetOutput(context, 0, xd.data(), xd.size(), &out)) return s;
  void* y = nullptr;
  if (OrtStatus* s = api.GetTensorMutableData(out, &y)) return s;
  int64_t spatial = 1;
  for (size_t i = 2; i < xd.size(); ++i) spatial *= xd[i];
  if (xd[0] == 0 || xd[1] == 0) return nullptr;
  Job job{static_cast<const float*>(raw[0]), static_cast<const float*>(raw[1]), static_cast<const float*>(raw[2]),
          static_cast<float*>(y), xd[1], k.groups, spatial, k.epsilon, k.relu};
  return api.KernelContext_ParallelFor(context, task, static_cast<size_t>(xd[0] * k.groups), 0, &job);
}

inline OrtStatus* create_kernel(const OrtCustomOp*, const OrtApi* table, const OrtKernelInfo* info, void** kernel) {
  const vita_ort::Api api(table);
  int64_t groups = 0, relu = 0;
  float epsilon = 0.0f;
  if (OrtStatus* s = api.KernelInfoGetAttribute_int64(info, "groups", &groups)) return s;
  if (OrtStatus* s = api.KernelInfoGetAttribute_float(info, "epsilon", &epsilon)) return s;
  if (OrtStatus* s = api.KernelInfoGetAttribute_int64(info, "relu", &relu)) return s;
  if (groups < 1) return fail(api, "groups must be at least 1, got " + std::to_string(groups));
  *kernel = new Kernel{api, groups, epsilon, relu != 0};
  return nullptr;
}

inline OrtCustomOp make_op() {
  OrtCustomOp op = vita_ort::cpu_op_base();
  op.GetName = [](const OrtCustomOp*) { return kName; };
  op.GetInputType = [](const OrtCustomOp*, size_t) { return static_cast<int>(kOrtFloat); };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  return op;
}

}  // namespace vita_group_norm_ort

// The operator's description, built once.
inline const OrtCustomOp* group_norm_op() {
  static const OrtCustomOp op = vita_group_norm_ort::make_op();
  return &op;
}

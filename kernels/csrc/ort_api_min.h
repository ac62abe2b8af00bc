// The few parts of ONNX Runtime's C API that a CPU custom-operator library needs, declared here because the
// onnxruntime wheel ships no headers. The C API is an ABI-stable table of function pointers (OrtApi) that
// only grows at its end; a library asks for a table version and may use every entry up to it. We ask for
// version 17 (onnxruntime 1.17, the first with KernelContext_ParallelFor) and call entries by their position
// in the table, as listed in onnxruntime_c_api.h (include/onnxruntime/core/session/).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

extern "C" {

struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelContext;
struct OrtKernelInfo;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;
struct OrtApi;  // opaque here: read through vita_ort::Api below

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// ONNXTensorElementDataType and OrtErrorCode values used here
enum : int { kOrtFloat = 1, kOrtInt32 = 6, kOrtInt64 = 7 };
enum : int { kOrtOk = 0, kOrtFail = 1, kOrtInvalidArgument = 2 };

// The custom-operator description ONNX Runtime reads, in its declared order. Entries past those that
// ``version`` covers are not read; every entry up to version 17 is set by the library.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  int (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  int (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* op_kernel);
  int (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);   // 0: required
  int (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);  // 0: required
  int (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);       // 0: the provider's default (CPU)
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
};

}  // extern "C"

namespace vita_ort {

constexpr uint32_t kApiVersion = 17;

// Typed calls into the OrtApi table by position (the table is nothing but function pointers).
class Api {
 public:
  explicit Api(const OrtApi* table) : t_(reinterpret_cast<void* const*>(table)) {}

  OrtStatus* CreateStatus(int code, const char* msg) const {
    return fn<OrtStatus* (*)(int, const char*)>(0)(code, msg);
  }
  OrtStatus* CreateCustomOpDomain(const char* domain, OrtCustomOpDomain** out) const {
    return fn<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(26)(domain, out);
  }
  OrtStatus* CustomOpDomain_Add(OrtCustomOpDomain* domain, const OrtCustomOp* op) const {
    return fn<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(27)(domain, op);
  }
  OrtStatus* AddCustomOpDomain(OrtSessionOptions* options, OrtCustomOpDomain* domain) const {
    return fn<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(28)(options, domain);
  }
  OrtStatus* GetTensorMutableData(OrtValue* value, void** out) const {
    return fn<OrtStatus* (*)(OrtValue*, void**)>(51)(value, out);
  }
  OrtStatus* GetTensorElementType(const OrtTensorTypeAndShapeInfo* info, int* out) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(60)(info, out);
  }
  OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* info, size_t* out) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(61)(info, out);
  }
  OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t count) const {
    return fn<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(62)(info, dims, count);
  }
  OrtStatus* GetTensorTypeAndShape(const OrtValue* value, OrtTensorTypeAndShapeInfo** out) const {
    return fn<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(65)(value, out);
  }
  OrtStatus* KernelInfoGetAttribute_float(const OrtKernelInfo* info, const char* name, float* out) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(85)(info, name, out);
  }
  OrtStatus* KernelInfoGetAttribute_int64(const OrtKernelInfo* info, const char* name, int64_t* out) const {
    return fn<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(86)(info, name, out);
  }
  OrtStatus* KernelContext_GetInputCount(const OrtKernelContext* context, size_t* out) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(88)(context, out);
  }
  OrtStatus* KernelContext_GetInput(const OrtKernelContext* context, size_t index, const OrtValue** out) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(90)(context, index, out);
  }
  OrtStatus* KernelContext_GetOutput(OrtKernelContext* context, size_t index, const int64_t* dims, size_t count,
                                     OrtValue** out) const {
    return fn<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(91)(
        context, index, dims, count, out);
  }
  void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* info) const {
    fn<void (*)(OrtTensorTypeAndShapeInfo*)>(99)(info);
  }
  OrtStatus* KernelContext_ParallelFor(const OrtKernelContext* context, void (*body)(void*, size_t), size_t total,
                                       size_t num_batch, void* user_data) const {
    return fn<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(274)(
        context, body, total, num_batch, user_data);
  }

 private:
  template <typename F>
  F fn(size_t position) const { return reinterpret_cast<F>(t_[position]); }
  void* const* t_;
};

// One input's element type and dimensions (an error status when it cannot be read).
// The parts of an operator description every operator here shares: CPU provider, float32 output(s), every
// input and output required, the V2 entry points (returning a status) for ONNX Runtime >= 1.16, all opset
// versions. The caller sets the name, input types and counts, and the kernel's create, compute and destroy.
inline OrtCustomOp cpu_op_base() {
  OrtCustomOp op{};
  op.version = kApiVersion;
  op.CreateKernel = nullptr;
  op.KernelCompute = nullptr;
  op.GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CPUExecutionProvider"; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return static_cast<int>(kOrtFloat); };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return 0; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return 0; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.InferOutputShapeFn = nullptr;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 2147483647; };
  return op;
}

inline OrtStatus* describe(const Api& api, const OrtValue* value, int* type, std::vector<int64_t>* dims) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = api.GetTensorTypeAndShape(value, &info)) return s;
  size_t count = 0;
  OrtStatus* s = api.GetTensorElementType(info, type);
  if (!s) s = api.GetDimensionsCount(info, &count);
  if (!s) {
    dims->assign(count, 0);
    s = api.GetDimensions(info, dims->data(), count);
  }
  api.ReleaseTensorTypeAndShapeInfo(info);
  return s;
}

inline std::string dims_text(const std::vector<int64_t>& dims) {
  std::string out = "(";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + ")";
}

}  // namespace vita_ort

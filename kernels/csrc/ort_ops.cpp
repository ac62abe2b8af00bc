// The compiled ONNX Runtime operators of domain vita.ops (CPU, float32), one library:
//   MSDeformAttn                   multi-scale deformable attention (ms_deform_attn_ort.h)
//   WinogradInput, WinogradOutput  the transforms around a Winograd 3x3 convolution's MatMul (winograd_ort.h)
//   BiasRelu, BiasResidual         a MatMul's bias add with the Relu or residual add after it (bias_ort.h)
//   GroupNorm                      GroupNorm with its affine and an optional ReLU (group_norm_ort.h)
// Loaded by ``SessionOptions.register_custom_ops_library``, which calls RegisterCustomOps.
#include "bias_ort.h"
#include "group_norm_ort.h"
#include "ms_deform_attn_ort.h"
#include "ort_api_min.h"
#include "winograd_ort.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* base) {
  const OrtApi* table = base->GetApi(vita_ort::kApiVersion);
  if (table == nullptr) return nullptr;  // an onnxruntime older than 1.17: nothing registered, the caller checks
  const vita_ort::Api api(table);
  OrtCustomOpDomain* domain = nullptr;  // lives as long as the process: sessions keep pointing at it
  if (OrtStatus* s = api.CreateCustomOpDomain("vita.ops", &domain)) return s;
  for (const OrtCustomOp* op : {msda_op(), winograd_input_op(), winograd_output_op(), bias_relu_op(), bias_residual_op(),
                                group_norm_op()}) {
    if (OrtStatus* s = api.CustomOpDomain_Add(domain, op)) return s;
  }
  return api.AddCustomOpDomain(options, domain);
}

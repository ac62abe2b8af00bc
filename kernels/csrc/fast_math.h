// Small float32 math shared by the compiled CPU kernels (deformable attention, final masks). Torch-free.
#pragma once

#include <cmath>
#include <cstdint>

namespace vita_math {

// exp for x <= 0 (a softmax after subtracting the maximum, a sigmoid of -|x|), branch-free so that the
// compiler vectorises the loop around it: Cody-Waite reduction by ln 2 and Cephes' degree-6 polynomial,
// within 2 ulp of expf
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

}  // namespace vita_math

// Scalar arithmetic of memvp_memory shared by the CPU and CUDA kernels: the SiLU activation and
// its derivative (dropout is dropout_math.h), and the fp16 range guard of the CUDA kernels.
#pragma once

#include <cmath>

#include "dropout_math.h"
#include "host_device.h"

namespace vlfast {
namespace memvp_math {

VLFAST_HOST_DEVICE float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

VLFAST_HOST_DEVICE float silu(float a) { return a * sigmoid(a); }

// d silu(a) / da = s (1 + a (1 - s)), s = sigmoid(a).
VLFAST_HOST_DEVICE float silu_grad(float a) {
  const float s = sigmoid(a);
  return s * (1.0f + a * (1.0f - s));
}

// A power of 2, at most 1, that brings `magnitude` below 2^15 so that values up to it round to fp16
// (max 65504) without overflow: the CUDA kernels scale a row of the activation (or of its gradient)
// by it before the fp16 tensor-core product and the product by its inverse. 1 for ordinary
// magnitudes, whose fp16 rounding stays as it was. The Triton kernels use the same rule.
VLFAST_HOST_DEVICE float fp16_safe_factor(float magnitude) {
  if (!(magnitude >= 32768.0f)) return 1.0f;
  return ldexpf(1.0f, 14 - ilogbf(magnitude));  // magnitude < 2^(ilogb + 1)
}

}  // namespace memvp_math
}  // namespace vlfast

// Scalar arithmetic of memvp_memory shared by the CPU and CUDA kernels: the SiLU activation and
// its derivative (dropout is dropout_math.h).
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

}  // namespace memvp_math
}  // namespace vlfast

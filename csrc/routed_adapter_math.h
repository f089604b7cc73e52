// Scalar arithmetic of routed_adapter shared by the CPU and CUDA kernels: the router's tempered
// softmax (dropout is dropout_math.h).
#pragma once

#include <cmath>

#include "dropout_math.h"
#include "host_device.h"

namespace vlfast {
namespace routed_adapter_math {

// weights[e] = softmax(logits / temperature)[e], in place over n experts.
VLFAST_HOST_DEVICE void tempered_softmax(float* logits, int n, float temperature) {
  float top = -INFINITY;
  for (int e = 0; e < n; ++e) top = fmaxf(top, logits[e] / temperature);
  float total = 0.0f;
  for (int e = 0; e < n; ++e) total += (logits[e] = expf(logits[e] / temperature - top));
  for (int e = 0; e < n; ++e) logits[e] /= total;
}

}  // namespace routed_adapter_math
}  // namespace vlfast

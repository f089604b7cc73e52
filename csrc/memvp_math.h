// Scalar arithmetic of memvp_memory shared by the CPU and CUDA kernels: the SiLU activation and
// its derivative, and the counter-based dropout hash that every backend (Triton and PyTorch too)
// draws, so a mask is reproducible from its seed and identical across backends.
#pragma once

#include <cmath>
#include <cstdint>

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

// An element is dropped when the top 24 bits of its hash fall below floor(p * 2^24).
VLFAST_HOST_DEVICE uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

// murmur3's 32-bit finaliser of (offset * golden ratio + seed).
VLFAST_HOST_DEVICE uint32_t dropout_hash(uint32_t seed, uint32_t offset) {
  uint32_t x = offset * 0x9E3779B1u + seed;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The factor an element of the (B, L, M) activation is multiplied by: 0 when dropped, 1/(1-p)
// when kept. offset = (b * L + l) * M + m, taken mod 2^32.
VLFAST_HOST_DEVICE float dropout_factor(uint32_t seed, uint32_t offset, uint32_t threshold, float keep_scale) {
  return (dropout_hash(seed, offset) >> 8) >= threshold ? keep_scale : 0.0f;
}

}  // namespace memvp_math
}  // namespace vlfast

// The counter-based dropout every backend draws (Triton: kernels/utils.py, PyTorch:
// vlfast/ops/reference.py): an element's fate is a hash of (seed, its flat index), so the mask is
// reproducible from the seed, regenerated in backward, and identical across backends.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace vlfast {
namespace dropout_math {

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

// The factor an element is multiplied by: 0 when dropped, 1/(1-p) when kept. offset is the
// element's row-major index in the dropped tensor, taken mod 2^32.
VLFAST_HOST_DEVICE float dropout_factor(uint32_t seed, uint32_t offset, uint32_t threshold, float keep_scale) {
  return (dropout_hash(seed, offset) >> 8) >= threshold ? keep_scale : 0.0f;
}

}  // namespace dropout_math
}  // namespace vlfast

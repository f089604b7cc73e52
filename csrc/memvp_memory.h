// Declarations of the memvp_memory kernels behind the vlfast_C::memvp_memory_* ops.
// x (B, L, D), z (B, M, D), key_pos and value_pos (M, D), all contiguous and of one dtype. The
// forward returns (out, pre) with pre = x (z + key_pos)^T (B, L, M) in fp32, which the backward takes.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace vlfast {

inline void check_memvp_memory(const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos,
                               const at::Tensor& value_pos, const at::Tensor* dout = nullptr,
                               const at::Tensor* pre = nullptr) {
  constexpr const char* op = "vlfast_C::memvp_memory";
  check_floating(op, x);
  check_arg(op, "x", x, {-1, -1, -1}, x);
  check_arg(op, "z", z, {x.size(0), -1, x.size(2)}, x);
  check_arg(op, "key_pos", key_pos, {z.size(1), x.size(2)}, x);
  check_arg(op, "value_pos", value_pos, {z.size(1), x.size(2)}, x);
  if (dout != nullptr) check_arg(op, "dout", *dout, {x.size(0), x.size(1), x.size(2)}, x);
  if (pre != nullptr) check_arg(op, "pre", *pre, {x.size(0), x.size(1), z.size(1)}, x, at::kFloat);
}

// Returns (out, pre).
std::tuple<at::Tensor, at::Tensor> memvp_memory_forward_cpu(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos, const at::Tensor& value_pos, double scale,
    double dropout_p, int64_t seed);

// Returns (dx, dz, dkey_pos, dvalue_pos).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memvp_memory_backward_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos,
    const at::Tensor& value_pos, const at::Tensor& pre, double scale, double dropout_p, int64_t seed);

#ifdef VLFAST_WITH_CUDA
// Returns (out, pre).
std::tuple<at::Tensor, at::Tensor> memvp_memory_forward_cuda(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos, const at::Tensor& value_pos, double scale,
    double dropout_p, int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memvp_memory_backward_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos,
    const at::Tensor& value_pos, const at::Tensor& pre, double scale, double dropout_p, int64_t seed);
#endif

}  // namespace vlfast

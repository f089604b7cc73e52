// Declarations of the cross-attention kernels behind the vlfast_C::cross_attention_* ops.
// Inputs are contiguous (B, H, L, D); kv_mask is an optional contiguous (B, Lk) bool tensor.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace vlfast {

inline void check_cross_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& kv_mask) {
  constexpr const char* op = "vlfast_C::cross_attention";
  check_floating(op, q);
  check_arg(op, "q", q, {-1, -1, -1, -1}, q);
  check_arg(op, "k", k, {q.size(0), q.size(1), -1, q.size(3)}, q);
  check_arg(op, "v", v, {q.size(0), q.size(1), k.size(2), q.size(3)}, q);
  if (kv_mask.has_value()) check_arg(op, "kv_mask", *kv_mask, {q.size(0), k.size(2)}, q, at::kBool);
}

inline void check_cross_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const std::optional<at::Tensor>& kv_mask,
                                           const at::Tensor& out, const at::Tensor& lse) {
  constexpr const char* op = "vlfast_C::cross_attention_backward";
  check_cross_attention(q, k, v, kv_mask);
  check_arg(op, "dout", dout, {q.size(0), q.size(1), q.size(2), q.size(3)}, q);
  check_arg(op, "out", out, {q.size(0), q.size(1), q.size(2), q.size(3)}, q);
  check_arg(op, "lse", lse, {q.size(0), q.size(1), q.size(2)}, q, at::kFloat);
}

// Returns (out (B,H,Lq,D) in q's dtype, lse (B,H,Lq) fp32).
std::tuple<at::Tensor, at::Tensor> cross_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_mask, double scale);

// Returns (dq, dk, dv) in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_mask, const at::Tensor& out, const at::Tensor& lse,
    double scale);

#ifdef VLFAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> cross_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_mask, double scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_mask, const at::Tensor& out, const at::Tensor& lse,
    double scale);
#endif

}  // namespace vlfast

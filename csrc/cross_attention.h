// Declarations of the cross-attention kernels behind the vlfast_C::cross_attention_* ops.
// Inputs are contiguous (B, H, L, D); kv_mask is an optional contiguous (B, Lk) bool tensor.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace vlfast {

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

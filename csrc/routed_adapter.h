// Declarations of the routed_adapter kernels behind the vlfast_C::routed_adapter_* ops.
// x (B, L, D), router_input (B, D), router_weight (E, D), router_bias (E), down_weight (R, D),
// down_bias (R), up_weight (E, D, R), up_bias (E, D): contiguous, one dtype.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace vlfast {

// The adapter's weights against x (B, L, D): down (R, D), (R); up (E, D, R), (E, D).
inline void check_adapter_weights(const char* op, const at::Tensor& x, const at::Tensor& down_weight,
                                  const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias) {
  check_floating(op, x);
  check_arg(op, "x", x, {-1, -1, -1}, x);
  check_arg(op, "down_weight", down_weight, {-1, x.size(2)}, x);
  check_arg(op, "down_bias", down_bias, {down_weight.size(0)}, x);
  check_arg(op, "up_weight", up_weight, {-1, x.size(2), down_weight.size(0)}, x);
  check_arg(op, "up_bias", up_bias, {up_weight.size(0), x.size(2)}, x);
}

inline void check_routed_adapter(const at::Tensor& x, const at::Tensor& router_input, const at::Tensor& router_weight,
                                 const at::Tensor& router_bias, const at::Tensor& down_weight,
                                 const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias) {
  constexpr const char* op = "vlfast_C::routed_adapter";
  check_adapter_weights(op, x, down_weight, down_bias, up_weight, up_bias);
  check_arg(op, "router_input", router_input, {x.size(0), x.size(2)}, x);
  check_arg(op, "router_weight", router_weight, {up_weight.size(0), x.size(2)}, x);
  check_arg(op, "router_bias", router_bias, {up_weight.size(0)}, x);
}

inline void check_routed_adapter_backward_rows(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weights,
                                               const at::Tensor& down_weight, const at::Tensor& down_bias,
                                               const at::Tensor& up_weight, const at::Tensor& up_bias) {
  constexpr const char* op = "vlfast_C::routed_adapter_backward_rows";
  check_adapter_weights(op, x, down_weight, down_bias, up_weight, up_bias);
  check_arg(op, "dout", dout, {x.size(0), x.size(1), x.size(2)}, x);
  check_arg(op, "weights", weights, {x.size(0), up_weight.size(0)}, x, at::kFloat);
}

at::Tensor routed_adapter_forward_cpu(const at::Tensor& x, const at::Tensor& router_input,
                                      const at::Tensor& router_weight, const at::Tensor& router_bias,
                                      const at::Tensor& down_weight, const at::Tensor& down_bias,
                                      const at::Tensor& up_weight, const at::Tensor& up_bias, double temperature,
                                      double scale, double dropout_p, int64_t seed);

// The x-sized part of the backward, for routing weights (B, E) fp32: (dx, ddown_weight, ddown_bias,
// dmixed_up (B, D, R) fp32, dmixed_bias (B, D) fp32), the last two being the gradients of the
// per-sample mixed up projection sum_e w_e W_u[e] and of its bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_adapter_backward_rows_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& down_weight,
    const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias, double scale,
    double dropout_p, int64_t seed);

#ifdef VLFAST_WITH_CUDA
at::Tensor routed_adapter_forward_cuda(const at::Tensor& x, const at::Tensor& router_input,
                                       const at::Tensor& router_weight, const at::Tensor& router_bias,
                                       const at::Tensor& down_weight, const at::Tensor& down_bias,
                                       const at::Tensor& up_weight, const at::Tensor& up_bias, double temperature,
                                       double scale, double dropout_p, int64_t seed);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_adapter_backward_rows_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& down_weight,
    const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias, double scale,
    double dropout_p, int64_t seed);
#endif

}  // namespace vlfast

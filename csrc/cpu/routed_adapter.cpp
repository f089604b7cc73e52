// CPU kernels of routed_adapter: per sample the routing weights and the mixed up projection
// W_mix = sum_e w_e W_u[e] (D, R) are formed once in fp32; rows of x then run in parallel.
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/vector_ops.h"
#include "routed_adapter.h"
#include "routed_adapter_math.h"

namespace vlfast {
namespace {

struct Sizes {
  int64_t batch, rows, dim, rank, experts;
};

Sizes sizes_of(const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& up_weight) {
  return {x.size(0), x.size(1), x.size(2), down_weight.size(0), up_weight.size(0)};
}

// Dropout factors of the (B, L, R) hidden state.
struct HiddenDropout {
  uint32_t seed, threshold;
  float keep_scale;
  bool on;
  int64_t rows, rank;

  HiddenDropout(double p, int64_t seed_, const Sizes& s)
      : seed(static_cast<uint32_t>(seed_)), threshold(dropout_math::dropout_threshold(p)),
        keep_scale(static_cast<float>(1.0 / (1.0 - p))), on(p > 0.0), rows(s.rows), rank(s.rank) {}

  float factor(int64_t b, int64_t l, int64_t r) const {
    if (!on) return 1.0f;
    return dropout_math::dropout_factor(seed, static_cast<uint32_t>((b * rows + l) * rank + r), threshold,
                                        keep_scale);
  }
};

// (B, D, R) mixed up projections and (B, D) mixed biases for routing weights (B, E) fp32.
std::pair<at::Tensor, at::Tensor> mix_experts(const at::Tensor& weights, const at::Tensor& up_weight,
                                              const at::Tensor& up_bias) {
  return {at::einsum("be,edr->bdr", {weights, up_weight.to(at::kFloat)}).contiguous(),
          at::matmul(weights, up_bias.to(at::kFloat)).contiguous()};
}

}  // namespace

at::Tensor routed_adapter_forward_cpu(const at::Tensor& x_in, const at::Tensor& router_input,
                                      const at::Tensor& router_weight, const at::Tensor& router_bias,
                                      const at::Tensor& down_weight_in, const at::Tensor& down_bias_in,
                                      const at::Tensor& up_weight, const at::Tensor& up_bias, double temperature,
                                      double scale_d, double dropout_p, int64_t seed) {
  check_routed_adapter(x_in, router_input, router_weight, router_bias, down_weight_in, down_bias_in, up_weight,
                       up_bias);
  const Sizes s = sizes_of(x_in, down_weight_in, up_weight);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor down_weight = down_weight_in.to(at::kFloat).contiguous();
  const at::Tensor down_bias = down_bias_in.to(at::kFloat).contiguous();
  // Router logits (B, E), then the tempered softmax of the shared arithmetic.
  at::Tensor weights =
      (at::matmul(router_input.to(at::kFloat), router_weight.to(at::kFloat).t()) + router_bias.to(at::kFloat))
          .contiguous();
  for (int64_t b = 0; b < s.batch; ++b) {
    routed_adapter_math::tempered_softmax(weights.data_ptr<float>() + b * s.experts, (int)s.experts,
                                          (float)temperature);
  }
  const auto [mixed_up, mixed_bias] = mix_experts(weights, up_weight, up_bias);
  const HiddenDropout dropout(dropout_p, seed, s);
  const float scale = static_cast<float>(scale_d);
  at::Tensor out = at::empty_like(x);
  const int64_t D = s.dim, R = s.rank;
  at::parallel_for(0, s.batch * s.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden(R);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.rows, l = row % s.rows;
      const float* xr = x.data_ptr<float>() + row * D;
      for (int64_t r = 0; r < R; ++r) {
        hidden[r] = (dot(xr, down_weight.data_ptr<float>() + r * D, D) + down_bias.data_ptr<float>()[r]) *
                    dropout.factor(b, l, r);
      }
      const float* mix = mixed_up.data_ptr<float>() + b * D * R;
      const float* bias = mixed_bias.data_ptr<float>() + b * D;
      float* o = out.data_ptr<float>() + row * D;
      for (int64_t d = 0; d < D; ++d) o[d] = xr[d] + scale * (dot(mix + d * R, hidden.data(), R) + bias[d]);
    }
  });
  return out.to(x_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_adapter_backward_rows_cpu(
    const at::Tensor& dout_in, const at::Tensor& x_in, const at::Tensor& weights, const at::Tensor& down_weight_in,
    const at::Tensor& down_bias_in, const at::Tensor& up_weight, const at::Tensor& up_bias, double scale_d,
    double dropout_p, int64_t seed) {
  check_routed_adapter_backward_rows(dout_in, x_in, weights, down_weight_in, down_bias_in, up_weight, up_bias);
  const Sizes s = sizes_of(x_in, down_weight_in, up_weight);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor dout = dout_in.to(at::kFloat).contiguous();
  const at::Tensor down_weight = down_weight_in.to(at::kFloat).contiguous();
  const at::Tensor down_bias = down_bias_in.to(at::kFloat).contiguous();
  const auto [mixed_up, mixed_bias] = mix_experts(weights.to(at::kFloat).contiguous(), up_weight, up_bias);
  const HiddenDropout dropout(dropout_p, seed, s);
  const float scale = static_cast<float>(scale_d);
  const int64_t D = s.dim, R = s.rank, rows = s.batch * s.rows;
  // Pass 1, per row: the dropped hidden state, dL/d(x W_d^T + b_d), and dx.
  at::Tensor hidden = at::empty({rows, R}, x.options()), dhidden = at::empty_like(hidden);
  at::Tensor dx = at::empty_like(x);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / s.rows, l = row % s.rows;
      const float* xr = x.data_ptr<float>() + row * D;
      const float* dor = dout.data_ptr<float>() + row * D;
      const float* mix = mixed_up.data_ptr<float>() + b * D * R;
      float* h = hidden.data_ptr<float>() + row * R;
      float* dh = dhidden.data_ptr<float>() + row * R;
      for (int64_t r = 0; r < R; ++r) {
        const float keep = dropout.factor(b, l, r);
        h[r] = (dot(xr, down_weight.data_ptr<float>() + r * D, D) + down_bias.data_ptr<float>()[r]) * keep;
        dh[r] = 0.0f;
      }
      for (int64_t d = 0; d < D; ++d) axpy(scale * dor[d], mix + d * R, dh, R);  // dh = scale dout W_mix
      for (int64_t r = 0; r < R; ++r) dh[r] *= dropout.factor(b, l, r);
      float* dxr = dx.data_ptr<float>() + row * D;
      for (int64_t d = 0; d < D; ++d) dxr[d] = dor[d];
      for (int64_t r = 0; r < R; ++r) axpy(dh[r], down_weight.data_ptr<float>() + r * D, dxr, D);
    }
  });
  // Pass 2, reductions over rows: dW_d = dh^T x; per sample dW_mix = scale dout^T h, db_mix = scale sum dout.
  const at::Tensor hidden3 = hidden.view({s.batch, s.rows, R}), dout3 = dout.view({s.batch, s.rows, D});
  const at::Tensor ddown_weight = at::matmul(dhidden.t(), x.view({rows, D}));
  const at::Tensor dmixed_up = at::matmul(dout3.transpose(1, 2), hidden3) * scale;
  const at::Tensor dmixed_bias = dout3.sum(1) * scale;
  return {dx.to(x_in.scalar_type()), ddown_weight.to(down_weight_in.scalar_type()),
          dhidden.sum(0).to(down_bias_in.scalar_type()), dmixed_up.contiguous(), dmixed_bias.contiguous()};
}

}  // namespace vlfast

// CPU kernels of cross-attention: one (batch, head) per task, fp32 arithmetic whatever the input
// dtype, key blocks processed with the same online-softmax steps as the CUDA kernel.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/vector_ops.h"
#include "cross_attention.h"
#include "cross_attention_math.h"

namespace vlfast {
namespace {

namespace math = attention_math;
constexpr int64_t kKeyBlock = 64;

struct Shape {
  int64_t batch, heads, q_len, kv_len, head_dim;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k) {
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

// Per-batch visibility of each key (all true without a mask).
std::vector<uint8_t> key_visibility(const std::optional<at::Tensor>& kv_mask, const Shape& s) {
  std::vector<uint8_t> visible(s.batch * s.kv_len, 1);
  if (kv_mask.has_value()) {
    const bool* m = kv_mask->data_ptr<bool>();
    std::copy(m, m + s.batch * s.kv_len, visible.begin());
  }
  return visible;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_forward_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& kv_mask, double scale_d) {
  check_cross_attention(q_in, k_in, v_in, kv_mask);
  const Shape s = shape_of(q_in, k_in);
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor k = k_in.to(at::kFloat).contiguous();
  const at::Tensor v = v_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({s.batch, s.heads, s.q_len, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads, s.q_len}, q.options());
  const std::vector<uint8_t> visible = key_visibility(kv_mask, s);
  const float scale = static_cast<float>(scale_d);
  const int64_t D = s.head_dim;

  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(kKeyBlock);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.heads;
      const float* kb = k.data_ptr<float>() + bh * s.kv_len * D;
      const float* vb = v.data_ptr<float>() + bh * s.kv_len * D;
      const uint8_t* vis = visible.data() + b * s.kv_len;
      for (int64_t i = 0; i < s.q_len; ++i) {
        const float* qi = q.data_ptr<float>() + (bh * s.q_len + i) * D;
        float* oi = out.data_ptr<float>() + (bh * s.q_len + i) * D;
        std::fill(oi, oi + D, 0.0f);
        float row_max = -INFINITY, row_sum = 0.0f;
        for (int64_t j0 = 0; j0 < s.kv_len; j0 += kKeyBlock) {
          const int64_t n = std::min(kKeyBlock, s.kv_len - j0);
          float block_max = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            logits[j] = math::masked_logit(dot(qi, kb + (j0 + j) * D, D), scale, vis[j0 + j]);
            block_max = std::max(block_max, logits[j]);
          }
          const float new_max = std::max(row_max, block_max);
          const float alpha = math::rescale_factor(row_max, new_max);
          row_sum *= alpha;
          for (int64_t d = 0; d < D; ++d) oi[d] *= alpha;
          for (int64_t j = 0; j < n; ++j) {
            const float p = math::unnormalized_prob(logits[j], new_max);
            row_sum += p;
            if (p != 0.0f) axpy(p, vb + (j0 + j) * D, oi, D);
          }
          row_max = new_max;
        }
        const float inv = math::output_normalizer(row_sum);
        for (int64_t d = 0; d < D; ++d) oi[d] *= inv;
        lse.data_ptr<float>()[bh * s.q_len + i] = math::log_sum_exp(row_max, row_sum);
      }
    }
  });
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const std::optional<at::Tensor>& kv_mask, const at::Tensor& out_in,
    const at::Tensor& lse_in, double scale_d) {
  check_cross_attention_backward(dout_in, q_in, k_in, v_in, kv_mask, out_in, lse_in);
  const Shape s = shape_of(q_in, k_in);
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor k = k_in.to(at::kFloat).contiguous();
  const at::Tensor v = v_in.to(at::kFloat).contiguous();
  const at::Tensor dout = dout_in.to(at::kFloat).contiguous();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  // delta_i = rowsum(dO_i * O_i): the softmax backward's per-row correction.
  const at::Tensor delta = (dout * out_in.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const std::vector<uint8_t> visible = key_visibility(kv_mask, s);
  const float scale = static_cast<float>(scale_d);
  const int64_t D = s.head_dim;

  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.heads;
      const int64_t kv_offset = bh * s.kv_len * D;
      const uint8_t* vis = visible.data() + b * s.kv_len;
      for (int64_t i = 0; i < s.q_len; ++i) {
        const int64_t row = bh * s.q_len + i;
        const float* qi = q.data_ptr<float>() + row * D;
        const float* doi = dout.data_ptr<float>() + row * D;
        float* dqi = dq.data_ptr<float>() + row * D;
        const float lse_i = lse.data_ptr<float>()[row];
        const float delta_i = delta.data_ptr<float>()[row];
        for (int64_t j = 0; j < s.kv_len; ++j) {
          const float* kj = k.data_ptr<float>() + kv_offset + j * D;
          const float* vj = v.data_ptr<float>() + kv_offset + j * D;
          const float logit = math::masked_logit(dot(qi, kj, D), scale, vis[j]);
          const float p = math::prob_from_lse(logit, lse_i);
          if (p == 0.0f) continue;
          axpy(p, doi, dv.data_ptr<float>() + kv_offset + j * D, D);
          const float ds = math::score_grad(p, dot(doi, vj, D), delta_i, scale);
          axpy(ds, kj, dqi, D);
          axpy(ds, qi, dk.data_ptr<float>() + kv_offset + j * D, D);
        }
      }
    }
  });
  const auto dtype = q_in.scalar_type();
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace vlfast

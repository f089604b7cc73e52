// CPU kernels of memvp_memory: out = scale * dropout(silu(x K^T)) V with K = z + key_pos and
// V = z + value_pos. Per sample, K and V are formed once in fp32; rows of x run in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/vector_ops.h"
#include "memvp_math.h"
#include "memvp_memory.h"

namespace vlfast {
namespace {

namespace math = memvp_math;

struct Problem {
  int64_t batch, rows, memory, dim;
  float scale, keep_scale;
  uint32_t threshold, seed;
  bool dropout;

  Problem(const at::Tensor& x, const at::Tensor& z, double scale_, double p, int64_t seed_)
      : batch(x.size(0)), rows(x.size(1)), memory(z.size(1)), dim(x.size(2)),
        scale(static_cast<float>(scale_)), keep_scale(static_cast<float>(1.0 / (1.0 - p))),
        threshold(dropout_math::dropout_threshold(p)), seed(static_cast<uint32_t>(seed_)), dropout(p > 0.0) {}

  // Dropout factor of activation element (b, l, m).
  float keep(int64_t b, int64_t l, int64_t m) const {
    if (!dropout) return 1.0f;
    return dropout_math::dropout_factor(seed, static_cast<uint32_t>((b * rows + l) * memory + m), threshold, keep_scale);
  }
};

// (B, M, D) fp32 memory rows z + pos.
at::Tensor with_position(const at::Tensor& z, const at::Tensor& pos) {
  return (z.to(at::kFloat) + pos.to(at::kFloat).unsqueeze(0)).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> memvp_memory_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& z, const at::Tensor& key_pos, const at::Tensor& value_pos, double scale,
    double dropout_p, int64_t seed) {
  check_memvp_memory(x_in, z, key_pos, value_pos);
  const Problem p(x_in, z, scale, dropout_p, seed);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor keys = with_position(z, key_pos), values = with_position(z, value_pos);
  at::Tensor out = at::zeros({p.batch, p.rows, p.dim}, x.options());
  at::Tensor pre = at::empty({p.batch, p.rows, p.memory}, x.options());
  const int64_t D = p.dim, M = p.memory;
  at::parallel_for(0, p.batch * p.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.rows, l = row % p.rows;
      const float* xr = x.data_ptr<float>() + row * D;
      float* o = out.data_ptr<float>() + row * D;
      for (int64_t m = 0; m < M; ++m) {
        const float a = dot(xr, keys.data_ptr<float>() + (b * M + m) * D, D);
        pre.data_ptr<float>()[row * M + m] = a;
        const float h = math::silu(a) * p.keep(b, l, m);
        if (h != 0.0f) axpy(p.scale * h, values.data_ptr<float>() + (b * M + m) * D, o, D);
      }
    }
  });
  return {out.to(x_in.scalar_type()), pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memvp_memory_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& x_in, const at::Tensor& z, const at::Tensor& key_pos,
    const at::Tensor& value_pos, const at::Tensor& saved_pre, double scale, double dropout_p, int64_t seed) {
  check_memvp_memory(x_in, z, key_pos, value_pos, &dout_in, &saved_pre);
  const Problem p(x_in, z, scale, dropout_p, seed);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor dout = dout_in.to(at::kFloat).contiguous();
  const at::Tensor keys = with_position(z, key_pos), values = with_position(z, value_pos);
  const int64_t D = p.dim, M = p.memory, L = p.rows;
  // Pass 1, per row: from the forward's pre-activation, the dropped activation, the gradient of the
  // pre-activation, and dx.
  at::Tensor hidden = at::empty({p.batch, L, M}, x.options()), dpre = at::empty_like(hidden);
  at::Tensor dx = at::zeros_like(x);
  at::parallel_for(0, p.batch * L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / L, l = row % L;
      const float* dor = dout.data_ptr<float>() + row * D;
      for (int64_t m = 0; m < M; ++m) {
        const float* key = keys.data_ptr<float>() + (b * M + m) * D;
        const float pre = saved_pre.data_ptr<float>()[row * M + m];
        const float keep = p.keep(b, l, m);
        const float dhidden = p.scale * dot(dor, values.data_ptr<float>() + (b * M + m) * D, D);
        const float g = dhidden * keep * math::silu_grad(pre);
        hidden.data_ptr<float>()[row * M + m] = math::silu(pre) * keep;
        dpre.data_ptr<float>()[row * M + m] = g;
        if (g != 0.0f) axpy(g, key, dx.data_ptr<float>() + row * D, D);
      }
    }
  });
  // Pass 2, per memory row: dK = dpre^T x and dV = scale * hidden^T dout, summed over rows.
  at::Tensor dkeys = at::zeros({p.batch, M, D}, x.options()), dvalues = at::zeros_like(dkeys);
  at::parallel_for(0, p.batch * M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / M, m = bm % M;
      float* dk = dkeys.data_ptr<float>() + bm * D;
      float* dv = dvalues.data_ptr<float>() + bm * D;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t row = b * L + l;
        const float g = dpre.data_ptr<float>()[row * M + m];
        const float h = hidden.data_ptr<float>()[row * M + m];
        if (g != 0.0f) axpy(g, x.data_ptr<float>() + row * D, dk, D);
        if (h != 0.0f) axpy(p.scale * h, dout.data_ptr<float>() + row * D, dv, D);
      }
    }
  });
  const auto dtype = x_in.scalar_type();
  return {dx.to(dtype), (dkeys + dvalues).to(dtype), dkeys.sum(0).to(dtype), dvalues.sum(0).to(dtype)};
}

}  // namespace vlfast

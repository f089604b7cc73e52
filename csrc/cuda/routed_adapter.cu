// CUDA kernels of routed_adapter (fp16 / bf16 on tensor cores through WMMA, fp32 accumulation).
//
// One block per (64 rows, sample), one warp per 16 rows. The block computes the sample's routing
// weights, then pass 1 accumulates h = x W_d^T over D chunks in registers (rank padded to 16s),
// adds the bias and dropout; pass 2 forms the experts' mixed up projection sum_e w_e W_u[e] chunk
// by chunk of D in shared memory and writes x + scale (h W_mix^T + b_mix). The backward's row
// kernel recomputes h, forms dL/dh = scale dout W_mix, writes the dropped h and dL/dh (fp32) and
// dx = dout + dL/dh W_d; the reductions over rows (dW_d, the mixed projection's gradients) are
// matrix products left to cuBLAS through ATen. Scalar arithmetic (tempered softmax, dropout) is
// csrc/routed_adapter_math.h, which the CPU kernel runs too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/wmma_utils.cuh"
#include "routed_adapter.h"
#include "routed_adapter_math.h"

namespace vlfast {
namespace {

using namespace nvcuda;
using namespace wmma_utils;

constexpr int kWarps = 4;
constexpr int kRows = kTile * kWarps;
constexpr int kChunk = 32;      // D columns per shared-memory chunk
constexpr int kMaxRank = 64;
constexpr int kMaxExperts = 16;

struct Dropout {
  uint32_t seed, threshold;
  float keep_scale;
  bool on;
};

Dropout make_dropout(double p, int64_t seed) {
  return {static_cast<uint32_t>(seed), dropout_math::dropout_threshold(p), static_cast<float>(1.0 / (1.0 - p)),
          p > 0.0};
}

template <typename T, int RankPad>
struct Smem {
  T x[kRows * kChunk];
  T weight[RankPad * kChunk];       // W_d chunk (RankPad, kChunk) or W_mix chunk (kChunk, RankPad)
  T hidden[kRows * RankPad];        // h (or dL/dh) in T for the second product
  float staging[kRows * RankPad];   // fragments to rows; later (kWarps, 16, 16) output tiles
  float mixed_bias[kChunk];
  float weights[kMaxExperts];
};

// h (16 rows x RankPad, fp32 fragments) = rows (len, dim) of src, through x chunks, times W^T.
template <typename T, int RankPad>
__device__ void down_projection(Smem<T, RankPad>& s, const T* src, const T* weight, int row0, int length, int rank,
                                int dim, wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>* acc) {
  const int warp = threadIdx.x / 32;
  for (int rt = 0; rt < RankPad / kTile; ++rt) wmma::fill_fragment(acc[rt], 0.f);
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    load_tile<kChunk, T>(s.x, src, nullptr, row0, kRows, length, d0, dim);
    load_tile<kChunk, T>(s.weight, weight, nullptr, 0, RankPad, rank, d0, dim);
    __syncthreads();
    for (int rt = 0; rt < RankPad / kTile; ++rt) {
      for (int kt = 0; kt < kChunk / kTile; ++kt) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, s.x + warp * kTile * kChunk + kt * kTile, kChunk);
        wmma::load_matrix_sync(b, s.weight + rt * kTile * kChunk + kt * kTile, kChunk);
        wmma::mma_sync(acc[rt], a, b, acc[rt]);
      }
    }
  }
}

// W_mix chunk (kChunk x RankPad) = sum_e w_e W_u[e][d0:d0+kChunk] and its bias, into shared memory.
template <typename T, int RankPad>
__device__ void mix_experts(Smem<T, RankPad>& s, const T* up_weight, const T* up_bias, int experts, int rank,
                            int d0, int dim) {
  for (int i = threadIdx.x; i < kChunk * RankPad; i += blockDim.x) {
    const int d = d0 + i / RankPad, r = i % RankPad;
    float value = 0.f;
    if (d < dim && r < rank) {
      for (int e = 0; e < experts; ++e) value += s.weights[e] * to_float(up_weight[((int64_t)e * dim + d) * rank + r]);
    }
    s.weight[i] = from_float<T>(value);
  }
  for (int i = threadIdx.x; i < kChunk; i += blockDim.x) {
    float value = 0.f;
    for (int e = 0; e < experts && d0 + i < dim; ++e) value += s.weights[e] * to_float(up_bias[(int64_t)e * dim + d0 + i]);
    s.mixed_bias[i] = value;
  }
}

template <typename T, int RankPad>
__global__ void __launch_bounds__(32 * kWarps)
routed_adapter_forward_kernel(const T* __restrict__ x, const T* __restrict__ router_input,
                              const T* __restrict__ router_weight, const T* __restrict__ router_bias,
                              const T* __restrict__ down_weight, const T* __restrict__ down_bias,
                              const T* __restrict__ up_weight, const T* __restrict__ up_bias, T* __restrict__ out,
                              int length, int dim, int rank, int experts, float temperature, float scale,
                              Dropout dropout) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem<T, RankPad>& s = *reinterpret_cast<Smem<T, RankPad>*>(smem_raw);
  const int b = blockIdx.y, row0 = blockIdx.x * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xb = x + (int64_t)b * length * dim;
  // Routing weights: warp e reduces expert e's logit.
  for (int e = warp; e < experts; e += kWarps) {
    float logit = 0.f;
    for (int d = lane; d < dim; d += 32) {
      logit += to_float(router_input[(int64_t)b * dim + d]) * to_float(router_weight[(int64_t)e * dim + d]);
    }
    for (int offset = 16; offset > 0; offset /= 2) logit += __shfl_xor_sync(0xffffffffu, logit, offset);
    if (lane == 0) s.weights[e] = logit + to_float(router_bias[e]);
  }
  __syncthreads();
  if (threadIdx.x == 0) routed_adapter_math::tempered_softmax(s.weights, experts, temperature);

  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> hidden[RankPad / kTile];
  down_projection(s, xb, down_weight, row0, length, rank, dim, hidden);
  float* staged = s.staging + warp * kTile * RankPad;
  for (int rt = 0; rt < RankPad / kTile; ++rt) {
    wmma::store_matrix_sync(staged + rt * kTile, hidden[rt], RankPad, wmma::mem_row_major);
  }
  __syncwarp();
  for (int i = lane; i < kTile * RankPad; i += 32) {
    const int row = row0 + warp * kTile + i / RankPad, r = i % RankPad;
    float h = 0.f;
    if (row < length && r < rank) {
      h = staged[i] + to_float(down_bias[r]);
      if (dropout.on) {
        h *= dropout_math::dropout_factor(dropout.seed, static_cast<uint32_t>(((int64_t)b * length + row) * rank + r),
                                          dropout.threshold, dropout.keep_scale);
      }
    }
    s.hidden[warp * kTile * RankPad + i] = from_float<T>(h);
  }
  T* outb = out + (int64_t)b * length * dim;
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    mix_experts(s, up_weight, up_bias, experts, rank, d0, dim);
    load_tile<kChunk, T>(s.x, xb, nullptr, row0, kRows, length, d0, dim);
    __syncthreads();
    float* tile = s.staging + warp * kTile * kTile;
    for (int nt = 0; nt < kChunk / kTile; ++nt) {
      wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> up;
      wmma::fill_fragment(up, 0.f);
      for (int kt = 0; kt < RankPad / kTile; ++kt) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> w;  // W_mix^T
        wmma::load_matrix_sync(a, s.hidden + warp * kTile * RankPad + kt * kTile, RankPad);
        wmma::load_matrix_sync(w, s.weight + nt * kTile * RankPad + kt * kTile, RankPad);
        wmma::mma_sync(up, a, w, up);
      }
      wmma::store_matrix_sync(tile, up, kTile, wmma::mem_row_major);
      __syncwarp();
      for (int i = lane; i < kTile * kTile; i += 32) {
        const int r = i / kTile, c = nt * kTile + i % kTile, row = row0 + warp * kTile + r, col = d0 + c;
        if (row < length && col < dim) {
          const float residual = to_float(s.x[(warp * kTile + r) * kChunk + c]);
          outb[(int64_t)row * dim + col] = from_float<T>(residual + scale * (tile[i] + s.mixed_bias[c]));
        }
      }
      __syncwarp();
    }
  }
}

template <typename T, int RankPad>
__global__ void __launch_bounds__(32 * kWarps)
routed_adapter_backward_rows_kernel(const T* __restrict__ dout, const T* __restrict__ x,
                                    const float* __restrict__ routing, const T* __restrict__ down_weight,
                                    const T* __restrict__ down_bias, const T* __restrict__ up_weight,
                                    const T* __restrict__ up_bias, float* __restrict__ hidden_out,
                                    float* __restrict__ dhidden_out, T* __restrict__ dx, int length, int dim,
                                    int rank, int experts, float scale, Dropout dropout) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Smem<T, RankPad>& s = *reinterpret_cast<Smem<T, RankPad>*>(smem_raw);
  const int b = blockIdx.y, row0 = blockIdx.x * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) s.weights[e] = routing[(int64_t)b * experts + e];

  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> hidden[RankPad / kTile];
  down_projection(s, x + (int64_t)b * length * dim, down_weight, row0, length, rank, dim, hidden);
  float* staged = s.staging + warp * kTile * RankPad;
  for (int rt = 0; rt < RankPad / kTile; ++rt) {
    wmma::store_matrix_sync(staged + rt * kTile, hidden[rt], RankPad, wmma::mem_row_major);
  }
  // dL/dh = scale * dout W_mix, accumulated over D chunks (the fragments are reused).
  const T* doutb = dout + (int64_t)b * length * dim;
  for (int rt = 0; rt < RankPad / kTile; ++rt) wmma::fill_fragment(hidden[rt], 0.f);
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    mix_experts(s, up_weight, up_bias, experts, rank, d0, dim);
    load_tile<kChunk, T>(s.x, doutb, nullptr, row0, kRows, length, d0, dim);
    __syncthreads();
    for (int rt = 0; rt < RankPad / kTile; ++rt) {
      for (int kt = 0; kt < kChunk / kTile; ++kt) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> w;  // W_mix chunk
        wmma::load_matrix_sync(a, s.x + warp * kTile * kChunk + kt * kTile, kChunk);
        wmma::load_matrix_sync(w, s.weight + kt * kTile * RankPad + rt * kTile, RankPad);
        wmma::mma_sync(hidden[rt], a, w, hidden[rt]);
      }
    }
  }
  __syncwarp();
  for (int i = lane; i < kTile * RankPad; i += 32) {  // staged still holds x W_d^T of this warp's rows
    const int row = row0 + warp * kTile + i / RankPad, r = i % RankPad;
    if (row < length && r < rank) {
      const int64_t offset = ((int64_t)b * length + row) * rank + r;
      const float keep = dropout.on ? dropout_math::dropout_factor(dropout.seed, static_cast<uint32_t>(offset),
                                                                   dropout.threshold, dropout.keep_scale)
                                    : 1.f;
      hidden_out[offset] = (staged[i] + to_float(down_bias[r])) * keep;
    }
  }
  __syncwarp();
  for (int rt = 0; rt < RankPad / kTile; ++rt) {
    wmma::store_matrix_sync(staged + rt * kTile, hidden[rt], RankPad, wmma::mem_row_major);
  }
  __syncwarp();
  for (int i = lane; i < kTile * RankPad; i += 32) {
    const int row = row0 + warp * kTile + i / RankPad, r = i % RankPad;
    float g = 0.f;
    if (row < length && r < rank) {
      const int64_t offset = ((int64_t)b * length + row) * rank + r;
      const float keep = dropout.on ? dropout_math::dropout_factor(dropout.seed, static_cast<uint32_t>(offset),
                                                                   dropout.threshold, dropout.keep_scale)
                                    : 1.f;
      g = staged[i] * scale * keep;
      dhidden_out[offset] = g;
    }
    s.hidden[warp * kTile * RankPad + i] = from_float<T>(g);
  }
  // dx = dout + dL/dh W_d.
  T* dxb = dx + (int64_t)b * length * dim;
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    load_tile<kChunk, T>(s.weight, down_weight, nullptr, 0, RankPad, rank, d0, dim);
    load_tile<kChunk, T>(s.x, doutb, nullptr, row0, kRows, length, d0, dim);
    __syncthreads();
    float* tile = s.staging + warp * kTile * kTile;
    for (int nt = 0; nt < kChunk / kTile; ++nt) {
      wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int kt = 0; kt < RankPad / kTile; ++kt) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> w;
        wmma::load_matrix_sync(a, s.hidden + warp * kTile * RankPad + kt * kTile, RankPad);
        wmma::load_matrix_sync(w, s.weight + kt * kTile * kChunk + nt * kTile, kChunk);
        wmma::mma_sync(acc, a, w, acc);
      }
      wmma::store_matrix_sync(tile, acc, kTile, wmma::mem_row_major);
      __syncwarp();
      for (int i = lane; i < kTile * kTile; i += 32) {
        const int r = i / kTile, c = nt * kTile + i % kTile, row = row0 + warp * kTile + r, col = d0 + c;
        if (row < length && col < dim) {
          dxb[(int64_t)row * dim + col] = from_float<T>(to_float(s.x[(warp * kTile + r) * kChunk + c]) + tile[i]);
        }
      }
      __syncwarp();
    }
  }
}

// Calls fn(std::integral_constant<int, RankPad>{}) for the rank padded to 16, 32 or 64.
template <typename Fn>
void dispatch_rank(int64_t rank, Fn&& fn) {
  TORCH_CHECK(rank <= kMaxRank, "vlfast cuda routed_adapter: rank <= ", kMaxRank, " expected, got ", rank);
  if (rank <= 16) fn(std::integral_constant<int, 16>{});
  else if (rank <= 32) fn(std::integral_constant<int, 32>{});
  else fn(std::integral_constant<int, 64>{});
}

template <typename T>
const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }

}  // namespace

at::Tensor routed_adapter_forward_cuda(const at::Tensor& x, const at::Tensor& router_input,
                                       const at::Tensor& router_weight, const at::Tensor& router_bias,
                                       const at::Tensor& down_weight, const at::Tensor& down_bias,
                                       const at::Tensor& up_weight, const at::Tensor& up_bias, double temperature,
                                       double scale, double dropout_p, int64_t seed) {
  check_routed_adapter(x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight, up_bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), R = down_weight.size(0), E = up_weight.size(0);
  TORCH_CHECK(E <= kMaxExperts, "vlfast cuda routed_adapter: at most ", kMaxExperts, " experts, got ", E);
  at::Tensor out = at::empty_like(x);
  const dim3 grid((L + kRows - 1) / kRows, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(x.scalar_type(), "routed_adapter", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_rank(R, [&](auto rank_pad) {
      constexpr int RankPad = decltype(rank_pad)::value;
      auto kernel = routed_adapter_forward_kernel<T, RankPad>;
      allow_dynamic_smem(kernel, sizeof(Smem<T, RankPad>));
      kernel<<<grid, 32 * kWarps, sizeof(Smem<T, RankPad>), stream>>>(
          ptr<T>(x), ptr<T>(router_input), ptr<T>(router_weight), ptr<T>(router_bias), ptr<T>(down_weight),
          ptr<T>(down_bias), ptr<T>(up_weight), ptr<T>(up_bias), reinterpret_cast<T*>(out.data_ptr()), (int)L,
          (int)D, (int)R, (int)E, (float)temperature, (float)scale, make_dropout(dropout_p, seed));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_adapter_backward_rows_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& down_weight,
    const at::Tensor& down_bias, const at::Tensor& up_weight, const at::Tensor& up_bias, double scale,
    double dropout_p, int64_t seed) {
  check_routed_adapter_backward_rows(dout, x, weights, down_weight, down_bias, up_weight, up_bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), R = down_weight.size(0), E = up_weight.size(0);
  TORCH_CHECK(E <= kMaxExperts, "vlfast cuda routed_adapter: at most ", kMaxExperts, " experts, got ", E);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor hidden = at::empty({B, L, R}, f32), dhidden = at::empty({B, L, R}, f32), dx = at::empty_like(x);
  const at::Tensor routing = weights.to(at::kFloat).contiguous();
  const dim3 grid((L + kRows - 1) / kRows, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(x.scalar_type(), "routed_adapter", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_rank(R, [&](auto rank_pad) {
      constexpr int RankPad = decltype(rank_pad)::value;
      auto kernel = routed_adapter_backward_rows_kernel<T, RankPad>;
      allow_dynamic_smem(kernel, sizeof(Smem<T, RankPad>));
      kernel<<<grid, 32 * kWarps, sizeof(Smem<T, RankPad>), stream>>>(
          ptr<T>(dout), ptr<T>(x), routing.data_ptr<float>(), ptr<T>(down_weight), ptr<T>(down_bias),
          ptr<T>(up_weight), ptr<T>(up_bias), hidden.data_ptr<float>(), dhidden.data_ptr<float>(),
          reinterpret_cast<T*>(dx.data_ptr()), (int)L, (int)D, (int)R, (int)E, (float)scale,
          make_dropout(dropout_p, seed));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // Reductions over rows, as matrix products (cuBLAS): dW_d = dh^T x, dW_mix = scale dout^T h.
  const at::Tensor x32 = x.to(at::kFloat), dout32 = dout.to(at::kFloat);
  const at::Tensor ddown_weight = at::matmul(dhidden.view({B * L, R}).t(), x32.view({B * L, D}));
  const at::Tensor dmixed_up = at::matmul(dout32.transpose(1, 2), hidden) * scale;
  const at::Tensor dmixed_bias = dout32.sum(1) * scale;
  return {dx, ddown_weight.to(down_weight.scalar_type()), dhidden.sum(at::IntArrayRef{0, 1}).to(down_bias.scalar_type()),
          dmixed_up.contiguous(), dmixed_bias.contiguous()};
}

}  // namespace vlfast

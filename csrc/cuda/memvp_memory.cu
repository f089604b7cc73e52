// CUDA kernels of memvp_memory (fp16 / bf16 on tensor cores through WMMA, fp32 accumulation).
//
// Forward: one block per (32 rows of x, sample), one warp per 16 rows. Phase 1 accumulates the
// pre-activation x (z + key_pos)^T over D chunks into shared memory (the whole memory, M <= 512,
// padded to a multiple of 16); SiLU, dropout and the scale are applied there; phase 2 multiplies
// by z + value_pos chunk by chunk of D. The (B, L, M) activation never reaches global memory, and
// z + pos is formed per shared-memory tile, never materialised.
// Backward: a rows kernel (16 rows per block) recomputes the pre-activation, forms dL/dpre, writes
// the dropped activation and dpre (fp32, (B, L, M)) and dx; a memory kernel reduces over rows:
// G = factor * act^T rows per (memory tile, D tile), summed over samples for the position grads.
// Scalar arithmetic (SiLU, its derivative, the dropout hash) is csrc/memvp_math.h, which the CPU
// kernel runs too.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/wmma_utils.cuh"
#include "memvp_math.h"
#include "memvp_memory.h"

namespace vlfast {
namespace {

using namespace nvcuda;
using namespace wmma_utils;
namespace math = memvp_math;

constexpr int kChunk = 32;        // D columns per shared-memory chunk
constexpr int kMaxMemory = 512;   // rows of the memory held per block

struct Dropout {
  uint32_t seed, threshold;
  float keep_scale;
  bool on;

  __device__ float factor(int64_t offset) const {
    return on ? dropout_math::dropout_factor(seed, static_cast<uint32_t>(offset), threshold, keep_scale) : 1.0f;
  }
};

Dropout make_dropout(double p, int64_t seed) {
  return {static_cast<uint32_t>(seed), dropout_math::dropout_threshold(p), static_cast<float>(1.0 / (1.0 - p)), p > 0.0};
}

int padded_memory(int64_t memory) { return static_cast<int>((memory + kTile - 1) / kTile * kTile); }

// acc (16 x mem_pad, fp32, in shared memory, leading dim mem_pad) += a (16 x kChunk) b^T where b
// is a (mem_pad x kChunk) tile.
template <typename T>
__device__ void accumulate_rows_by_memory(float* acc, const T* a, const T* b, int mem_pad, bool first) {
  for (int mt = 0; mt < mem_pad / kTile; ++mt) {
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> c;
    if (first) wmma::fill_fragment(c, 0.f);
    else wmma::load_matrix_sync(c, acc + mt * kTile, mem_pad, wmma::mem_row_major);
    for (int kt = 0; kt < kChunk / kTile; ++kt) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + kt * kTile, kChunk);
      wmma::load_matrix_sync(fb, b + mt * kTile * kChunk + kt * kTile, kChunk);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(acc + mt * kTile, c, mem_pad, wmma::mem_row_major);
  }
}

// out rows (16 x kChunk) = act (16 x mem_pad, T, leading dim mem_pad) b (mem_pad x kChunk), written
// to global rows [row0, row0 + 16) x columns [col0, col0 + kChunk) of a (len, dim) matrix through
// a (16 x kTile) fp32 staging tile.
template <typename T>
__device__ void store_rows_times_memory(T* out, const T* act, const T* b, float* staging, int mem_pad, int row0,
                                        int len, int col0, int dim, int lane) {
  for (int nt = 0; nt < kChunk / kTile; ++nt) {
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> c;
    wmma::fill_fragment(c, 0.f);
    for (int kt = 0; kt < mem_pad / kTile; ++kt) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, act + kt * kTile, mem_pad);
      wmma::load_matrix_sync(fb, b + kt * kTile * kChunk + nt * kTile, kChunk);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(staging, c, kTile, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < kTile * kTile; e += 32) {
      const int row = row0 + e / kTile, col = col0 + nt * kTile + e % kTile;
      if (row < len && col < dim) out[(int64_t)row * dim + col] = from_float<T>(staging[e]);
    }
    __syncwarp();
  }
}

template <typename T>
size_t rows_kernel_smem(int rows, int mem_pad, bool backward) {
  return sizeof(T) * (rows * kChunk + mem_pad * kChunk + rows * mem_pad) +
         sizeof(float) * ((backward ? 2 : 1) * rows * mem_pad + (rows / kTile) * kTile * kTile);
}

// The pre-activation of this block's rows, x (z + key_pos)^T, into pre (rows x mem_pad, fp32).
template <typename T>
__device__ void pre_activation(float* pre, T* x_s, T* mem_s, const T* x, const T* z, const T* key_pos, int row0,
                               int rows, int length, int memory, int mem_pad, int dim, int warp) {
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    load_tile<kChunk, T>(x_s, x, nullptr, row0, rows, length, d0, dim);
    load_tile<kChunk>(mem_s, z, key_pos, 0, mem_pad, memory, d0, dim);
    __syncthreads();
    accumulate_rows_by_memory(pre + warp * kTile * mem_pad, x_s + warp * kTile * kChunk, mem_s, mem_pad, d0 == 0);
  }
}

template <typename T, int Warps>
__global__ void __launch_bounds__(32 * Warps)
memvp_forward_kernel(const T* __restrict__ x, const T* __restrict__ z, const T* __restrict__ key_pos,
                     const T* __restrict__ value_pos, T* __restrict__ out, int length, int memory, int dim,
                     float scale, Dropout dropout) {
  constexpr int kRows = kTile * Warps;
  const int mem_pad = (memory + kTile - 1) / kTile * kTile;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* x_s = reinterpret_cast<T*>(smem_raw);      // (kRows, kChunk)
  T* mem_s = x_s + kRows * kChunk;              // (mem_pad, kChunk)
  T* act = mem_s + mem_pad * kChunk;            // (kRows, mem_pad)
  float* pre = reinterpret_cast<float*>(act + kRows * mem_pad);  // (kRows, mem_pad)
  float* staging = pre + kRows * mem_pad;       // per warp (16, 16)

  const int b = blockIdx.y, row0 = blockIdx.x * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xb = x + (int64_t)b * length * dim;
  const T* zb = z + (int64_t)b * memory * dim;
  pre_activation(pre, x_s, mem_s, xb, zb, key_pos, row0, kRows, length, memory, mem_pad, dim, warp);
  __syncthreads();
  for (int e = threadIdx.x; e < kRows * mem_pad; e += blockDim.x) {
    const int r = e / mem_pad, m = e % mem_pad, row = row0 + r;
    float h = 0.f;
    if (row < length && m < memory) {
      h = math::silu(pre[e]) * scale * dropout.factor(((int64_t)b * length + row) * memory + m);
    }
    act[e] = from_float<T>(h);
  }
  T* outb = out + (int64_t)b * length * dim;
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    load_tile<kChunk>(mem_s, zb, value_pos, 0, mem_pad, memory, d0, dim);
    __syncthreads();
    store_rows_times_memory(outb, act + warp * kTile * mem_pad, mem_s, staging + warp * kTile * kTile, mem_pad,
                            row0 + warp * kTile, length, d0, dim, lane);
  }
}

template <typename T>
__global__ void __launch_bounds__(32)
memvp_backward_rows_kernel(const T* __restrict__ x, const T* __restrict__ z, const T* __restrict__ key_pos,
                           const T* __restrict__ value_pos, const T* __restrict__ dout, float* __restrict__ hidden,
                           float* __restrict__ dpre, T* __restrict__ dx, int length, int memory, int dim,
                           float scale, Dropout dropout) {
  constexpr int kRows = kTile;  // one warp: the two fp32 (rows x M) buffers fit shared memory
  const int mem_pad = (memory + kTile - 1) / kTile * kTile;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* x_s = reinterpret_cast<T*>(smem_raw);      // (kRows, kChunk): x, then dout
  T* mem_s = x_s + kRows * kChunk;              // (mem_pad, kChunk)
  T* act = mem_s + mem_pad * kChunk;            // (kRows, mem_pad): dpre for dx
  float* pre = reinterpret_cast<float*>(act + kRows * mem_pad);  // (kRows, mem_pad)
  float* dhidden = pre + kRows * mem_pad;       // (kRows, mem_pad)
  float* staging = dhidden + kRows * mem_pad;   // (16, 16)

  const int b = blockIdx.y, row0 = blockIdx.x * kRows, lane = threadIdx.x;
  const T* zb = z + (int64_t)b * memory * dim;
  pre_activation(pre, x_s, mem_s, x + (int64_t)b * length * dim, zb, key_pos, row0, kRows, length, memory,
                 mem_pad, dim, 0);
  // dL/dhidden = dout (z + value_pos)^T, same shape of product as the pre-activation.
  pre_activation(dhidden, x_s, mem_s, dout + (int64_t)b * length * dim, zb, value_pos, row0, kRows, length,
                 memory, mem_pad, dim, 0);
  __syncthreads();
  for (int e = lane; e < kRows * mem_pad; e += 32) {
    const int r = e / mem_pad, m = e % mem_pad, row = row0 + r;
    float g = 0.f;
    if (row < length && m < memory) {
      const int64_t offset = ((int64_t)b * length + row) * memory + m;
      const float keep = dropout.factor(offset);
      g = dhidden[e] * scale * keep * math::silu_grad(pre[e]);
      hidden[offset] = math::silu(pre[e]) * keep;
      dpre[offset] = g;
    }
    act[e] = from_float<T>(g);
  }
  T* dxb = dx + (int64_t)b * length * dim;
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    load_tile<kChunk>(mem_s, zb, key_pos, 0, mem_pad, memory, d0, dim);
    __syncthreads();
    store_rows_times_memory(dxb, act, mem_s, staging, mem_pad, row0, length, d0, dim, lane);
  }
}

// One side of the memory gradient, per (32 memory rows, 32 columns) tile, 4 warps of 16 x 16:
// G_b = factor * act_b^T rows_b over the L rows; dz_b = G_b (or += G_b), dpos = sum_b G_b.
template <typename T>
__global__ void __launch_bounds__(128)
memvp_backward_memory_kernel(const float* __restrict__ act, const T* __restrict__ rows, float* __restrict__ dz,
                             T* __restrict__ dpos, int batches, int length, int memory, int dim, float factor,
                             bool accumulate) {
  constexpr int kM = 2 * kTile, kD = 2 * kTile;
  __shared__ __align__(128) T act_s[kTile * kM];   // (16 rows, 32 memory rows)
  __shared__ __align__(128) T rows_s[kTile * kD];  // (16 rows, 32 columns)
  __shared__ __align__(128) float staging[4][kTile * kTile];
  const int m0 = blockIdx.x * kM, d0 = blockIdx.y * kD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = (warp / 2) * kTile, wd = (warp % 2) * kTile;
  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> dpos_acc;
  wmma::fill_fragment(dpos_acc, 0.f);
  for (int b = 0; b < batches; ++b) {
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> grad;
    wmma::fill_fragment(grad, 0.f);
    for (int l0 = 0; l0 < length; l0 += kTile) {
      __syncthreads();
      for (int e = threadIdx.x; e < kTile * kM; e += blockDim.x) {
        const int l = l0 + e / kM, m = m0 + e % kM;
        act_s[e] = from_float<T>(l < length && m < memory ? act[((int64_t)b * length + l) * memory + m] : 0.f);
      }
      for (int e = threadIdx.x; e < kTile * kD; e += blockDim.x) {
        const int l = l0 + e / kD, d = d0 + e % kD;
        rows_s[e] = l < length && d < dim ? rows[((int64_t)b * length + l) * dim + d] : from_float<T>(0.f);
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::col_major> fa;  // act^T
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, act_s + wm, kM);
      wmma::load_matrix_sync(fb, rows_s + wd, kD);
      wmma::mma_sync(grad, fa, fb, grad);
    }
    for (int i = 0; i < grad.num_elements; ++i) {
      grad.x[i] *= factor;
      dpos_acc.x[i] += grad.x[i];
    }
    wmma::store_matrix_sync(staging[warp], grad, kTile, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < kTile * kTile; e += 32) {
      const int m = m0 + wm + e / kTile, d = d0 + wd + e % kTile;
      if (m < memory && d < dim) {
        float* target = dz + ((int64_t)b * memory + m) * dim + d;
        *target = accumulate ? *target + staging[warp][e] : staging[warp][e];
      }
    }
    __syncwarp();
  }
  wmma::store_matrix_sync(staging[warp], dpos_acc, kTile, wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < kTile * kTile; e += 32) {
    const int m = m0 + wm + e / kTile, d = d0 + wd + e % kTile;
    if (m < memory && d < dim) dpos[(int64_t)m * dim + d] = from_float<T>(staging[warp][e]);
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); }
template <typename T>
T* mutable_ptr(at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

void check_memory(int64_t memory) {
  TORCH_CHECK(memory <= kMaxMemory, "vlfast cuda memvp_memory: M <= ", kMaxMemory, " expected, got ", memory);
}

}  // namespace

at::Tensor memvp_memory_forward_cuda(const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos,
                                     const at::Tensor& value_pos, double scale, double dropout_p, int64_t seed) {
  check_memvp_memory(x, z, key_pos, value_pos);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), M = z.size(1);
  check_memory(M);
  at::Tensor out = at::empty_like(x);
  constexpr int kWarps = 2;
  const dim3 grid((L + kTile * kWarps - 1) / (kTile * kWarps), B);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(x.scalar_type(), "memvp_memory", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t smem = rows_kernel_smem<T>(kTile * kWarps, padded_memory(M), false);
    auto kernel = memvp_forward_kernel<T, kWarps>;
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid, 32 * kWarps, smem, stream>>>(ptr<T>(x), ptr<T>(z), ptr<T>(key_pos), ptr<T>(value_pos),
                                                 mutable_ptr<T>(out), (int)L, (int)M, (int)D, (float)scale,
                                                 make_dropout(dropout_p, seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memvp_memory_backward_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos,
    const at::Tensor& value_pos, double scale, double dropout_p, int64_t seed) {
  check_memvp_memory(x, z, key_pos, value_pos, &dout);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), M = z.size(1);
  check_memory(M);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor hidden = at::empty({B, L, M}, f32), dpre = at::empty({B, L, M}, f32);
  at::Tensor dx = at::empty_like(x), dz = at::empty({B, M, D}, f32);
  at::Tensor dkey_pos = at::empty_like(key_pos), dvalue_pos = at::empty_like(value_pos);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(x.scalar_type(), "memvp_memory", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const size_t smem = rows_kernel_smem<T>(kTile, padded_memory(M), true);
    auto rows_kernel = memvp_backward_rows_kernel<T>;
    allow_dynamic_smem(rows_kernel, smem);
    rows_kernel<<<dim3((L + kTile - 1) / kTile, B), 32, smem, stream>>>(
        ptr<T>(x), ptr<T>(z), ptr<T>(key_pos), ptr<T>(value_pos), ptr<T>(dout), hidden.data_ptr<float>(),
        dpre.data_ptr<float>(), mutable_ptr<T>(dx), (int)L, (int)M, (int)D, (float)scale,
        make_dropout(dropout_p, seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid((M + 2 * kTile - 1) / (2 * kTile), (D + 2 * kTile - 1) / (2 * kTile));
    memvp_backward_memory_kernel<T><<<grid, 128, 0, stream>>>(
        dpre.data_ptr<float>(), ptr<T>(x), dz.data_ptr<float>(), mutable_ptr<T>(dkey_pos), (int)B, (int)L, (int)M,
        (int)D, 1.0f, false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    memvp_backward_memory_kernel<T><<<grid, 128, 0, stream>>>(
        hidden.data_ptr<float>(), ptr<T>(dout), dz.data_ptr<float>(), mutable_ptr<T>(dvalue_pos), (int)B, (int)L,
        (int)M, (int)D, (float)scale, true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dz.to(z.scalar_type()), dkey_pos, dvalue_pos};
}

}  // namespace vlfast

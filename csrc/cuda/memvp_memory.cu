// CUDA kernels of memvp_memory (fp16 / bf16 on tensor cores through WMMA, fp32 accumulation).
//
// Forward: one block per (32 rows of x, sample), one warp per 16 rows. The memory is taken in tiles
// of up to `mem_tile` rows, as many as the device's opt-in shared memory holds (the whole memory
// when it fits; about 880 rows with 227 KiB, 368 with the 99 KiB of A10 / L4 / L40S). Per tile,
// phase 1 accumulates the pre-activation x (z + key_pos)^T over D chunks into shared memory and
// writes it to `pre` (fp32 (B, L, M), kept for the backward); SiLU, dropout and the scale are applied
// in shared memory; phase 2 multiplies by z + value_pos chunk by chunk of D. SiLU needs no running
// maximum, so the products of successive tiles just add up: with more than one tile they meet in an
// fp32 (B, L, D) work buffer and the last tile writes the output. The activation itself stays in
// shared memory, and z + pos is formed per shared-memory tile.
// Backward: a rows kernel (16 rows per block) computes dout (z + value_pos)^T per memory tile
// (dL/dhidden up to the scale), forms dL/dpre with the kept pre-activation, writes the dropped
// activation and dpre (fp32, (B, L, M)) and accumulates dx the same way; a memory kernel reduces
// over rows: G = factor * act^T rows per (memory tile, D tile), summed over samples for the position
// grads.
// fp16: the activation and dpre can pass 65504 where the fp32 reference and the results do not.
// Each row of a tile is scaled by a power of 2 (memvp_math::fp16_safe_factor, 1 for ordinary
// values) before it is rounded to fp16, and the fp32 product by the inverse; the memory kernel does
// the same per (16 rows x 32 memory rows) tile.
// Scalar arithmetic (SiLU, its derivative, the dropout hash, the fp16 factor) is csrc/memvp_math.h,
// which the CPU kernel shares.
#include <type_traits>

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

constexpr int kChunk = 32;  // D columns per shared-memory chunk

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

__host__ __device__ int padded(int64_t rows) { return static_cast<int>((rows + kTile - 1) / kTile * kTile); }

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

// One warp's 16 rows of fp32 values (leading dim mem_pad) rounded to T into act. For fp16 each row
// is first multiplied by memvp_math::fp16_safe_factor of its largest magnitude; unscale[r] gets the
// inverse, for the product to undo it.
template <typename T>
__device__ void round_rows(T* act, const float* values, float* unscale, int mem_pad, int lane) {
  for (int r = 0; r < kTile; ++r) {
    float factor = 1.f;
    if constexpr (std::is_same_v<T, __half>) {
      float largest = 0.f;
      for (int c = lane; c < mem_pad; c += 32) largest = fmaxf(largest, fabsf(values[r * mem_pad + c]));
      for (int offset = 16; offset > 0; offset /= 2) {
        largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, offset));
      }
      factor = math::fp16_safe_factor(largest);
    }
    for (int c = lane; c < mem_pad; c += 32) act[r * mem_pad + c] = from_float<T>(values[r * mem_pad + c] * factor);
    if (lane == 0) unscale[r] = 1.f / factor;
  }
  __syncwarp();
}

// Where a memory tile's product goes: the only tile writes the output; with several, the first
// writes the fp32 work buffer, the middle ones add to it and the last adds it to its own product
// and writes the output. A block owns its rows and each lane the same elements in every pass, so
// the work buffer needs no synchronisation.
enum class Pass { kOnly, kFirst, kMiddle, kLast };

__device__ Pass pass_of(int m0, int mem_tile, int memory) {
  const bool first = m0 == 0, last = m0 + mem_tile >= memory;
  return first ? (last ? Pass::kOnly : Pass::kFirst) : (last ? Pass::kLast : Pass::kMiddle);
}

// The product act (16 x mem_pad, T, leading dim mem_pad) b (mem_pad x kChunk), each row times
// unscale[r], for global rows [row0, row0 + 16) x columns [col0, col0 + kChunk) of a (len, dim)
// matrix, through a (16 x kTile) fp32 staging tile, to out or work as `pass` says.
template <typename T>
__device__ void store_rows_times_memory(T* out, float* work, Pass pass, const T* act, const float* unscale,
                                        const T* b, float* staging, int mem_pad, int row0, int len, int col0,
                                        int dim, int lane) {
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
      if (row < len && col < dim) {
        const int64_t at = (int64_t)row * dim + col;
        float value = staging[e] * unscale[e / kTile];
        if (pass == Pass::kMiddle || pass == Pass::kLast) value += work[at];
        if (pass == Pass::kFirst || pass == Pass::kMiddle) work[at] = value;
        else out[at] = from_float<T>(value);
      }
    }
    __syncwarp();
  }
}

// Shared memory of a rows kernel (forward or backward) with `rows` rows and mem_tile memory rows per pass.
template <typename T>
size_t rows_kernel_smem(int rows, int mem_tile) {
  return sizeof(T) * (rows * kChunk + mem_tile * kChunk + rows * mem_tile) +
         sizeof(float) * (rows * mem_tile + (rows / kTile) * kTile * kTile + rows);
}

// Memory rows per pass: the whole (padded) memory if it fits the device's opt-in shared memory per
// block, else the most that fits (a multiple of 16).
template <typename T>
int memory_tile(int64_t memory, int rows) {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t fixed = rows_kernel_smem<T>(rows, 0);
  const size_t per_tile = rows_kernel_smem<T>(rows, kTile) - fixed;
  const int fits = static_cast<size_t>(optin) > fixed ? static_cast<int>((optin - fixed) / per_tile) * kTile : 0;
  TORCH_CHECK(fits >= kTile, "vlfast cuda memvp_memory: ", optin / 1024, " KiB of shared memory per block is too ",
              "little for one 16-row memory tile (", (fixed + per_tile) / 1024 + 1, " KiB)");
  return std::min(padded(memory), fits);
}

// The pre-activation of this block's rows against memory rows [0, tile_rows) of z and pos (already
// offset to the tile), x (z + pos)^T, into pre (rows x mem_pad, fp32).
template <typename T>
__device__ void pre_activation(float* pre, T* x_s, T* mem_s, const T* x, const T* z, const T* pos, int row0,
                               int rows, int length, int tile_rows, int mem_pad, int dim, int warp) {
  for (int d0 = 0; d0 < dim; d0 += kChunk) {
    __syncthreads();
    load_tile<kChunk, T>(x_s, x, nullptr, row0, rows, length, d0, dim);
    load_tile<kChunk>(mem_s, z, pos, 0, mem_pad, tile_rows, d0, dim);
    __syncthreads();
    accumulate_rows_by_memory(pre + warp * kTile * mem_pad, x_s + warp * kTile * kChunk, mem_s, mem_pad, d0 == 0);
  }
}

template <typename T, int Warps>
__global__ void __launch_bounds__(32 * Warps, 1)  // min 1 block: without it sm_80 caps fp16 at 64 registers and spills
memvp_forward_kernel(const T* __restrict__ x, const T* __restrict__ z, const T* __restrict__ key_pos,
                     const T* __restrict__ value_pos, T* __restrict__ out, float* __restrict__ pre_out,
                     float* __restrict__ work, int length,
                     int memory, int dim, int mem_tile, float scale, Dropout dropout) {
  constexpr int kRows = kTile * Warps;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* x_s = reinterpret_cast<T*>(smem_raw);      // (kRows, kChunk)
  T* mem_s = x_s + kRows * kChunk;              // (mem_tile, kChunk)
  T* act = mem_s + mem_tile * kChunk;           // (kRows, mem_tile)
  float* pre = reinterpret_cast<float*>(act + kRows * mem_tile);  // (kRows, mem_tile)
  float* staging = pre + kRows * mem_tile;      // per warp (16, 16)
  float* unscale = staging + Warps * kTile * kTile;  // (kRows)

  const int b = blockIdx.y, row0 = blockIdx.x * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xb = x + (int64_t)b * length * dim;
  const T* zb = z + (int64_t)b * memory * dim;
  T* outb = out + (int64_t)b * length * dim;
  float* workb = work == nullptr ? nullptr : work + (int64_t)b * length * dim;
  for (int m0 = 0; m0 < memory; m0 += mem_tile) {
    const int tile_rows = min(mem_tile, memory - m0), mem_pad = padded(tile_rows);
    const int64_t pos_offset = (int64_t)m0 * dim;
    pre_activation(pre, x_s, mem_s, xb, zb + pos_offset, key_pos + pos_offset, row0, kRows, length, tile_rows,
                   mem_pad, dim, warp);
    // From here on each warp works on its own 16 rows of pre, act and unscale.
    float* warp_pre = pre + warp * kTile * mem_pad;
    T* warp_act = act + warp * kTile * mem_pad;
    __syncwarp();  // the pre-activation's fragments were stored by other lanes
    for (int e = lane; e < kTile * mem_pad; e += 32) {
      const int m = e % mem_pad, row = row0 + warp * kTile + e / mem_pad;
      float h = 0.f;
      if (row < length && m < tile_rows) {
        const int64_t offset = ((int64_t)b * length + row) * memory + m0 + m;
        pre_out[offset] = warp_pre[e];
        h = math::silu(warp_pre[e]) * scale * dropout.factor(offset);
      }
      warp_pre[e] = h;
    }
    __syncwarp();
    round_rows(warp_act, warp_pre, unscale + warp * kTile, mem_pad, lane);
    const Pass pass = pass_of(m0, mem_tile, memory);
    for (int d0 = 0; d0 < dim; d0 += kChunk) {
      __syncthreads();
      load_tile<kChunk>(mem_s, zb + pos_offset, value_pos + pos_offset, 0, mem_pad, tile_rows, d0, dim);
      __syncthreads();
      store_rows_times_memory(outb, workb, pass, warp_act, unscale + warp * kTile, mem_s,
                              staging + warp * kTile * kTile, mem_pad, row0 + warp * kTile, length, d0, dim, lane);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(32)
memvp_backward_rows_kernel(const T* __restrict__ z, const T* __restrict__ key_pos, const T* __restrict__ value_pos,
                           const T* __restrict__ dout, const float* __restrict__ saved_pre, float* __restrict__ hidden,
                           float* __restrict__ dpre, T* __restrict__ dx, float* __restrict__ work, int length,
                           int memory, int dim, int mem_tile, float scale, Dropout dropout) {
  constexpr int kRows = kTile;  // one warp: the fp32 (rows x mem_tile) buffer takes the most room
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* x_s = reinterpret_cast<T*>(smem_raw);      // (kRows, kChunk): dout
  T* mem_s = x_s + kRows * kChunk;              // (mem_tile, kChunk)
  T* act = mem_s + mem_tile * kChunk;           // (kRows, mem_tile): dpre for dx
  float* dhidden = reinterpret_cast<float*>(act + kRows * mem_tile);  // (kRows, mem_tile), then dpre
  float* staging = dhidden + kRows * mem_tile;  // (16, 16)
  float* unscale = staging + kTile * kTile;     // (kRows)

  const int b = blockIdx.y, row0 = blockIdx.x * kRows, lane = threadIdx.x;
  const T* zb = z + (int64_t)b * memory * dim;
  const int64_t row_offset = (int64_t)b * length * dim;
  T* dxb = dx + row_offset;
  float* workb = work == nullptr ? nullptr : work + row_offset;
  for (int m0 = 0; m0 < memory; m0 += mem_tile) {
    const int tile_rows = min(mem_tile, memory - m0), mem_pad = padded(tile_rows);
    const int64_t pos_offset = (int64_t)m0 * dim;
    // dL/dhidden / scale = dout (z + value_pos)^T, same shape of product as the pre-activation.
    pre_activation(dhidden, x_s, mem_s, dout + row_offset, zb + pos_offset, value_pos + pos_offset, row0, kRows,
                   length, tile_rows, mem_pad, dim, 0);
    __syncwarp();
    for (int e = lane; e < kRows * mem_pad; e += 32) {
      const int m = e % mem_pad, row = row0 + e / mem_pad;
      float g = 0.f;
      if (row < length && m < tile_rows) {
        const int64_t offset = ((int64_t)b * length + row) * memory + m0 + m;
        const float keep = dropout.factor(offset), pre = saved_pre[offset];  // the forward's
        g = dhidden[e] * scale * keep * math::silu_grad(pre);
        hidden[offset] = math::silu(pre) * keep;
        dpre[offset] = g;
      }
      dhidden[e] = g;
    }
    __syncwarp();
    round_rows(act, dhidden, unscale, mem_pad, lane);
    const Pass pass = pass_of(m0, mem_tile, memory);
    for (int d0 = 0; d0 < dim; d0 += kChunk) {
      __syncthreads();
      load_tile<kChunk>(mem_s, zb + pos_offset, key_pos + pos_offset, 0, mem_pad, tile_rows, d0, dim);
      __syncthreads();
      store_rows_times_memory(dxb, workb, pass, act, unscale, mem_s, staging, mem_pad, row0,
                              length, d0, dim, lane);
    }
  }
}

// One side of the memory gradient, per (32 memory rows, 32 columns) tile, 4 warps of 16 x 16:
// G_b = factor * act_b^T rows_b over the L rows; dz_b = G_b (or += G_b), dpos = sum_b G_b. For fp16,
// each (16 rows x 32 memory rows) act tile is scaled by one fp16_safe_factor of its largest
// magnitude, and the accumulator with it around that tile's product (powers of 2: exact).
template <typename T>
__global__ void __launch_bounds__(128)
memvp_backward_memory_kernel(const float* __restrict__ act, const T* __restrict__ rows, float* __restrict__ dz,
                             T* __restrict__ dpos, int batches, int length, int memory, int dim, float factor,
                             bool accumulate) {
  constexpr int kM = 2 * kTile, kD = 2 * kTile;
  __shared__ __align__(128) T act_s[kTile * kM];   // (16 rows, 32 memory rows)
  __shared__ __align__(128) T rows_s[kTile * kD];  // (16 rows, 32 columns)
  __shared__ __align__(128) float staging[4][kTile * kTile];
  __shared__ float largest[4];  // per warp
  constexpr int kPerThread = kTile * kM / 128;
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
      float values[kPerThread], magnitude = 0.f;
      for (int i = 0; i < kPerThread; ++i) {
        const int e = threadIdx.x + i * 128, l = l0 + e / kM, m = m0 + e % kM;
        values[i] = l < length && m < memory ? act[((int64_t)b * length + l) * memory + m] : 0.f;
        magnitude = fmaxf(magnitude, fabsf(values[i]));
      }
      for (int e = threadIdx.x; e < kTile * kD; e += blockDim.x) {
        const int l = l0 + e / kD, d = d0 + e % kD;
        rows_s[e] = l < length && d < dim ? rows[((int64_t)b * length + l) * dim + d] : from_float<T>(0.f);
      }
      float fit = 1.f;
      if constexpr (std::is_same_v<T, __half>) {
        for (int offset = 16; offset > 0; offset /= 2) {
          magnitude = fmaxf(magnitude, __shfl_xor_sync(0xffffffffu, magnitude, offset));
        }
        if (lane == 0) largest[warp] = magnitude;
        __syncthreads();
        fit = math::fp16_safe_factor(fmaxf(fmaxf(largest[0], largest[1]), fmaxf(largest[2], largest[3])));
      }
      for (int i = 0; i < kPerThread; ++i) act_s[threadIdx.x + i * 128] = from_float<T>(values[i] * fit);
      __syncthreads();
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::col_major> fa;  // act^T
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, act_s + wm, kM);
      wmma::load_matrix_sync(fb, rows_s + wd, kD);
      if (fit != 1.f) {  // block-uniform
        for (int i = 0; i < grad.num_elements; ++i) grad.x[i] *= fit;
      }
      wmma::mma_sync(grad, fa, fb, grad);
      if (fit != 1.f) {
        for (int i = 0; i < grad.num_elements; ++i) grad.x[i] /= fit;
      }
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> memvp_memory_forward_cuda(
    const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos, const at::Tensor& value_pos, double scale,
    double dropout_p, int64_t seed) {
  check_memvp_memory(x, z, key_pos, value_pos);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), M = z.size(1);
  at::Tensor out = at::empty_like(x), pre = at::empty({B, L, M}, x.options().dtype(at::kFloat));
  constexpr int kWarps = 2;
  const dim3 grid((L + kTile * kWarps - 1) / (kTile * kWarps), B);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(x.scalar_type(), "memvp_memory", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int mem_tile = memory_tile<T>(M, kTile * kWarps);
    // Several memory tiles meet in fp32 before the output is rounded.
    at::Tensor work = mem_tile < M ? at::empty({B, L, D}, x.options().dtype(at::kFloat)) : at::Tensor();
    const size_t smem = rows_kernel_smem<T>(kTile * kWarps, mem_tile);
    auto kernel = memvp_forward_kernel<T, kWarps>;
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid, 32 * kWarps, smem, stream>>>(ptr<T>(x), ptr<T>(z), ptr<T>(key_pos), ptr<T>(value_pos),
                                                 mutable_ptr<T>(out), pre.data_ptr<float>(),
                                                 work.defined() ? work.data_ptr<float>() : nullptr,
                                                 (int)L, (int)M, (int)D, mem_tile, (float)scale,
                                                 make_dropout(dropout_p, seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> memvp_memory_backward_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& z, const at::Tensor& key_pos,
    const at::Tensor& value_pos, const at::Tensor& pre, double scale, double dropout_p, int64_t seed) {
  check_memvp_memory(x, z, key_pos, value_pos, &dout, &pre);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), M = z.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor hidden = at::empty({B, L, M}, f32), dpre = at::empty({B, L, M}, f32);
  at::Tensor dx = at::empty_like(x), dz = at::empty({B, M, D}, f32);
  at::Tensor dkey_pos = at::empty_like(key_pos), dvalue_pos = at::empty_like(value_pos);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(x.scalar_type(), "memvp_memory", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int mem_tile = memory_tile<T>(M, kTile);
    at::Tensor work = mem_tile < M ? at::empty({B, L, D}, f32) : at::Tensor();  // dx over several memory tiles
    const size_t smem = rows_kernel_smem<T>(kTile, mem_tile);
    auto rows_kernel = memvp_backward_rows_kernel<T>;
    allow_dynamic_smem(rows_kernel, smem);
    rows_kernel<<<dim3((L + kTile - 1) / kTile, B), 32, smem, stream>>>(
        ptr<T>(z), ptr<T>(key_pos), ptr<T>(value_pos), ptr<T>(dout), pre.data_ptr<float>(), hidden.data_ptr<float>(),
        dpre.data_ptr<float>(), mutable_ptr<T>(dx), work.defined() ? work.data_ptr<float>() : nullptr, (int)L,
        (int)M, (int)D, mem_tile, (float)scale, make_dropout(dropout_p, seed));
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

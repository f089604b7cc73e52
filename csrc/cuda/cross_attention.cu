// CUDA kernels of cross-attention (fp16 / bf16 on tensor cores through WMMA, fp32 softmax).
//
// Forward: one block per (query tile, head, batch); each warp owns 16 query rows and walks the
// keys in blocks of kKeyBlock, keeping the online-softmax state per row. Scores go through shared
// memory because WMMA fragments have no documented element layout; the output accumulator lives
// in shared memory for the same reason (it is rescaled row by row).
// Backward: one block per (key tile, head, batch); each warp owns 16 keys, accumulates dK and dV
// in registers over all query tiles, and adds its share of dQ to an fp32 buffer atomically.
// The scalar arithmetic is the same code the CPU kernel runs (cross_attention_math.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cross_attention.h"
#include "cross_attention_math.h"
#include "cuda/wmma_utils.cuh"

namespace vlfast {
namespace {

using namespace nvcuda;
using namespace wmma_utils;
namespace math = attention_math;

constexpr int kKeyBlock = 32;  // keys per forward step

template <typename T, int DPad, int Warps>
struct ForwardSmem {
  static constexpr int kRows = kTile * Warps;
  static constexpr size_t bytes = sizeof(T) * (2 * kKeyBlock * DPad + kRows * DPad + kRows * kKeyBlock) +
                                  sizeof(float) * (kRows * kKeyBlock + kRows * DPad + 2 * kRows + kKeyBlock);
};

template <typename T, int DPad, int Warps>
__global__ void __launch_bounds__(32 * Warps)
cross_attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const bool* __restrict__ kv_mask, T* __restrict__ out, float* __restrict__ lse,
                               int heads, int q_len, int kv_len, int dim, float scale) {
  constexpr int kRows = kTile * Warps;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);            // (kKeyBlock, DPad)
  T* v_s = k_s + kKeyBlock * DPad;                    // (kKeyBlock, DPad)
  T* q_s = v_s + kKeyBlock * DPad;                    // (kRows, DPad)
  T* p_s = q_s + kRows * DPad;                        // (kRows, kKeyBlock)
  float* s_s = reinterpret_cast<float*>(p_s + kRows * kKeyBlock);  // (kRows, kKeyBlock)
  float* o_s = s_s + kRows * kKeyBlock;               // (kRows, DPad)
  float* row_max = o_s + kRows * DPad;                // (kRows)
  float* row_sum = row_max + kRows;                   // (kRows)
  float* key_visible = row_sum + kRows;               // (kKeyBlock), 1 or 0

  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * kRows;
  const int64_t bh = (int64_t)b * heads + h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile<DPad, T>(q_s, q + bh * q_len * dim, nullptr, q0, kRows, q_len, 0, dim);
  for (int e = threadIdx.x; e < kRows * DPad; e += blockDim.x) o_s[e] = 0.f;
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) { row_max[r] = -INFINITY; row_sum[r] = 0.f; }

  // Lane layout for row-wise work: two lanes per row, each owning half of the columns.
  const int my_row = warp * kTile + lane / 2, half = lane % 2;
  T* q_w = q_s + warp * kTile * DPad;
  T* p_w = p_s + warp * kTile * kKeyBlock;
  float* s_w = s_s + warp * kTile * kKeyBlock;
  float* o_w = o_s + warp * kTile * DPad;

  for (int j0 = 0; j0 < kv_len; j0 += kKeyBlock) {
    __syncthreads();  // previous block's k_s / v_s are no longer read
    load_tile<DPad, T>(k_s, k + bh * kv_len * dim, nullptr, j0, kKeyBlock, kv_len, 0, dim);
    load_tile<DPad, T>(v_s, v + bh * kv_len * dim, nullptr, j0, kKeyBlock, kv_len, 0, dim);
    for (int j = threadIdx.x; j < kKeyBlock; j += blockDim.x) {
      const bool in_range = j0 + j < kv_len;
      key_visible[j] = (in_range && (kv_mask == nullptr || kv_mask[(int64_t)b * kv_len + j0 + j])) ? 1.f : 0.f;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    for (int nt = 0; nt < kKeyBlock / kTile; ++nt) {
      wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int dt = 0; dt < DPad / kTile; ++dt) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> bt;
        wmma::load_matrix_sync(a, q_w + dt * kTile, DPad);
        wmma::load_matrix_sync(bt, k_s + nt * kTile * DPad + dt * kTile, DPad);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(s_w + nt * kTile, acc, kKeyBlock, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax update of row my_row over this key block.
    constexpr int kCols = kKeyBlock / 2;
    const int r = lane / 2;
    float block_max = -INFINITY;
    for (int c = half * kCols; c < (half + 1) * kCols; ++c) {
      const float logit = math::masked_logit(s_w[r * kKeyBlock + c], scale, key_visible[c] != 0.f);
      s_w[r * kKeyBlock + c] = logit;
      block_max = fmaxf(block_max, logit);
    }
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    const float old_max = row_max[my_row];
    const float new_max = fmaxf(old_max, block_max);
    const float alpha = math::rescale_factor(old_max, new_max);
    float block_sum = 0.f;
    for (int c = half * kCols; c < (half + 1) * kCols; ++c) {
      const float p = math::unnormalized_prob(s_w[r * kKeyBlock + c], new_max);
      block_sum += p;
      p_w[r * kKeyBlock + c] = from_float<T>(p);
    }
    block_sum += __shfl_xor_sync(0xffffffffu, block_sum, 1);
    for (int d = half * (DPad / 2); d < (half + 1) * (DPad / 2); ++d) o_w[r * DPad + d] *= alpha;
    __syncwarp();
    if (half == 0) {
      row_sum[my_row] = row_sum[my_row] * alpha + block_sum;
      row_max[my_row] = new_max;
    }

    // O += P V.
    for (int dt = 0; dt < DPad / kTile; ++dt) {
      wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc;
      wmma::load_matrix_sync(acc, o_w + dt * kTile, DPad, wmma::mem_row_major);
      for (int nt = 0; nt < kKeyBlock / kTile; ++nt) {
        wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, p_w + nt * kTile, kKeyBlock);
        wmma::load_matrix_sync(bv, v_s + nt * kTile * DPad + dt * kTile, DPad);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(o_w + dt * kTile, acc, DPad, wmma::mem_row_major);
    }
    __syncwarp();
  }

  const int row = q0 + my_row;
  if (row < q_len) {
    const float inv = math::output_normalizer(row_sum[my_row]);
    T* out_row = out + (bh * q_len + row) * dim;
    for (int d = half; d < dim; d += 2) out_row[d] = from_float<T>(o_w[(lane / 2) * DPad + d] * inv);
    if (half == 0) lse[bh * q_len + row] = math::log_sum_exp(row_max[my_row], row_sum[my_row]);
  }
}

template <typename T, int DPad, int Warps>
struct BackwardSmem {
  static constexpr int kKeys = kTile * Warps;
  static constexpr size_t bytes =
      sizeof(T) * (2 * kKeys * DPad + 2 * kTile * DPad + 2 * Warps * kTile * kTile) +
      sizeof(float) * (2 * Warps * kTile * kTile + 2 * kTile + kKeys);
};

template <typename T, int DPad, int Warps>
__global__ void __launch_bounds__(32 * Warps)
cross_attention_backward_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                                const T* __restrict__ v, const bool* __restrict__ kv_mask,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                float* __restrict__ dq_accum, T* __restrict__ dk, T* __restrict__ dv,
                                int heads, int q_len, int kv_len, int dim, float scale) {
  constexpr int kKeys = kTile * Warps;
  constexpr int kSq = kTile * kTile;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);   // (kKeys, DPad)
  T* v_s = k_s + kKeys * DPad;               // (kKeys, DPad)
  T* q_s = v_s + kKeys * DPad;               // (16, DPad)
  T* do_s = q_s + kTile * DPad;              // (16, DPad)
  T* pt_s = do_s + kTile * DPad;             // per warp (16 keys, 16 queries): P^T
  T* dst_s = pt_s + Warps * kSq;             // per warp: dS^T
  float* st_s = reinterpret_cast<float*>(dst_s + Warps * kSq);  // per warp: S^T, later dQ part
  float* dpt_s = st_s + Warps * kSq;         // per warp: dP^T, later dK / dV staging
  float* lse_s = dpt_s + Warps * kSq;        // (16)
  float* delta_s = lse_s + kTile;            // (16)
  float* key_visible = delta_s + kTile;      // (kKeys)

  const int b = blockIdx.z, h = blockIdx.y, j0 = blockIdx.x * kKeys;
  const int64_t bh = (int64_t)b * heads + h;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile<DPad, T>(k_s, k + bh * kv_len * dim, nullptr, j0, kKeys, kv_len, 0, dim);
  load_tile<DPad, T>(v_s, v + bh * kv_len * dim, nullptr, j0, kKeys, kv_len, 0, dim);
  for (int j = threadIdx.x; j < kKeys; j += blockDim.x) {
    const bool in_range = j0 + j < kv_len;
    key_visible[j] = (in_range && (kv_mask == nullptr || kv_mask[(int64_t)b * kv_len + j0 + j])) ? 1.f : 0.f;
  }
  const T* k_w = k_s + warp * kTile * DPad;
  const T* v_w = v_s + warp * kTile * DPad;
  T* pt_w = pt_s + warp * kSq;
  T* dst_w = dst_s + warp * kSq;
  float* st_w = st_s + warp * kSq;
  float* dpt_w = dpt_s + warp * kSq;

  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> dk_acc[DPad / kTile], dv_acc[DPad / kTile];
  for (int dt = 0; dt < DPad / kTile; ++dt) {
    wmma::fill_fragment(dk_acc[dt], 0.f);
    wmma::fill_fragment(dv_acc[dt], 0.f);
  }

  for (int i0 = 0; i0 < q_len; i0 += kTile) {
    __syncthreads();
    load_tile<DPad, T>(q_s, q + bh * q_len * dim, nullptr, i0, kTile, q_len, 0, dim);
    load_tile<DPad, T>(do_s, dout + bh * q_len * dim, nullptr, i0, kTile, q_len, 0, dim);
    for (int r = threadIdx.x; r < kTile; r += blockDim.x) {
      const bool valid = i0 + r < q_len;
      lse_s[r] = valid ? lse[bh * q_len + i0 + r] : INFINITY;  // +inf: probability 0
      delta_s[r] = valid ? delta[bh * q_len + i0 + r] : 0.f;
    }
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys against 16 queries.
    wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> s_acc, dp_acc;
    wmma::fill_fragment(s_acc, 0.f);
    wmma::fill_fragment(dp_acc, 0.f);
    for (int dt = 0; dt < DPad / kTile; ++dt) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major> bt;
      wmma::load_matrix_sync(a, k_w + dt * kTile, DPad);
      wmma::load_matrix_sync(bt, q_s + dt * kTile, DPad);
      wmma::mma_sync(s_acc, a, bt, s_acc);
      wmma::load_matrix_sync(a, v_w + dt * kTile, DPad);
      wmma::load_matrix_sync(bt, do_s + dt * kTile, DPad);
      wmma::mma_sync(dp_acc, a, bt, dp_acc);
    }
    wmma::store_matrix_sync(st_w, s_acc, kTile, wmma::mem_row_major);
    wmma::store_matrix_sync(dpt_w, dp_acc, kTile, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < kSq; e += 32) {
      const int key = e / kTile, query = e % kTile;
      const float logit = math::masked_logit(st_w[e], scale, key_visible[warp * kTile + key] != 0.f);
      const float p = math::prob_from_lse(logit, lse_s[query]);
      pt_w[e] = from_float<T>(p);
      dst_w[e] = from_float<T>(math::score_grad(p, dpt_w[e], delta_s[query], scale));
    }
    __syncwarp();

    for (int dt = 0; dt < DPad / kTile; ++dt) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> bm;
      // dV += P^T dO and dK += dS^T Q.
      wmma::load_matrix_sync(bm, do_s + dt * kTile, DPad);
      wmma::load_matrix_sync(a, pt_w, kTile);
      wmma::mma_sync(dv_acc[dt], a, bm, dv_acc[dt]);
      wmma::load_matrix_sync(bm, q_s + dt * kTile, DPad);
      wmma::load_matrix_sync(a, dst_w, kTile);
      wmma::mma_sync(dk_acc[dt], a, bm, dk_acc[dt]);
      // This warp's share of dQ = dS K: dS is dS^T read column-major.
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::col_major> ds;
      wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> dq_acc;
      wmma::fill_fragment(dq_acc, 0.f);
      wmma::load_matrix_sync(ds, dst_w, kTile);
      wmma::load_matrix_sync(bm, k_w + dt * kTile, DPad);
      wmma::mma_sync(dq_acc, ds, bm, dq_acc);
      wmma::store_matrix_sync(st_w, dq_acc, kTile, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < kSq; e += 32) {
        const int query = i0 + e / kTile, d = dt * kTile + e % kTile;
        if (query < q_len && d < dim) atomicAdd(dq_accum + (bh * q_len + query) * dim + d, st_w[e]);
      }
      __syncwarp();
    }
  }

  // Write this warp's 16 rows of dK and dV through shared staging.
  for (int dt = 0; dt < DPad / kTile; ++dt) {
    wmma::store_matrix_sync(st_w, dk_acc[dt], kTile, wmma::mem_row_major);
    wmma::store_matrix_sync(dpt_w, dv_acc[dt], kTile, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < kSq; e += 32) {
      const int key = j0 + warp * kTile + e / kTile, d = dt * kTile + e % kTile;
      if (key < kv_len && d < dim) {
        dk[(bh * kv_len + key) * dim + d] = from_float<T>(st_w[e]);
        dv[(bh * kv_len + key) * dim + d] = from_float<T>(dpt_w[e]);
      }
    }
    __syncwarp();
  }
}

int padded_head_dim(int64_t dim) {
  for (int d : {32, 64, 96, 128}) if (dim <= d) return d;
  TORCH_CHECK(false, "vlfast cuda cross_attention: head dim ", dim, " > 128 is not supported");
}

// Calls fn(std::integral_constant<int, DPad>{}, TypeTag<T>{}) for the padded head dim and the
// device type of the tensors.
template <typename Fn>
void dispatch_dtype_and_head_dim(at::ScalarType dtype, int64_t dim, Fn&& fn) {
  dispatch_half_types(dtype, "cross_attention", [&](auto type_tag) {
    switch (padded_head_dim(dim)) {
      case 32: fn(std::integral_constant<int, 32>{}, type_tag); break;
      case 64: fn(std::integral_constant<int, 64>{}, type_tag); break;
      case 96: fn(std::integral_constant<int, 96>{}, type_tag); break;
      default: fn(std::integral_constant<int, 128>{}, type_tag); break;
    }
  });
}

// Heads and batch are grid axes y and z, each limited to 65535 blocks.
void check_grid(int64_t batch, int64_t heads) {
  TORCH_CHECK(batch <= 65535 && heads <= 65535, "vlfast_C::cross_attention (cuda): batch and heads must be <= 65535, ",
              "got ", batch, " and ", heads, "; the triton backend has no such limit");
}

const bool* mask_ptr(const std::optional<at::Tensor>& kv_mask) {
  return kv_mask.has_value() ? kv_mask->data_ptr<bool>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_mask, double scale) {
  check_cross_attention(q, k, v, kv_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  constexpr int kWarps = 2;  // 32 query rows per block: the Q-Former's 32 queries in one tile
  check_grid(B, H);
  const dim3 grid((Lq + kTile * kWarps - 1) / (kTile * kWarps), H, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype_and_head_dim(q.scalar_type(), D, [&](auto dpad, auto type_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int DPad = decltype(dpad)::value;
    const size_t smem = ForwardSmem<T, DPad, kWarps>::bytes;
    auto kernel = cross_attention_forward_kernel<T, DPad, kWarps>;
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid, 32 * kWarps, smem, stream>>>(
        reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
        reinterpret_cast<const T*>(v.data_ptr()), mask_ptr(kv_mask), reinterpret_cast<T*>(out.data_ptr()),
        lse.data_ptr<float>(), (int)H, (int)Lq, (int)Lk, (int)D, (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& kv_mask, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  check_cross_attention_backward(dout, q, k, v, kv_mask, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty_like(k), dv = at::empty_like(v);
  constexpr int kWarps = 4;  // 64 keys per block
  check_grid(B, H);
  const dim3 grid((Lk + kTile * kWarps - 1) / (kTile * kWarps), H, B);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype_and_head_dim(q.scalar_type(), D, [&](auto dpad, auto type_tag) {
    using T = typename decltype(type_tag)::type;
    constexpr int DPad = decltype(dpad)::value;
    const size_t smem = BackwardSmem<T, DPad, kWarps>::bytes;
    auto kernel = cross_attention_backward_kernel<T, DPad, kWarps>;
    allow_dynamic_smem(kernel, smem);
    kernel<<<grid, 32 * kWarps, smem, stream>>>(
        reinterpret_cast<const T*>(dout.data_ptr()), reinterpret_cast<const T*>(q.data_ptr()),
        reinterpret_cast<const T*>(k.data_ptr()), reinterpret_cast<const T*>(v.data_ptr()),
        mask_ptr(kv_mask), lse.data_ptr<float>(), delta.data_ptr<float>(), dq_accum.data_ptr<float>(),
        reinterpret_cast<T*>(dk.data_ptr()), reinterpret_cast<T*>(dv.data_ptr()),
        (int)H, (int)Lq, (int)Lk, (int)D, (float)scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dq_accum.to(q.scalar_type()), dk, dv};
}

}  // namespace vlfast

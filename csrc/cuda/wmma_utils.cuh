// Helpers shared by the WMMA (tensor-core) kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace vlfast {
namespace wmma_utils {

constexpr int kTile = 16;  // WMMA m = n = k

template <typename T> struct TypeTag { using type = T; };

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Calls fn(TypeTag<__half>{}) or fn(TypeTag<__nv_bfloat16>{}) for an fp16 / bf16 tensor dtype.
template <typename Fn>
void dispatch_half_types(at::ScalarType dtype, const char* op, Fn&& fn) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "vlfast cuda ", op, ": fp16 or bf16 expected, got ",
              dtype);
  if (dtype == at::kHalf) fn(TypeTag<__half>{});
  else fn(TypeTag<__nv_bfloat16>{});
}

// Rows [row0, row0 + rows) x columns [col0, col0 + Cols) of a (len, dim) row-major matrix into a
// (rows, Cols) shared tile, zero outside the matrix; with `add`, plus a second such matrix. All
// threads of the block take part.
template <int Cols, typename T>
__device__ void load_tile(T* tile, const T* src, const T* add, int row0, int rows, int len, int col0, int dim) {
  for (int e = threadIdx.x; e < rows * Cols; e += blockDim.x) {
    const int r = e / Cols, c = e % Cols, row = row0 + r, col = col0 + c;
    float value = 0.f;
    if (row < len && col < dim) {
      value = to_float(src[(int64_t)row * dim + col]);
      if (add != nullptr) value += to_float(add[(int64_t)row * dim + col]);
    }
    tile[e] = from_float<T>(value);
  }
}

// Lets a kernel use more than the default 48 KiB of dynamic shared memory.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes) {
  // The opt-in limit differs by GPU (227 KiB on H100, 163 KiB on A100, 99 KiB on A10 / L4 / L40S):
  // a launch beyond it would fail with an unhelpful error, so say what this one needs.
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, "vlfast_C: this kernel configuration needs ", bytes / 1024, " KiB of shared memory per ",
              "block, this GPU allows ", limit / 1024, " KiB; use the triton or torch backend (backend='triton')");
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
  }
}

}  // namespace wmma_utils
}  // namespace vlfast

// Marks a function callable from both host and device code (plain inline in CPU-only builds).
#pragma once

#if defined(__CUDACC__)
#define VLFAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VLFAST_HOST_DEVICE inline
#endif

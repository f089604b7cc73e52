// Argument checks of the vlfast_C ops, run by the CPU and CUDA entry points before any kernel: the
// Python wrappers check the same, but torch.ops.vlfast_C.* can be called directly.
#pragma once

#include <initializer_list>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace vlfast {

// `name` has `shape` (-1: any size), is contiguous, and has `like`'s device and dtype (or `dtype`).
inline void check_arg(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape,
                      const at::Tensor& like, std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), op, ": ", name, " must be ", shape.size(),
              "-dimensional, got shape ", t.sizes());
  int64_t i = 0;
  for (int64_t size : shape) {
    TORCH_CHECK(size < 0 || t.size(i) == size, op, ": ", name, " must have size ", size, " in dim ", i,
                " (shape ", at::IntArrayRef(shape), ", -1 = any), got shape ", t.sizes());
    ++i;
  }
  const at::ScalarType expected = dtype.value_or(like.scalar_type());
  TORCH_CHECK(t.scalar_type() == expected, op, ": ", name, " must have dtype ", expected, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_floating(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, op,
              ": float32, float16 or bfloat16 expected, got ", t.scalar_type());
  TORCH_CHECK(t.numel() > 0, op, ": empty inputs, got shape ", t.sizes());
}

}  // namespace vlfast

// The vlfast_C operator library: schemas of the C++ kernels and their CPU / CUDA implementations.
// The public, differentiable ops (vlfast::*) are defined in Python (vlfast/ops) and call these.
#include <Python.h>
#include <torch/library.h>

#include "cross_attention.h"
#include "memvp_memory.h"
#include "routed_adapter.h"

TORCH_LIBRARY(vlfast_C, m) {
  m.def(
      "cross_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? kv_mask, float scale)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "cross_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? kv_mask,"
      " Tensor out, Tensor lse, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "memvp_memory_forward(Tensor x, Tensor z, Tensor key_pos, Tensor value_pos, float scale,"
      " float dropout_p, int seed) -> (Tensor out, Tensor pre)");
  m.def(
      "memvp_memory_backward(Tensor dout, Tensor x, Tensor z, Tensor key_pos, Tensor value_pos,"
      " Tensor pre, float scale, float dropout_p, int seed)"
      " -> (Tensor dx, Tensor dz, Tensor dkey_pos, Tensor dvalue_pos)");
  m.def(
      "routed_adapter_forward(Tensor x, Tensor router_input, Tensor router_weight, Tensor router_bias,"
      " Tensor down_weight, Tensor down_bias, Tensor up_weight, Tensor up_bias, float temperature, float scale,"
      " float dropout_p, int seed) -> Tensor");
  m.def(
      "routed_adapter_backward_rows(Tensor dout, Tensor x, Tensor weights, Tensor down_weight, Tensor down_bias,"
      " Tensor up_weight, Tensor up_bias, float scale, float dropout_p, int seed)"
      " -> (Tensor dx, Tensor ddown_weight, Tensor ddown_bias, Tensor dmixed_up, Tensor dmixed_bias)");
}

TORCH_LIBRARY_IMPL(vlfast_C, CPU, m) {
  m.impl("cross_attention_forward", &vlfast::cross_attention_forward_cpu);
  m.impl("cross_attention_backward", &vlfast::cross_attention_backward_cpu);
  m.impl("memvp_memory_forward", &vlfast::memvp_memory_forward_cpu);
  m.impl("memvp_memory_backward", &vlfast::memvp_memory_backward_cpu);
  m.impl("routed_adapter_forward", &vlfast::routed_adapter_forward_cpu);
  m.impl("routed_adapter_backward_rows", &vlfast::routed_adapter_backward_rows_cpu);
}

#ifdef VLFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(vlfast_C, CUDA, m) {
  m.impl("cross_attention_forward", &vlfast::cross_attention_forward_cuda);
  m.impl("cross_attention_backward", &vlfast::cross_attention_backward_cuda);
  m.impl("memvp_memory_forward", &vlfast::memvp_memory_forward_cuda);
  m.impl("memvp_memory_backward", &vlfast::memvp_memory_backward_cuda);
  m.impl("routed_adapter_forward", &vlfast::routed_adapter_forward_cuda);
  m.impl("routed_adapter_backward_rows", &vlfast::routed_adapter_backward_rows_cuda);
}
#endif

// A plain Python module: importing it loads the library above and tells how it was built.
static PyModuleDef vlfast_c_module = {PyModuleDef_HEAD_INIT, "_C", "vlfast C++/CUDA kernels", -1,
                                      nullptr};

PyMODINIT_FUNC PyInit__C() {
  PyObject* module = PyModule_Create(&vlfast_c_module);
  if (module == nullptr) return nullptr;
  PyModule_AddStringConstant(module, "torch_version", VLFAST_TORCH_VERSION);
  PyModule_AddStringConstant(module, "cuda_archs", VLFAST_CUDA_ARCHS);
  PyModule_AddStringConstant(module, "no_cuda_reason", VLFAST_NO_CUDA_REASON);
  return module;
}

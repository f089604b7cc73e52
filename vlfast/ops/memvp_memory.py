"""`memvp_memory`: MemVP's visual prompts as extra key/value rows of an FFN.

out = scale * dropout(silu(x (z + key_pos)^T)) (z + value_pos), x (B, L, D), z (B, M, D),
key_pos and value_pos (M, D). Same structure as cross_attention: checks, backend choice, the
kernels (triton, cuda, cpu) behind the custom ops `vlfast::memvp_memory_fwd` / `vlfast::memvp_memory_bwd`
with autograd, and the `torch` backend in plain PyTorch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlfast.ops.backends import HALF_DTYPES, MAX_WIDTH, Support, register_op, resolve_backend, support_reason
from vlfast.ops.checks import check_same_device, check_tensor, draw_dropout_seed
from vlfast.ops.glue import kernel, register_backward
from vlfast.ops.reference import memvp_memory_torch

# `auto`'s order per device type, fastest first: on CPU by benchmarks/test_memvp_memory.py (the cpu
# backend runs the CUDA kernels' arithmetic in scalar C++, to test it without a GPU); on an H200
# by `python -m vlfast.gpucheck` (benchmarks/results/gpu/h200-2026-11-30: at B=8 L=512 M=320
# D=4096 bf16 the forward took 130 us in plain PyTorch, 1105 us in triton, 18.8 ms in cuda; the
# second Triton version, in the rerun: forward 145 us against 131, forward + backward 1188 us
# against 568): plain PyTorch, until the GPU check has timed the present triton backend (cuBLAS's
# products with Triton kernels between them: projected 0.7x / 0.8x eager's time on an H100).
PREFERENCE = {"cpu": ("torch",), "cuda": ("torch",)}
SUPPORT = {
    "triton": Support(limits={"D": MAX_WIDTH}, note="any M; products by cuBLAS (torch.bmm), the passes "
                      "between them fused in Triton; fp32 products as PyTorch's fp32 matmul"),
    "cuda": Support(HALF_DTYPES, {"D": MAX_WIDTH}, note="tensor cores (sm_80+); any M, in tiles sized to the GPU's "
                    "shared memory", dtype_why="the cuda kernels run on tensor cores; use triton for float32"),
    "cpu": Support(limits={"D": MAX_WIDTH}, note="the CUDA kernels' arithmetic in scalar C++, for testing it (slow); "
                                               "computed in fp32"),
    "torch": Support(None, note="plain PyTorch in the input dtype (fp16: in fp32, which cannot overflow), "
                     "autograd"),
}
register_op("memvp_memory", SUPPORT, PREFERENCE)


def unsupported_reason(backend: str, x: Tensor, z: Tensor) -> str | None:
    return support_reason("memvp_memory", backend, x.dtype, {"D": x.shape[-1], "M": z.shape[1]})


@torch.library.custom_op("vlfast::memvp_memory_fwd", mutates_args=())
def memvp_memory_fwd(
    x: Tensor, z: Tensor, key_pos: Tensor, value_pos: Tensor, scale: float, dropout_p: float, seed: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(out, pre) on the named kernel backend (triton, cuda, cpu), for contiguous inputs; see
    `memvp_memory`. pre = x (z + key_pos)^T (B, L, M) in fp32, kept for backward: M / D of x's elements,
    and it spares the backward a recomputation over D."""
    return kernel(backend, "memvp_memory", "forward")(x, z, key_pos, value_pos, scale, dropout_p, seed)


@memvp_memory_fwd.register_fake
def _(x, z, key_pos, value_pos, scale, dropout_p, seed, backend):
    return torch.empty_like(x), x.new_empty((*x.shape[:2], z.shape[1]), dtype=torch.float32)


@torch.library.custom_op("vlfast::memvp_memory_bwd", mutates_args=())
def memvp_memory_bwd(
    dout: Tensor, x: Tensor, z: Tensor, key_pos: Tensor, value_pos: Tensor, pre: Tensor, scale: float,
    dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dz, dkey_pos, dvalue_pos) on the named backend."""
    return kernel(backend, "memvp_memory", "backward")(dout.contiguous(), x, z, key_pos, value_pos, pre, scale,
                                                           dropout_p, seed)


@memvp_memory_bwd.register_fake
def _(dout, x, z, key_pos, value_pos, pre, scale, dropout_p, seed, backend):
    return torch.empty_like(x), torch.empty_like(z), torch.empty_like(key_pos), torch.empty_like(value_pos)


register_backward(memvp_memory_fwd, memvp_memory_bwd, tensors=4)


def memvp_memory(
    x: Tensor,
    z: Tensor,
    key_pos: Tensor,
    value_pos: Tensor,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """scale * dropout(silu(x (z + key_pos)^T)) (z + value_pos), shape (B, L, D).

    x: (B, L, D) FFN inputs; z: (B, M, D) per-sample visual prompts; key_pos, value_pos: (M, D)
    shared learned rows. Dropout (probability dropout_p on the (B, L, M) activation) draws its
    seed from `generator` (torch's default CPU generator when None): the same generator state gives
    the same mask on every backend. Differentiable in x, z, key_pos and value_pos.
    """
    check_tensor("x", x, ndim=3, names="(B, L, D)")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    check_tensor("z", z, ndim=3, names="(B, M, D)", dtype=x.dtype)
    check_tensor("key_pos", key_pos, ndim=2, names="(M, D)", dtype=x.dtype)
    check_tensor("value_pos", value_pos, ndim=2, names="(M, D)", dtype=x.dtype)
    check_same_device(x=x, z=z, key_pos=key_pos, value_pos=value_pos)
    batch, length, dim = x.shape
    memory = z.shape[1]
    if z.shape[0] != batch or z.shape[2] != dim:
        raise ValueError(f"z must have shape ({batch}, M, {dim}) to match x, got {tuple(z.shape)}")
    for name, pos in (("key_pos", key_pos), ("value_pos", value_pos)):
        if tuple(pos.shape) != (memory, dim):
            raise ValueError(f"{name} must have shape (M, D) = ({memory}, {dim}), got {tuple(pos.shape)}")
    if min(x.shape) == 0 or memory == 0:
        raise ValueError(f"x and z need non-empty dims, got x {tuple(x.shape)} and z {tuple(z.shape)}")
    seed = draw_dropout_seed(dropout_p, generator)
    chosen = resolve_backend("memvp_memory", backend, x.device, lambda b: unsupported_reason(b, x, z))
    if chosen == "torch":
        return memvp_memory_torch(x, z, key_pos, value_pos, float(scale), float(dropout_p), seed)
    out, _ = memvp_memory_fwd(x.contiguous(), z.contiguous(), key_pos.contiguous(), value_pos.contiguous(),
                              float(scale), float(dropout_p), seed, chosen)
    return out

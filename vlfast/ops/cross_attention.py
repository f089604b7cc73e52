"""`cross_attention`: softmax(scale q k^T + mask) v, the Q-Former's attention to image tokens.

The public function checks its arguments and picks a backend. The kernels (triton, cuda, cpu) run
behind the custom op `vlfast::cross_attention_fwd`, whose autograd calls `vlfast::cross_attention_bwd`.
Both are registered with torch.library (real, fake and autograd implementations), so they trace as
single nodes under torch.compile. The `torch` backend is PyTorch's scaled_dot_product_attention
(the textbook chain for 16-bit training on CPU, where it is faster).
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlfast.ops.backends import HALF_DTYPES, Support, register_op, resolve_backend, support_reason
from vlfast.ops.checks import check_same_device, check_tensor
from vlfast.ops.glue import kernel, register_backward
from vlfast.ops.reference import cross_attention_torch

# `auto`'s order per device type, fastest first as measured at the Q-Former shape (B=32, masked): on
# CPU SDPA (the torch backend) by benchmarks/test_cross_attention.py; the cpu backend, scalar C++
# with the CUDA kernels' arithmetic, is there to test that arithmetic without a GPU, not for speed.
# On an H200 by `python -m vlfast.gpucheck` (benchmarks/results/gpu/h200-2026-11-30-rerun, CUDA
# events, host time included): SDPA, which the torch backend calls with the mask, beat every vlfast
# kernel in every dtype (bf16 forward 53 us against triton 83, forward + backward 431 against triton
# 1,049 and cuda 612; fp16 and fp32 alike), so plain PyTorch until a GPU check times them otherwise.
PREFERENCE = {"cpu": ("torch",), "cuda": ("torch",)}
SUPPORT = {
    "triton": Support(limits={"head dim": 256}, note="fp32 as 3-pass tf32"),
    "cuda": Support(HALF_DTYPES, {"head dim": 128}, note="tensor cores (sm_80+)",
                    dtype_why="the cuda kernels run on tensor cores; use triton for float32"),
    "cpu": Support(note="the CUDA kernels' arithmetic in scalar C++, for testing it (slow); computed in fp32"),
    "torch": Support(None, note="F.scaled_dot_product_attention (16-bit training on CPU: the textbook chain)"),
}
register_op("cross_attention", SUPPORT, PREFERENCE)


def unsupported_reason(backend: str, q: Tensor) -> str | None:
    """Why `backend` cannot take these (already validated) inputs, or None."""
    return support_reason("cross_attention", backend, q.dtype, {"head dim": q.shape[-1]})


@torch.library.custom_op("vlfast::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """(out, lse) for contiguous inputs on the named kernel backend (triton, cuda, cpu); see `cross_attention`."""
    return kernel(backend, "cross_attention", "forward")(q, k, v, kv_mask, scale)


@cross_attention_fwd.register_fake
def _(q, k, v, kv_mask, scale, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("vlfast::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None,
    out: Tensor, lse: Tensor, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) on the named backend."""
    return kernel(backend, "cross_attention", "backward")(dout.contiguous(), q, k, v, kv_mask, out, lse, scale)


@cross_attention_bwd.register_fake
def _(dout, q, k, v, kv_mask, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_backward(cross_attention_fwd, cross_attention_bwd, tensors=4, save_result=True)


def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_mask: Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """softmax(scale * q k^T, keys with kv_mask False excluded) v.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); kv_mask: optional (B, Lk) bool, True = attend.
    scale defaults to D ** -0.5. A query whose keys are all masked gets zeros (and zero gradients).
    Differentiable in q, k and v. backend: 'triton', 'cuda', 'cpu', 'torch' or 'auto' (default:
    the one set by `vlfast.ops.use_backend`, else automatic).
    """
    check_tensor("q", q, ndim=4, names="(B, H, Lq, D)")
    check_tensor("k", k, ndim=4, names="(B, H, Lk, D)", dtype=q.dtype)
    check_tensor("v", v, ndim=4, names="(B, H, Lk, D)", dtype=q.dtype)
    check_same_device(q=q, k=k, v=v, kv_mask=kv_mask)
    if not q.dtype.is_floating_point:
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    batch, heads, q_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(f"k must have shape ({batch}, {heads}, Lk, {head_dim}) to match q, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if min(q.shape) == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need non-empty dims, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if kv_mask is not None:
        check_tensor("kv_mask", kv_mask, ndim=2, names="(B, Lk)", dtype=torch.bool)
        if tuple(kv_mask.shape) != (batch, k.shape[2]):
            raise ValueError(f"kv_mask must have shape (B, Lk) = ({batch}, {k.shape[2]}), got {tuple(kv_mask.shape)}")
        kv_mask = kv_mask.contiguous()
    scale = head_dim**-0.5 if scale is None else float(scale)
    chosen = resolve_backend("cross_attention", backend, q.device, lambda b: unsupported_reason(b, q))
    if chosen == "torch":
        return cross_attention_torch(q, k, v, kv_mask, scale)
    out, _ = cross_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), kv_mask, scale, chosen)
    return out

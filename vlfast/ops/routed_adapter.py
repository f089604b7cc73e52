"""`routed_adapter`: LaVIN's mixture-of-modality adapter with its router.

out = x + scale * sum_e w_e (h W_u[e]^T + b_u[e]), h = dropout(x W_d^T + b_d),
w = softmax((router_input W_r^T + b_r) / temperature). Same structure as the other ops: checks,
backend choice, custom ops `vlfast::routed_adapter_fwd` / `vlfast::routed_adapter_bwd`.

The kernel backends compute the x-sized part of the backward (dx, dW_d, db_d, and the gradients of
the per-sample mixed up projection); `reference.routing_and_expert_grads` turns the latter into the
router's and the experts' gradients for every backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vlfast.ops import reference
from vlfast.ops.backends import HALF_DTYPES, MAX_WIDTH, Support, register_op, resolve_backend, support_reason
from vlfast.ops.checks import check_same_device, check_tensor, draw_dropout_seed
from vlfast.ops.glue import kernel, register_backward

MAX_RANK = 64
# `auto`'s order per device type, fastest first: on CPU by benchmarks/test_routed_adapter.py; on an
# H200 by `python -m vlfast.gpucheck` at 16384 tokens, D=4096, bf16 forward + backward: triton 2.05 ms,
# eager 3.10 ms, cuda 6.83 ms in the first run (benchmarks/results/gpu/h200-2026-11-30); triton 5.27 ms,
# eager 3.10 ms in the rerun with 64-bit offsets (h200-2026-11-30-rerun). Training takes the backward:
# plain PyTorch until the kernels are measured faster again.
PREFERENCE = {"cpu": ("torch", "cpu"), "cuda": ("torch",)}
SUPPORT = {
    "triton": Support(limits={"D": MAX_WIDTH, "rank": MAX_RANK}, note="fp32 as 3-pass tf32"),
    "cuda": Support(HALF_DTYPES, {"rank": MAX_RANK, "experts": 16}, note="tensor cores (sm_80+)",
                    dtype_why="the cuda kernels run on tensor cores; use triton for float32",
                    limit_why="csrc/cuda/routed_adapter.cu keeps the routing weights in shared memory"),
    "cpu": Support(limits={"D": MAX_WIDTH, "rank": MAX_RANK}, note="computed in fp32"),
    "torch": Support(None, note="the reference"),
}
register_op("routed_adapter", SUPPORT, PREFERENCE)

ARGUMENTS = ("x", "router_input", "router_weight", "router_bias", "down_weight", "down_bias", "up_weight", "up_bias")


def unsupported_reason(backend: str, x: Tensor, rank: int, experts: int) -> str | None:
    return support_reason("routed_adapter", backend, x.dtype, {"D": x.shape[-1], "rank": rank, "experts": experts})


@torch.library.custom_op("vlfast::routed_adapter_fwd", mutates_args=())
def routed_adapter_fwd(
    x: Tensor, router_input: Tensor, router_weight: Tensor, router_bias: Tensor, down_weight: Tensor,
    down_bias: Tensor, up_weight: Tensor, up_bias: Tensor, temperature: float, scale: float, dropout_p: float,
    seed: int, backend: str,
) -> Tensor:
    """The forward on the named backend, for contiguous inputs; see `routed_adapter`."""
    return kernel(backend, "routed_adapter", "forward")(x, router_input, router_weight, router_bias, down_weight,
                                                         down_bias, up_weight, up_bias, temperature, scale, dropout_p,
                                                         seed)


@routed_adapter_fwd.register_fake
def _(x, *args):
    return torch.empty_like(x)


@torch.library.custom_op("vlfast::routed_adapter_bwd", mutates_args=())
def routed_adapter_bwd(
    dout: Tensor, x: Tensor, router_input: Tensor, router_weight: Tensor, router_bias: Tensor,
    down_weight: Tensor, down_bias: Tensor, up_weight: Tensor, up_bias: Tensor, temperature: float, scale: float,
    dropout_p: float, seed: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of all eight tensor arguments, in their order."""
    dout = dout.contiguous()
    inputs = (x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight, up_bias)
    if backend == "torch":
        return reference.routed_adapter_backward(dout, *inputs, temperature, scale, dropout_p, seed)
    weights = reference.routing_weights(router_input, router_weight, router_bias, temperature)
    dx, ddown_weight, ddown_bias, dmixed_up, dmixed_bias = kernel(backend, "routed_adapter", "backward_rows")(
        dout, x, weights, down_weight, down_bias, up_weight, up_bias, scale, dropout_p, seed)
    drouter_input, drouter_weight, drouter_bias, dup_weight, dup_bias = reference.routing_and_expert_grads(
        weights, dmixed_up, dmixed_bias, router_input, router_weight, up_weight, up_bias, temperature)
    return dx, drouter_input, drouter_weight, drouter_bias, ddown_weight, ddown_bias, dup_weight, dup_bias


@routed_adapter_bwd.register_fake
def _(dout, *args):
    return tuple(torch.empty_like(t) for t in args[:8])


register_backward(routed_adapter_fwd, routed_adapter_bwd, tensors=8)


def routed_adapter(
    x: Tensor,
    router_input: Tensor,
    router_weight: Tensor,
    router_bias: Tensor,
    down_weight: Tensor,
    down_bias: Tensor,
    up_weight: Tensor,
    up_bias: Tensor,
    *,
    temperature: float = 10.0,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> Tensor:
    """x + scale * sum_e w_e (dropout(x W_d^T + b_d) W_u[e]^T + b_u[e]), (B, L, D).

    x (B, L, D); router_input (B, D) drives w = softmax((router_input W_r^T + b_r) / temperature)
    with router_weight (E, D), router_bias (E); down_weight (R, D), down_bias (R); up_weight
    (E, D, R), up_bias (E, D). Dropout (on h) draws its seed from `generator`. Differentiable in
    every tensor argument.
    """
    check_tensor("x", x, ndim=3, names="(B, L, D)")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    batch, _, dim = x.shape
    check_tensor("router_input", router_input, ndim=2, names="(B, D)", dtype=x.dtype)
    check_tensor("router_weight", router_weight, ndim=2, names="(E, D)", dtype=x.dtype)
    check_tensor("down_weight", down_weight, ndim=2, names="(R, D)", dtype=x.dtype)
    check_tensor("up_weight", up_weight, ndim=3, names="(E, D, R)", dtype=x.dtype)
    experts, rank = router_weight.shape[0], down_weight.shape[0]
    check_tensor("router_bias", router_bias, ndim=1, names="(E,)", dtype=x.dtype)
    check_tensor("down_bias", down_bias, ndim=1, names="(R,)", dtype=x.dtype)
    check_tensor("up_bias", up_bias, ndim=2, names="(E, D)", dtype=x.dtype)
    expected = {
        "router_input": (batch, dim), "router_weight": (experts, dim), "router_bias": (experts,),
        "down_weight": (rank, dim), "down_bias": (rank,), "up_weight": (experts, dim, rank), "up_bias": (experts, dim),
    }
    given = dict(zip(ARGUMENTS, (x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight,
                                 up_bias), strict=True))
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x {tuple(x.shape)}, {experts} experts and rank "
                             f"{rank}, got {tuple(given[name].shape)}")
    check_same_device(**given)
    if min(x.shape) == 0 or experts == 0 or rank == 0:
        raise ValueError(f"x, the experts and the rank must be non-empty, got x {tuple(x.shape)}, "
                         f"E={experts}, R={rank}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    seed = draw_dropout_seed(dropout_p, generator)
    chosen = resolve_backend("routed_adapter", backend, x.device, lambda b: unsupported_reason(b, x, rank, experts))
    return routed_adapter_fwd(*(t.contiguous() for t in given.values()), float(temperature), float(scale),
                              float(dropout_p), seed, chosen)

"""What every op shares around its kernels: the backend's kernel functions by name, and the
torch.library glue, a forward custom op whose gradient is a backward custom op (both with fake
implementations), so torch.compile traces each as a single node."""
from __future__ import annotations

import importlib
from collections.abc import Callable

from torch.library import CustomOpDef

from vlfast._extension import cpp_ops


def register_backward(forward: CustomOpDef, backward: CustomOpDef, *, tensors: int, save_result: bool = False) -> None:
    """Make `forward(*tensors, *args)` differentiable through `backward(dout, *tensors, [result,]
    *saved, *args)`, which returns the gradients of the leading tensor arguments. `forward` returns
    the result, or (result, *saved): tensors kept for backward, not differentiable. With
    `save_result` the result is kept too."""

    def setup_context(ctx, inputs, output):
        result, *saved = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*inputs[:tensors], *((result,) if save_result else ()), *saved)
        ctx.args = inputs[tensors:]
        if saved:
            ctx.mark_non_differentiable(*saved)

    def gradients(ctx, dout, *_):
        grads = backward(dout, *ctx.saved_tensors, *ctx.args)
        return (*grads, *[None] * (tensors + len(ctx.args) - len(grads)))

    forward.register_autograd(gradients, setup_context=setup_context)


def kernel(backend: str, op: str, part: str) -> Callable:
    """`{op}_{part}` (e.g. memvp_memory_forward) of a backend: from vlfast.ops.reference for torch,
    vlfast.kernels.{op} for triton (imported on first use: Triton compiles lazily), vlfast._C's ops
    for cpu and cuda."""
    if backend == "torch":
        from vlfast.ops import reference

        return getattr(reference, f"{op}_{part}")
    if backend == "triton":
        return getattr(importlib.import_module(f"vlfast.kernels.{op}"), f"{op}_{part}")
    return getattr(cpp_ops(), f"{op}_{part}")

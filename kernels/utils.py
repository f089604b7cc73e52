"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

_poison = False


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_options(x: torch.Tensor, interpret: bool | None = None) -> dict:
    """tl.dot settings for inputs like x: DOT_FP32 computes bf16 dots in fp32 under the interpreter
    (which multiplies raw bf16 bit patterns); fp32 inputs keep fp32 accuracy on tensor cores with
    3-pass tf32."""
    interpret = interpreting() if interpret is None else interpret
    return {
        "DOT_FP32": x.dtype == torch.bfloat16 and interpret,
        "PRECISION": "tf32x3" if x.dtype == torch.float32 else "tf32",
    }


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel writes a result of `dtype` in. Triton's interpreter converts fp32 to bf16
    by truncation where GPUs round to nearest, so under it bf16 results are written in fp32 and
    the launcher rounds them with torch (`.to(dtype)`, a no-op on GPUs)."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output buffer; NaN-filled inside `poisoned_outputs()` so that tests see any
    element a kernel failed to write."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _poison else out


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant of a Triton kernel, for the ahead-of-time GPU report."""

    fn: Callable
    signature: dict[str, str]  # runtime argument -> Triton type ("*fp16", "i32", ...)
    constexprs: dict[str, object]
    num_warps: int
    label: str  # the problem it is configured for
    num_stages: int | None = None  # None: Triton's default
    # Integer arguments' values at that problem: Triton's JIT compiles a launch knowing which are
    # multiples of 16 (vectorised, pipelined loads), so the report must know them too.
    sizes: dict[str, int] = field(default_factory=dict)
    matrix: bool = True  # runs tl.dot products, so must use tensor cores

    def divisible_by_16(self) -> list[str]:
        """The arguments Triton's JIT marks as multiples of 16 for this problem: pointers (PyTorch
        allocates 16-byte aligned) and the integers that are."""
        return [arg for arg, kind in self.signature.items()
                if kind.startswith("*") or (arg in self.sizes and self.sizes[arg] % 16 == 0)]


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def pointer_type(dtype: torch.dtype) -> str:
    return "*" + _TRITON_TYPES[dtype]


def dropout_threshold(p: float) -> int:
    """Dropout drops an element when the top 24 bits of its hash fall below this."""
    return int(p * (1 << 24))


def dropout_args(dropout_p: float, seed: int) -> dict:
    """The runtime arguments of `dropout_factor` for a drop probability and seed."""
    return {"keep_scale": 1.0 / (1.0 - dropout_p), "seed": seed, "threshold": dropout_threshold(dropout_p)}


@triton.jit
def dropout_factor(seed, offsets, threshold, keep_scale):
    """0 for a dropped element, keep_scale for a kept one; offsets are the elements' row-major
    indices in the dropped tensor. The hash of csrc/dropout_math.h and vlfast/ops/reference.py."""
    # tl.cast, not .to: the JIT passes an integer argument equal to 1 as a constant, which has no .to.
    x = offsets.to(tl.uint32) * 0x9E3779B1 + tl.cast(seed, tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    return tl.where((x >> 8) >= tl.cast(threshold, tl.uint32), keep_scale, 0.0)


@triton.jit
def drop_and_save(hidden, grad, hidden_ptr, grad_ptr, offsets, mask, seed, threshold, keep_scale,
                  DROPOUT: tl.constexpr):
    """Backward helper: apply the dropout mask of the elements at `offsets` (their row-major indices
    in the dropped tensor) to an activation and to the gradient of its pre-dropout value, store both
    (in the pointers' dtypes) there, and return the masked gradient."""
    if DROPOUT:
        keep = dropout_factor(seed, offsets, threshold, keep_scale)
        hidden = hidden * keep
        grad = grad * keep
    tl.store(hidden_ptr + offsets, hidden, mask=mask)
    tl.store(grad_ptr + offsets, grad, mask=mask)
    return grad

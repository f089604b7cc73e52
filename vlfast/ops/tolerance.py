"""flash-attention's tolerance rule, shared by the tests and `python -m vlfast.gpucheck`: a kernel's
error against a float64 reference may be at most `factor` times the error of the plain PyTorch op
computed in the same dtype (2 for outputs, 3 for gradients). Two errors no implementation can avoid
are not counted: rounding the result to its dtype (half an ulp at the result's scale), and fp32
accumulation noise (16 ulp of fp32 at unit scale), which matters where the exact result is 0 by
cancellation (e.g. dq with a single key) and the plain op hits 0 by luck of rounding. With few
elements the plain op can also be luckily close.

On inputs built so that an op's fp16 intermediates pass 65504 while its results do not, the plain
fp16 op gives inf and bounds nothing: there the yardstick is the op computed in fp32 and rounded to
fp16 (`plain_forward_backward`), since a kernel must stay finite wherever fp32 does."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

FP32_NOISE = 16 * torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float  # max |got - ref64|
    plain_error: float  # max |plain - ref64|
    bound: float  # factor * plain_error + the unavoidable floor
    nan: bool  # the result holds NaN (an element left unwritten in poisoned outputs, or overflow)

    @property
    def ok(self) -> bool:
        return not self.nan and self.error <= self.bound

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def __str__(self) -> str:
        if self.nan:
            return f"{self.name}: NaN in result (an element was left unwritten?)"
        return (f"{self.name}: max error {self.error:.3e} vs bound {self.bound:.3e} "
                f"(plain PyTorch {self.plain_error:.3e})")


def compare(name: str, got: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, factor: float) -> Comparison:
    nan = bool(got.isnan().any())
    err = (got.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    floor = FP32_NOISE * max(scale, 1.0) + 0.5 * torch.finfo(got.dtype).eps * scale
    return Comparison(name, err, plain_err, factor * plain_err + floor, nan)


def assert_close_to_reference(
    name: str, got: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, factor: float
) -> None:
    result = compare(name, got, ref64, plain, factor)
    assert result.ok, str(result)


def forward_backward(
    fn: Callable, tensors: Sequence[torch.Tensor], dout: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn's output and the gradients of its tensor arguments, run in `dtype` on copies of tensors
    (no backward, and no gradients, when dout is None)."""
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(dout is not None) for t in tensors]
    out = fn(*leaves)
    if dout is None:
        return out.detach(), []
    out.backward(dout.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def plain_forward_backward(
    fn: Callable, tensors: Sequence[torch.Tensor], dout: torch.Tensor | None, dtype: torch.dtype,
    fp32_intermediates: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The plain op's results in `dtype`, the rule's yardstick; with fp32_intermediates, computed in
    fp32 and rounded to `dtype`."""
    if not fp32_intermediates:
        return forward_backward(fn, tensors, dout, dtype)
    out, grads = forward_backward(fn, tensors, dout, torch.float32)
    return out.to(dtype), [g.to(dtype) for g in grads]


def seed_of(generator_seed: int) -> int:
    """The dropout seed an op draws from a generator seeded with generator_seed."""
    generator = torch.Generator().manual_seed(generator_seed)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())

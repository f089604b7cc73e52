"""flash-attention's tolerance rule: a kernel's error against a float64 reference may be at most
`factor` times the error of the plain PyTorch op computed in the same dtype (2 for outputs, 3 for
gradients). Two errors no implementation can avoid are not counted: rounding the result to its
dtype (half an ulp at the result's scale), and fp32 accumulation noise (16 ulp of fp32 at unit
scale), which matters where the exact result is 0 by cancellation (e.g. dq with a single key) and
the plain op hits 0 by luck of rounding. With few elements the plain op can also be luckily close."""
from __future__ import annotations

import torch

FP32_NOISE = 16 * torch.finfo(torch.float32).eps


def assert_close_to_reference(
    name: str, got: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, factor: float
) -> None:
    assert not got.isnan().any(), f"{name}: NaN in result (an element was left unwritten?)"
    err = (got.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    floor = FP32_NOISE * max(scale, 1.0) + 0.5 * torch.finfo(got.dtype).eps * scale
    bound = factor * plain_err + floor
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x plain PyTorch's {plain_err:.3e} + {floor:.1e}"


def forward_backward(fn, tensors, dout, dtype):
    """fn's output and the gradients of its tensor arguments, run in `dtype` on copies of tensors."""
    leaves = [t.detach().to(dtype, copy=True).requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dout.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def seed_of(generator_seed: int) -> int:
    """The dropout seed an op draws from a generator seeded with generator_seed."""
    generator = torch.Generator().manual_seed(generator_seed)
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())

"""flash-attention's tolerance rule: a kernel's error against a float64 reference may be at most
`factor` times the error of the plain PyTorch op computed in the same dtype (2 for outputs, 3 for
gradients). Errors below fp32 accumulation noise (16 ulp of fp32 at unit scale) are not counted:
where the exact result is 0 by cancellation (e.g. dq with a single key) the plain op can hit 0
exactly by luck of rounding while any other summation order cannot."""
from __future__ import annotations

import torch

FP32_NOISE = 16 * torch.finfo(torch.float32).eps


def assert_close_to_reference(
    name: str, got: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor, factor: float
) -> None:
    assert not got.isnan().any(), f"{name}: NaN in result (an element was left unwritten?)"
    err = (got.double() - ref64).abs().max().item()
    plain_err = (plain.double() - ref64).abs().max().item()
    floor = FP32_NOISE * max(ref64.abs().max().item(), 1.0)
    bound = factor * plain_err + floor
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x plain PyTorch's {plain_err:.3e} + {floor:.1e}"

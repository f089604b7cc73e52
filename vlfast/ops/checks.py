"""Argument checks shared by the ops: each error names the argument and what was expected."""
from __future__ import annotations

import torch


def check_tensor(
    name: str, value: object, *, ndim: int, names: str, dtype: torch.dtype | None = None
) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {names}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional {names}, got shape {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {value.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def draw_dropout_seed(dropout_p: float, generator: torch.Generator | None) -> int:
    """Checks dropout_p and draws the seed of the counter-based dropout mask (0 without dropout)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return 0
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())

"""Helpers shared by the Triton launchers."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_poison = False


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

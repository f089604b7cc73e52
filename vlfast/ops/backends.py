"""Backend selection shared by all ops.

Every op has four backends: `triton` (fused Triton kernels), `cuda` and `cpu` (the C++ kernels of
vlfast._C) and `torch` (plain PyTorch, also the reference). A backend is picked per call
(`backend=`), for a block of code (`use_backend`), or automatically. Each op describes, per
backend, what it supports: `unsupported_reason(...)` returns why a backend cannot take an input,
or None when it can.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator

import torch

from vlfast._extension import extension_status

BACKENDS = ("triton", "cuda", "cpu", "torch")
AUTO = "auto"

_default_backend = AUTO

# op name -> backend -> what that backend supports, filled in by each op's module; read by
# `python -m vlfast.info`.
OP_SUPPORT: dict[str, dict[str, str]] = {}
# op name -> device type -> auto's order (torch last), also read by `python -m vlfast.info`.
OP_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {}


def register_op(name: str, supports: dict[str, str], preference: dict[str, tuple[str, ...]]) -> None:
    assert set(supports) == set(BACKENDS), f"{name} must describe every backend"
    OP_SUPPORT[name] = supports
    OP_PREFERENCE[name] = {device: auto_order(order) for device, order in preference.items()}


def auto_order(preference: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*preference, "torch")))


class BackendUnsupportedError(RuntimeError):
    """The requested backend cannot run this input; the message says why."""


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every vlfast op in the block on backend `name` ('auto' restores automatic choice)."""
    global _default_backend
    _check_name(name)
    previous, _default_backend = _default_backend, name
    try:
        yield
    finally:
        _default_backend = previous


def _check_name(name: str) -> None:
    if name != AUTO and name not in BACKENDS:
        raise ValueError(f"backend must be one of {(AUTO, *BACKENDS)}, got {name!r}")


# Read once: both are fixed for the life of the process, and constants keep torch.compile tracing
# the backend choice without graph breaks.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EXTENSION = extension_status()


def triton_device_reason(device: torch.device) -> str | None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter."""
    if device.type == "cuda" or (device.type == "cpu" and TRITON_INTERPRET):
        return None
    if device.type == "cpu":
        return "triton needs CUDA tensors (or TRITON_INTERPRET=1, set before triton is imported, for CPU)"
    return f"triton does not run on {device.type} tensors"


def extension_device_reason(device: torch.device) -> str | None:
    """The C++ kernels: `cpu` on CPU tensors, `cuda` on CUDA tensors when built with CUDA for a
    compute capability that runs on the tensors' GPU."""
    if not EXTENSION.loaded:
        return EXTENSION.reason
    if device.type == "cuda":
        if not EXTENSION.has_cuda_kernels:
            return "vlfast._C was built without CUDA kernels (see `python -m vlfast.info`)"
        return _capability_reason(torch.cuda.current_device() if device.index is None else device.index)
    return None


@functools.cache
def _capability_reason(index: int) -> str | None:
    return EXTENSION.cuda_device_reason(torch.cuda.get_device_capability(index))


def device_reason(backend: str, device: torch.device) -> str | None:
    if backend == "triton":
        return triton_device_reason(device)
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            return f"the {backend} backend takes {backend.upper()} tensors, got {device.type} tensors"
        return extension_device_reason(device)
    return None


def resolve_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    unsupported_reason: Callable[[str], str | None],
    preference: dict[str, tuple[str, ...]],
) -> str:
    """The backend to run `op` on. `unsupported_reason(backend)` covers the input's dtype and shape;
    device checks are added here. `preference` is the op's measured fastest-first order per device
    type for `auto`; `torch` (plain PyTorch) closes every order."""
    name = _default_backend if requested is None else requested
    _check_name(name)

    def reason(backend: str) -> str | None:
        return device_reason(backend, device) or unsupported_reason(backend)

    if name != AUTO:
        why = reason(name)
        if why is not None:
            raise BackendUnsupportedError(f"vlfast.ops.{op}: backend {name!r} cannot run this input: {why}")
        return name
    order = auto_order(preference.get(device.type, ()))
    for backend in order:
        if reason(backend) is None:
            return backend
    raise BackendUnsupportedError(
        f"vlfast.ops.{op}: no backend can run this input: "
        + "; ".join(f"{b}: {reason(b)}" for b in order)
    )


def machine_reason(backend: str) -> str | None:
    """Why `backend` cannot run at all on this machine, or None."""
    has_gpu = torch.cuda.is_available()
    if backend == "triton":
        if has_gpu or TRITON_INTERPRET:
            return None
        return "no CUDA device (TRITON_INTERPRET=1 runs it on CPU tensors, slowly, for testing)"
    if backend in ("cpu", "cuda") and not EXTENSION.loaded:
        return EXTENSION.reason
    if backend == "cuda":
        if not EXTENSION.has_cuda_kernels:
            return f"vlfast._C was built without CUDA kernels ({EXTENSION.no_cuda_reason})"
        if not has_gpu:
            return f"built for sm_{', sm_'.join(EXTENSION.cuda_archs)} but there is no CUDA device"
        return _capability_reason(torch.cuda.current_device())
    return None

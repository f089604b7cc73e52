"""Backend selection shared by all ops.

Every op has four backends: `triton` (fused Triton kernels), `cuda` and `cpu` (the C++ kernels of
vlfast._C; `cpu` runs the CUDA kernels' arithmetic in scalar C++, to test it without a GPU, not for
speed) and `torch` (plain PyTorch, what `auto` runs on CPU). A backend is picked per call
(`backend=`), for a block of code (`use_backend`), or automatically. Each op describes, per
backend, what it supports: `unsupported_reason(...)` returns why a backend cannot take an input,
or None when it can.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from vlfast._extension import extension_status

BACKENDS = ("triton", "cuda", "cpu", "torch")
AUTO = "auto"

_default_backend = AUTO

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_WIDTH = 8192  # the widest hidden size the kernels are tested at (LLaMA-65B)
TENSORS = {"triton": "CUDA tensors", "cuda": "CUDA tensors", "cpu": "CPU tensors", "torch": "any device"}


@dataclass(frozen=True)
class Support:
    """What one backend of an op takes: dtypes (None: any floating dtype), upper limits on named
    sizes, and notes: how it computes, why a dtype or a limit holds. The refusal messages and
    `python -m vlfast.info` are written from it."""

    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES
    limits: dict[str, int] = field(default_factory=dict)
    note: str = ""  # how it computes, shown by vlfast.info
    dtype_why: str = ""  # appended to a dtype refusal
    limit_why: str = ""  # appended to a size refusal

    def describe(self, backend: str) -> str:
        dtypes = "any floating dtype" if self.dtypes is None else ", ".join(_name(d) for d in self.dtypes)
        limits = [f"{name} <= {limit}" for name, limit in self.limits.items()]
        return "; ".join([dtypes, *limits, TENSORS[backend], *([self.note] if self.note else [])])

    def reason(self, backend: str, dtype: torch.dtype, sizes: dict[str, int]) -> str | None:
        if self.dtypes is not None and dtype not in self.dtypes:
            why = f": {self.dtype_why}" if self.dtype_why else ""
            return f"{backend} supports {', '.join(_name(d) for d in self.dtypes)}, got {_name(dtype)}{why}"
        for name, limit in self.limits.items():
            if sizes[name] > limit:
                why = f" ({self.limit_why})" if self.limit_why else ""
                return f"{backend} supports {name} <= {limit}, got {sizes[name]}{why}"
        return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# op name -> backend -> what it supports; op name -> device type -> auto's order (torch last). Filled
# in by each op's module; read by `python -m vlfast.info`.
OP_SUPPORT: dict[str, dict[str, Support]] = {}
OP_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {}


def register_op(name: str, support: dict[str, Support], preference: dict[str, tuple[str, ...]]) -> None:
    assert set(support) == set(BACKENDS), f"{name} must describe every backend"
    OP_SUPPORT[name] = support
    OP_PREFERENCE[name] = {device: auto_order(order) for device, order in preference.items()}


def support_reason(op: str, backend: str, dtype: torch.dtype, sizes: dict[str, int]) -> str | None:
    """Why `backend` of `op` cannot take inputs of this dtype and these named sizes, or None."""
    return OP_SUPPORT[op][backend].reason(backend, dtype, sizes)


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
) -> str:
    """The backend to run `op` on. `unsupported_reason(backend)` covers the input's dtype and shape;
    device checks are added here. `auto` tries the op's registered fastest-first order for the
    device type (`register_op`); `torch` (plain PyTorch) closes every order."""
    name = _default_backend if requested is None else requested
    _check_name(name)

    def reason(backend: str) -> str | None:
        return device_reason(backend, device) or unsupported_reason(backend)

    if name != AUTO:
        why = reason(name)
        if why is not None:
            raise BackendUnsupportedError(f"vlfast.ops.{op}: backend {name!r} cannot run this input: {why}")
        return name
    order = OP_PREFERENCE[op].get(device.type, ("torch",))
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

"""`python -m vlfast.info`: versions, how vlfast._C was built, and which backend of each op can run
on this machine (and why the others cannot)."""
from __future__ import annotations

import platform
from importlib import metadata

import torch

import vlfast
from vlfast.ops.backends import BACKENDS, EXTENSION, OP_PREFERENCE, OP_SUPPORT, TRITON_INTERPRET, machine_reason


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"vlfast {vlfast.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"triton {_version('triton')}, transformers {_version('transformers')}",
        f"CUDA devices: {torch.cuda.device_count()}; TRITON_INTERPRET={'1' if TRITON_INTERPRET else 'unset'}",
    ]
    if EXTENSION.loaded:
        kernels = (f"CPU and CUDA kernels for sm_{', sm_'.join(EXTENSION.cuda_archs)}"
                   if EXTENSION.has_cuda_kernels else f"CPU kernels only (no CUDA: {EXTENSION.no_cuda_reason})")
        lines.append(f"extension vlfast._C: built, {kernels}")
    else:
        lines.append(f"extension vlfast._C: unavailable: {EXTENSION.reason}")
    lines.append("")
    for op, supports in OP_SUPPORT.items():
        lines.append(f"{op}:")
        for backend in BACKENDS:
            why = machine_reason(backend)
            state = "available" if why is None else f"unavailable: {why}"
            lines.append(f"  {backend:7} {state}")
            lines.append(f"  {'':7} supports {supports[backend].describe(backend)}")
        orders = "; ".join(f"{device.upper()} tensors: {', '.join(order)}"
                           for device, order in OP_PREFERENCE[op].items())
        lines.append(f"  auto    the first that takes the input, fastest measured first: {orders}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

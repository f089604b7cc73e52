"""Loading the compiled extension vlfast._C, and why it may be missing."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    reason: str  # why it is not loaded; empty when it is
    cuda_archs: tuple[str, ...] = ()  # compute capabilities the CUDA kernels were built for
    no_cuda_reason: str = ""  # why the build skipped the CUDA kernels

    @property
    def has_cuda_kernels(self) -> bool:
        return bool(self.cuda_archs)

    def cuda_device_reason(self, capability: tuple[int, int]) -> str | None:
        """Why the CUDA kernels cannot run on a GPU of this compute capability, or None. Machine code
        for sm_XY runs on X.Z with Z >= Y; the build also embeds PTX of its newest arch, which the
        driver compiles for any later GPU."""
        built = [(int(a[:-1]), int(a[-1])) for a in self.cuda_archs]
        if any(major == capability[0] and minor <= capability[1] for major, minor in built) or (
                built and capability >= max(built)):
            return None
        gpu = f"{capability[0]}{capability[1]}"
        return (f"vlfast._C was built for sm_{', sm_'.join(self.cuda_archs)} (with PTX of the newest); this GPU is "
                f"sm_{gpu}: rebuild with VLFAST_CUDA_ARCHS={gpu} pip install --no-build-isolation -e .")


@functools.cache
def extension_status() -> ExtensionStatus:
    try:
        from vlfast import _C
    except ImportError as error:
        return ExtensionStatus(False, f"vlfast._C is not built or failed to load ({error})")
    if _C.torch_version != torch.__version__:
        # Registering ops compiled against another torch risks crashes: refuse to use them.
        return ExtensionStatus(
            False,
            f"vlfast._C was built against torch {_C.torch_version} but torch {torch.__version__} is "
            "running; rebuild with `pip install --no-build-isolation -e .`",
        )
    archs = tuple(a for a in _C.cuda_archs.split(";") if a)
    status = ExtensionStatus(True, "", archs, _C.no_cuda_reason)
    if torch.cuda.is_available() and not archs:
        warnings.warn(f"vlfast._C has no CUDA kernels ({status.no_cuda_reason}); "
                      "the cuda backend is unavailable", stacklevel=2)
    return status


def cpp_ops():
    """torch.ops.vlfast_C, the C++/CUDA kernels; raises if the extension cannot be used."""
    status = extension_status()
    if not status.loaded:
        raise RuntimeError(status.reason)
    return torch.ops.vlfast_C

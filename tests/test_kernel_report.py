"""The static GPU report: every kernel compiles for sm_80 / sm_90 without spills, and every matrix
kernel runs its products on tensor cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from vlfast.kernels import report


def without_interpreter(*args: str) -> subprocess.CompletedProcess:
    """Python run with these arguments: compiling for a GPU needs real @triton.jit functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[report.KernelResources]:
    path = tmp_path_factory.mktemp("report") / "report.json"
    done = without_interpreter("-m", "vlfast.kernels.report", "--json", str(path))
    assert path.exists(), done.stderr[-3000:]
    return [report.KernelResources(**row) for row in json.loads(path.read_text())]


def test_triton_kernels_have_no_spills_and_use_tensor_cores(rows):
    triton_rows = [r for r in rows if r.source == "triton"]
    assert {r.arch for r in triton_rows} == set(report.ARCHS)
    assert {r.kernel for r in triton_rows} >= {"cross_attention_fwd_kernel", "cross_attention_bwd_kernel"}
    assert report.problems(triton_rows) == []
    assert all(0 < r.registers <= 255 for r in triton_rows)


def test_cuda_kernels_have_no_spills_and_use_tensor_cores(rows):
    if report.extension_library() is None:
        pytest.skip("vlfast._C was built without CUDA kernels (VLFAST_SKIP_CUDA_BUILD or no nvcc)")
    cuda_rows = [r for r in rows if r.source == "cuda"]
    assert {r.kernel for r in cuda_rows} >= {"cross_attention_forward_kernel", "cross_attention_backward_kernel"}
    assert report.problems(cuda_rows) == []
    # PTX of the newest arch rides along, for GPUs newer than the machine code.
    ptx = subprocess.run([report.cuobjdump(), "--list-ptx", report.extension_library()], capture_output=True,
                         text=True, check=True).stdout
    assert all(f"{op}.sm_" in ptx for op in ("cross_attention", "memvp_memory", "routed_adapter")), ptx


def test_problems_flags_spills_shared_memory_and_missing_tensor_cores(rows):
    good = next(r for r in rows if r.matrix_kernel)
    spilled = report.KernelResources(**{**good.__dict__, "spill_bytes": 64})
    stacked = report.KernelResources(**{**good.__dict__, "spill_bytes": -1, "stack_bytes": 3712})
    scalar = report.KernelResources(**{**good.__dict__, "hmma": 0, "hgmma": 0})
    hungry = report.KernelResources(**{**good.__dict__, "shared_bytes": 400_000})
    found = report.problems([good, spilled, stacked, scalar, hungry])
    assert len(found) == 4
    assert "register spills" in found[0] and "register spills" in found[1]
    assert "without tensor-core" in found[2] and "more than sm_" in found[3]


def test_kernels_compile_as_the_jit_would_launch_them():
    """Triton's JIT marks pointers and multiples of 16 so; compiled without those marks a kernel's
    loads are neither vectorised nor pipelined, which is not what runs."""
    from vlfast.kernels import cross_attention

    marked = cross_attention.report_specs()[0].divisible_by_16()
    assert {"q_ptr", "k_ptr", "q_len", "head_dim"} <= set(marked) and "kv_len" not in marked  # Lk = 257
    compare = ("from dataclasses import replace\n"
               "from vlfast.kernels import cross_attention, report\n"
               "spec = cross_attention.report_specs()[0]\n"
               "for s in (spec, replace(spec, sizes={})):\n"
               "    print(report.compile_triton('cross_attention', s, 90).shared_bytes)\n")
    done = without_interpreter("-c", compare)
    as_launched, unmarked = map(int, done.stdout.split())
    assert as_launched > unmarked, done.stderr[-2000:]  # pipelined: several stages' tiles in shared memory


def test_kernels_compile_with_integer_arguments_equal_to_one():
    """Triton's JIT passes an integer argument equal to 1 (a dropout seed, a batch of one) as a
    constant, which has no `.to`: every kernel must compile so too (the interpreter never does)."""
    script = ("from dataclasses import replace\n"
              "from vlfast.kernels import report\n"
              "for op, specs in report.SPEC_SOURCES.items():\n"
              "    seen = set()\n"
              "    for spec in specs():\n"
              "        ints = {a for a, kind in spec.signature.items() if kind == 'i32'}\n"
              "        if spec.fn in seen or not ints:\n"
              "            continue\n"
              "        seen.add(spec.fn)\n"
              "        ones = replace(spec, signature={a: k for a, k in spec.signature.items() if a not in ints},\n"
              "                       constexprs={**spec.constexprs, **dict.fromkeys(ints, 1)}, sizes={})\n"
              "        report.compile_triton(op, ones, 90)\n"
              "        print(spec.fn.__name__)\n")
    done = without_interpreter("-c", script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"memvp_activation_kernel", "cross_attention_fwd_kernel"} <= set(done.stdout.split())

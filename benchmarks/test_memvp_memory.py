"""memvp_memory (MemVP's FFN memory).

Measured: CPU wall time of each backend that runs here against the eager PyTorch chain, forward and
forward + backward, at a CPU-sized shape.
Projected (no GPU here): H100 (and H200) bytes, FLOPs and time of the triton backend as launched
(cuBLAS's products and the Triton kernels between them; forward, and backward) against the floor,
the eager chain and a deliberately worse launch at LLaMA-7B's shape (D = 4096, M = 320, L = 512);
and the LLM FLOPs per sample of memory-space prompting against putting the same 256 visual tokens in
the input sequence.

    pytest benchmarks/test_memvp_memory.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.interleaved import TOLERANCE, interleaved_medians
from benchmarks.results import save_bar_chart, save_projection
from vlfast.costmodel import (
    H100,
    H200,
    LLMS,
    Hardware,
    Launch,
    MemVPShape,
    Stack,
    chain_seconds,
    memvp_config,
    memvp_eager,
    memvp_floor,
    memvp_triton,
)
from vlfast.ops import memvp_memory
from vlfast.ops.reference import memvp_memory_autograd

CPU_SHAPE = (1, 128, 128, 1024)  # (B, L, M, D)
LLAMA_7B = Stack.from_config(LLMS["llama-7b"])
TEXT_TOKENS, VISUAL_TOKENS, MEMORY_ROWS = 512, 256, 320

IMPLEMENTATIONS = {
    "vlfast-auto": lambda *t: memvp_memory(*t, scale=0.1),  # the torch backend on CPU
    "vlfast-cpu": lambda *t: memvp_memory(*t, scale=0.1, backend="cpu"),
    "vlfast-triton-interpreter": lambda *t: memvp_memory(*t, scale=0.1, backend="triton"),
    "eager": lambda *t: memvp_memory_autograd(*t, scale=0.1),
}


def inputs(requires_grad: bool, dtype: torch.dtype = torch.float32):
    b, length, m, d = CPU_SHAPE
    tensors = (torch.randn(b, length, d), torch.randn(b, m, d) * 0.01, torch.randn(m, d) * 0.02,
               torch.randn(m, d) * 0.02)
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors]


def run(benchmark, name, fn):
    if "interpreter" in name:
        return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    return benchmark(fn)


def forward_backward(fn, tensors):
    for t in tensors:
        t.grad = None
    fn(*tensors).sum().backward()
    return tensors[1].grad


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_cpu_forward(benchmark, name, dtype):
    benchmark.group = f"memvp_memory forward, CPU, {dtype}, B=1 L=128 M=128 D=1024"
    tensors = inputs(requires_grad=False, dtype=dtype)
    with torch.no_grad():
        out = run(benchmark, name, lambda: IMPLEMENTATIONS[name](*tensors))
    expected = memvp_memory_autograd(*[t.double() for t in tensors], scale=0.1)
    assert (out.double() - expected).abs().max() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_cpu_forward_backward(benchmark, name, dtype):
    benchmark.group = f"memvp_memory forward + backward, CPU, {dtype}, B=1 L=128 M=128 D=1024"
    tensors = inputs(requires_grad=True, dtype=dtype)
    grad = run(benchmark, name, lambda: forward_backward(IMPLEMENTATIONS[name], tensors))
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_cpu_auto_is_not_slower(benchmark, dtype, backward):
    """auto (the torch backend) against the eager chain and the cpu backend (an fp32 torch backend
    was 2.9x slower than eager for bf16)."""
    benchmark.group = "memvp_memory, CPU: auto against the alternatives, one interleaved round"
    tensors = inputs(requires_grad=backward, dtype=dtype)

    def contender(name):
        fn = IMPLEMENTATIONS[name]
        if backward:
            return lambda: forward_backward(fn, tensors)

        def forward():
            with torch.no_grad():
                return fn(*tensors)
        return forward

    medians = interleaved_medians(benchmark, {name: contender(name) for name in ("vlfast-auto", "vlfast-cpu", "eager")})
    assert medians["vlfast-auto"] <= TOLERANCE * min(medians.values()), medians


def worse_config(cfg: dict) -> dict:
    """A deliberately worse launch: 64 elements per program instead of 1024 (16x the programs and
    waves, each waiting on its loads)."""
    return {kernel: {**blocks, "BLOCK": 64} for kernel, blocks in cfg.items()}


def projection(hw: Hardware = H100) -> dict:
    shape = MemVPShape(batch=8, length=512, memory=MEMORY_ROWS, dim=4096)
    cfg = memvp_config(shape)
    floor = memvp_floor(shape)
    fused, worse = memvp_triton(shape, cfg, hw), memvp_triton(shape, worse_config(cfg), hw)
    backward = memvp_triton(shape, cfg, hw, backward=True)
    eager = memvp_eager(shape, dropout=False)  # as forward + backward and vlfast.gpucheck time it
    text_only = LLAMA_7B.forward_flops(TEXT_TOKENS)
    memory_space = LLAMA_7B.forward_flops(TEXT_TOKENS, MEMORY_ROWS)
    input_space = LLAMA_7B.forward_flops(TEXT_TOKENS + VISUAL_TOKENS)
    fused_s, eager_s = chain_seconds(fused, hw), chain_seconds(eager, hw)
    return {
        "shape": "B=8 L=512 M=320 D=4096 bf16 (forward)", "gpu": hw.name,
        "launches_us": {k.name: k.seconds(hw) * 1e6 for k in fused + backward if isinstance(k, Launch)},
        "floor_bytes": floor.bytes, "floor_flops": floor.flops, "floor_us": floor.seconds(hw) * 1e6,
        "fused_dram_bytes": sum(k.bytes for k in fused), "fused_l2_bytes": sum(k.l2 for k in fused),
        "fused_flops": sum(k.flops for k in fused), "fused_us": fused_s * 1e6,
        "worse_config_us": chain_seconds(worse, hw) * 1e6,
        "fused_forward_backward_us": chain_seconds(fused + backward, hw) * 1e6,
        "eager_bytes": sum(c.bytes for c in eager), "eager_flops": sum(c.flops for c in eager),
        "eager_us": eager_s * 1e6,
        "eager_forward_backward_us": chain_seconds(memvp_eager(shape, dropout=False, backward=True), hw) * 1e6,
        "fused_vs_floor": fused_s / floor.seconds(hw),
        "eager_vs_floor": eager_s / floor.seconds(hw),
        "llm_gflops_per_sample": {
            "text only": text_only / 1e9,
            f"memory-space (MemVP, M={MEMORY_ROWS})": memory_space / 1e9,
            f"input-space ({VISUAL_TOKENS} visual tokens)": input_space / 1e9,
        },
    }


def test_projected_h100(benchmark):
    """Labelled projection (the benchmark times the cost model; the numbers are in the results)."""
    result = benchmark(projection)
    benchmark.extra_info["projected_h100"] = result
    save_projection("memvp_memory_projected_h100", "memvp_memory on H100 (projected)", [result, projection(H200)])
    flops = result["llm_gflops_per_sample"]
    save_bar_chart(
        "memvp_memory_projected",
        f"MemVP, projected (H100 forward, {result['shape']}) and LLaMA-7B FLOPs per sample ({TEXT_TOKENS} text tokens)",
        ["memvp_memory time / floor", "LLM GFLOPs per sample / text only"],
        {"fused Triton / memory-space": [result["fused_vs_floor"], list(flops.values())[1] / flops["text only"]],
         "eager PyTorch / input-space": [result["eager_vs_floor"], list(flops.values())[2] / flops["text only"]]},
        "ratio (projected)",
    )
    assert result["fused_us"] < result["worse_config_us"]  # smaller blocks must project slower
    assert list(flops.values())[1] < list(flops.values())[2]


@pytest.mark.parametrize("hw", [H100, H200], ids=lambda hw: hw.name)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward + backward"])
def test_projected_faster_than_eager(hw, backward):
    result = projection(hw)
    if backward:
        assert result["fused_forward_backward_us"] < result["eager_forward_backward_us"], result
    else:
        assert result["fused_us"] < result["eager_us"], result

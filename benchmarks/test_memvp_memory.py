"""memvp_memory (MemVP's FFN memory).

Measured: CPU wall time of each backend that runs here against the eager PyTorch chain, forward and
forward + backward, at a CPU-sized shape.
Projected (no GPU here): H100 bytes, FLOPs and time of the fused Triton forward against the floor
and the eager chain at LLaMA-7B's shape (D = 4096, M = 320, L = 512); and the LLM FLOPs per sample
of memory-space prompting against putting the same 256 visual tokens in the input sequence.

    pytest benchmarks/test_memvp_memory.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
from vlfast.kernels.memvp_memory import launch_config

from benchmarks.results import save_bar_chart, save_projection
from vlfast.costmodel import H100, LLMS, MemVPShape, Stack, chain_seconds, memvp_eager, memvp_floor, memvp_triton
from vlfast.ops import memvp_memory
from vlfast.ops.reference import memvp_memory_autograd

CPU_SHAPE = (1, 128, 128, 1024)  # (B, L, M, D); M <= 128 so that triton takes fp32
LLAMA_7B = Stack.from_config(LLMS["llama-7b"])
TEXT_TOKENS, VISUAL_TOKENS, MEMORY_ROWS = 512, 256, 320

IMPLEMENTATIONS = {
    "vlfast-cpu": lambda *t: memvp_memory(*t, scale=0.1, backend="cpu"),
    "vlfast-torch": lambda *t: memvp_memory(*t, scale=0.1, backend="torch"),
    "vlfast-triton-interpreter": lambda *t: memvp_memory(*t, scale=0.1, backend="triton"),
    "eager": lambda *t: memvp_memory_autograd(*t, scale=0.1),
}


def inputs(requires_grad: bool):
    b, length, m, d = CPU_SHAPE
    tensors = (torch.randn(b, length, d), torch.randn(b, m, d) * 0.01, torch.randn(m, d) * 0.02,
               torch.randn(m, d) * 0.02)
    return [t.requires_grad_(requires_grad) for t in tensors]


def run(benchmark, name, fn):
    if "interpreter" in name:
        return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    return benchmark(fn)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_cpu_forward(benchmark, name):
    benchmark.group = "memvp_memory forward, CPU, float32, B=1 L=128 M=128 D=1024"
    tensors = inputs(requires_grad=False)
    with torch.no_grad():
        out = run(benchmark, name, lambda: IMPLEMENTATIONS[name](*tensors))
    expected = memvp_memory_autograd(*[t.double() for t in tensors], scale=0.1)
    assert (out.double() - expected).abs().max() < 1e-3


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_cpu_forward_backward(benchmark, name):
    benchmark.group = "memvp_memory forward + backward, CPU, float32, B=1 L=128 M=128 D=1024"
    tensors = inputs(requires_grad=True)

    def step():
        for t in tensors:
            t.grad = None
        IMPLEMENTATIONS[name](*tensors).sum().backward()
        return tensors[1].grad

    grad = run(benchmark, name, step)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def projection() -> dict:
    shape = MemVPShape(batch=8, length=512, memory=MEMORY_ROWS, dim=4096)
    cfg = launch_config(torch.empty(1, 1, 4096, dtype=torch.bfloat16, device="meta"), MEMORY_ROWS, interpret=False)
    floor = memvp_floor(shape)
    fused, l2_bytes = memvp_triton(shape, cfg)
    eager = memvp_eager(shape)
    text_only = LLAMA_7B.forward_flops(TEXT_TOKENS)
    memory_space = LLAMA_7B.forward_flops(TEXT_TOKENS, MEMORY_ROWS)
    input_space = LLAMA_7B.forward_flops(TEXT_TOKENS + VISUAL_TOKENS)
    return {
        "shape": "B=8 L=512 M=320 D=4096 bf16 (forward)",
        "floor_bytes": floor.bytes, "floor_flops": floor.flops, "floor_us": floor.seconds(H100) * 1e6,
        "fused_dram_bytes": fused.bytes, "fused_l2_bytes": l2_bytes, "fused_flops": fused.flops,
        "fused_us": fused.seconds(H100) * 1e6,
        "eager_bytes": sum(c.bytes for c in eager), "eager_flops": sum(c.flops for c in eager),
        "eager_us": chain_seconds(eager, H100) * 1e6,
        "fused_vs_floor": fused.seconds(H100) / floor.seconds(H100),
        "eager_vs_floor": chain_seconds(eager, H100) / floor.seconds(H100),
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
    save_projection("memvp_memory_projected_h100", "memvp_memory on H100 (projected)", [result])
    flops = result["llm_gflops_per_sample"]
    save_bar_chart(
        "memvp_memory_projected",
        f"MemVP, projected (H100 forward, {result['shape']}) and LLaMA-7B FLOPs per sample ({TEXT_TOKENS} text tokens)",
        ["memvp_memory time / floor", "LLM GFLOPs per sample / text only"],
        {"fused Triton / memory-space": [result["fused_vs_floor"], list(flops.values())[1] / flops["text only"]],
         "eager PyTorch / input-space": [result["eager_vs_floor"], list(flops.values())[2] / flops["text only"]]},
        "ratio (projected)",
    )
    assert result["fused_us"] < result["eager_us"]
    assert list(flops.values())[1] < list(flops.values())[2]

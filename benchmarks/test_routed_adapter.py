"""routed_adapter (LaVIN's mixture-of-modality adapter).

Measured: CPU wall time of each backend that runs here against the eager PyTorch chain and
torch.compile of it, forward and forward + backward, at a CPU-sized shape.
Projected (no GPU here): H100 (and H200) bytes and time of the Triton kernels as launched
(forward, and forward + backward) against the one-read-one-write floor, the eager chain and a
deliberately worse launch at LLaMA-7B's shape (D = 4096, R = 8, E = 2,
B x L = 16384 tokens).

    pytest benchmarks/test_routed_adapter.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.results import save_bar_chart, save_projection
from vlfast.costmodel import (
    H100,
    H200,
    AdapterShape,
    Hardware,
    Launch,
    adapter_config,
    chain_seconds,
    routed_adapter_eager,
    routed_adapter_floor,
)
from vlfast.costmodel import routed_adapter_triton as triton_cost
from vlfast.ops import routed_adapter
from vlfast.ops.reference import routed_adapter_autograd

CPU_SHAPE = (2, 64, 512, 2, 8)  # (B, L, D, E, R); small: the Triton interpreter runs it too
compiled_eager = torch.compile(routed_adapter_autograd)

IMPLEMENTATIONS = {
    "vlfast-cpu": lambda *t: routed_adapter(*t, backend="cpu"),
    "vlfast-torch": lambda *t: routed_adapter(*t, backend="torch"),
    "vlfast-triton-interpreter": lambda *t: routed_adapter(*t, backend="triton"),
    "eager": routed_adapter_autograd,
    "torch.compile(eager)": compiled_eager,
}


def inputs(requires_grad: bool):
    b, length, d, e, r = CPU_SHAPE
    tensors = (torch.randn(b, length, d), torch.randn(b, d), torch.randn(e, d) * 0.02, torch.zeros(e),
               torch.randn(r, d) * 0.02, torch.zeros(r), torch.randn(e, d, r) * 0.02, torch.zeros(e, d))
    return [t.requires_grad_(requires_grad) for t in tensors]


def run(benchmark, name, fn):
    if "interpreter" in name:
        return benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    return benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)  # warm-up compiles


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_cpu_forward(benchmark, name):
    benchmark.group = "routed_adapter forward, CPU, float32, B=2 L=64 D=512 E=2 R=8"
    tensors = inputs(requires_grad=False)
    with torch.no_grad():
        out = run(benchmark, name, lambda: IMPLEMENTATIONS[name](*tensors))
    expected = routed_adapter_autograd(*[t.double() for t in tensors])
    assert (out.double() - expected).abs().max() < 1e-4


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_cpu_forward_backward(benchmark, name):
    benchmark.group = "routed_adapter forward + backward, CPU, float32, B=2 L=64 D=512 E=2 R=8"
    tensors = inputs(requires_grad=True)

    def step():
        for t in tensors:
            t.grad = None
        IMPLEMENTATIONS[name](*tensors).square().sum().backward()
        return tensors[6].grad

    grad = run(benchmark, name, step)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def worse_config(cfg: dict) -> dict:
    """A deliberately worse launch: a quarter of the persistent programs (fewer than SMs)."""
    return {**cfg, "programs_per_sm": cfg["programs_per_sm"] / 4}


def projection(hw: Hardware = H100) -> dict:
    shape = AdapterShape(batch=16, tokens=16384, dim=4096, rank=8, experts=2)
    cfg = adapter_config(shape)
    floor = routed_adapter_floor(shape)
    fused, worse = triton_cost(shape, cfg, hw), triton_cost(shape, worse_config(cfg), hw)
    backward = triton_cost(shape, cfg, hw, backward=True)
    eager = routed_adapter_eager(shape)
    fused_s, eager_s = chain_seconds(fused, hw), chain_seconds(eager, hw)
    return {
        "shape": "B x L = 16384 tokens, D=4096 R=8 E=2 bf16", "gpu": hw.name,
        "launches_us": {k.name: k.seconds(hw) * 1e6 for k in fused + backward if isinstance(k, Launch)},
        "floor_bytes": floor.bytes, "fused_dram_bytes": sum(k.bytes for k in fused),
        "fused_l2_bytes": sum(k.l2 for k in fused), "eager_bytes": sum(c.bytes for c in eager),
        "floor_us": floor.seconds(hw) * 1e6, "fused_us": fused_s * 1e6,
        "worse_config_us": chain_seconds(worse, hw) * 1e6, "eager_us": eager_s * 1e6,
        "fused_forward_backward_us": chain_seconds(fused + backward, hw) * 1e6,
        "eager_forward_backward_us": chain_seconds(routed_adapter_eager(shape, backward=True), hw) * 1e6,
        "fused_vs_floor": fused_s / floor.seconds(hw),
        "eager_vs_floor": eager_s / floor.seconds(hw),
    }


def test_projected_h100(benchmark):
    """Labelled projection (the benchmark times the cost model; the numbers are in the results)."""
    result = benchmark(projection)
    benchmark.extra_info["projected_h100"] = result
    save_projection("routed_adapter_projected_h100", "routed_adapter on H100 and H200 (projected)",
                    [result, projection(H200)])
    save_bar_chart("routed_adapter_projected_h100",
                   f"routed_adapter, projected H100 time / one-read-one-write floor\n{result['shape']}",
                   ["forward"],
                   {"fused Triton": [result["fused_vs_floor"]], "eager PyTorch": [result["eager_vs_floor"]]},
                   "x floor (projected)")
    # Checks a worse kernel would break: slower than eager, or no slower than a launch with fewer programs.
    assert result["fused_us"] < result["eager_us"] and result["fused_us"] < result["worse_config_us"]
    assert result["fused_forward_backward_us"] < result["eager_forward_backward_us"]

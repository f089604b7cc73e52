"""GPU timings: each backend of each op against what users would run instead (the eager PyTorch
chain, torch.compile of it, and for cross_attention torch's SDPA kernels), at the shapes the cost
model projects. CUDA events through triton.testing.do_bench (L2 flushed before every run, median),
which include the host's time to issue a call whenever the GPU outruns it; then the same calls
replayed from CUDA graphs, each after an L2 flush, less a graph of the flushes alone: GPU time
alone, which is what the cost model projects. The device's copy bandwidth and matrix rates are measured
first; the projection is recomputed with those measured ceilings so measured / projected compares
like with like."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from triton.testing import do_bench

from vlfast.costmodel.kernels import H100, Hardware, project
from vlfast.ops import cross_attention, memvp_memory, routed_adapter
from vlfast.ops.reference import cross_attention_autograd, memvp_memory_autograd, routed_adapter_autograd

WARMUP_MS, REP_MS = 25, 100
GRAPH_CALLS, GRAPH_REPLAYS = 20, 10  # calls captured per graph, replays timed
L2_FLUSH_BYTES = 256 * 2**20  # as triton.testing.do_bench: several times any L2

# (op, dims): the shapes of benchmarks/test_*.py's projections.
SHAPES = {
    "cross_attention": dict(B=32, H=12, Lq=32, Lk=257, D=64),
    "memvp_memory": dict(B=8, L=512, M=320, D=4096),
    "routed_adapter": dict(B=16, L=1024, D=4096, E=2, R=8),
}


def median_seconds(fn: Callable[[], object], grad_to_none: list[Tensor] | None = None) -> float:
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grad_to_none, return_mode="median") * 1e-3


def graph_seconds(fn: Callable[[], object], grad_to_none: list[Tensor] | None = None) -> float:
    """Median GPU time of one call after an L2 flush, with no host time in it: a CUDA graph of
    GRAPH_CALLS (flush, call) pairs replayed, less a graph of the flushes alone."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def capture(calls: bool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                flush.zero_()
                if calls:
                    for tensor in grad_to_none or ():
                        tensor.grad = None
                    fn()
        return graph

    def replay(graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e-3 / GRAPH_CALLS

    with torch.cuda.stream(torch.cuda.Stream()):
        fn()  # warm-up off the capturing stream, as CUDA graphs require
    torch.cuda.synchronize()
    both, flushes = capture(True), capture(False)
    return statistics.median(replay(both) - replay(flushes) for _ in range(GRAPH_REPLAYS))


def measure_hardware(device: torch.device) -> dict:
    """The device's ceilings as measured now: a 2 GiB device-to-device copy (bytes read + written), an
    8192^3 bf16 matrix product, and a 4096^3 fp32 one as PyTorch runs it by default (no tf32: the
    eager chains' fp32 products)."""
    props = torch.cuda.get_device_properties(device)
    src = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / median_seconds(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    matrix = 2 * 8192**3 / median_seconds(lambda: a @ a)
    b = torch.randn(4096, 4096, dtype=torch.float32, device=device)
    allow_tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        fp32 = 2 * 4096**3 / median_seconds(lambda: b @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return {"name": props.name, "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", 50 * 2**20), "memory_bytes": props.total_memory,
            "capability": f"{props.major}.{props.minor}", "copy_bandwidth_measured": bandwidth,
            "bf16_matmul_flops_measured": matrix, "fp32_matmul_flops_measured": fp32}


def hardware(measured: dict) -> Hardware:
    """The cost model's Hardware at the measured ceilings; L2 bandwidth is not measured: the model's
    H100 SXM figure scaled by the SM count (assumed: the same clock and bytes per SM)."""
    return Hardware(measured["name"], measured["copy_bandwidth_measured"], measured["bf16_matmul_flops_measured"],
                    measured["l2_bytes"], measured["sms"], fp32_flops=measured["fp32_matmul_flops_measured"],
                    l2_bandwidth=H100.l2_bandwidth * measured["sms"] / H100.sms)


def _attention(dims: dict[str, int], dtype: torch.dtype, device: torch.device):
    b, h, lq, lk, d = (dims[k] for k in ("B", "H", "Lq", "Lk", "D"))
    tensors = [torch.randn(b, h, n, d, dtype=dtype, device=device) for n in (lq, lk, lk)]
    mask = torch.ones(b, lk, dtype=torch.bool, device=device)
    mask[:, -7:] = False  # padded image tokens
    attn_mask = mask[:, None, None, :]

    def sdpa(backend):
        def run(q, k, v):
            with torch.nn.attention.sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return run

    def flash_unmasked(q, k, v):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    backends = torch.nn.attention.SDPBackend
    return tensors, {
        "vlfast triton": lambda q, k, v: cross_attention(q, k, v, mask, backend="triton"),
        "vlfast cuda": lambda q, k, v: cross_attention(q, k, v, mask, backend="cuda"),
        "vlfast auto": lambda q, k, v: cross_attention(q, k, v, mask),
        "eager": lambda q, k, v: cross_attention_autograd(q, k, v, mask),
        "sdpa efficient": sdpa(backends.EFFICIENT_ATTENTION),
        "sdpa cudnn": sdpa(backends.CUDNN_ATTENTION),
        "sdpa flash (no mask: it takes none)": flash_unmasked,
    }


def _memvp(dims: dict[str, int], dtype: torch.dtype, device: torch.device):
    b, length, m, d = (dims[k] for k in ("B", "L", "M", "D"))
    tensors = [torch.randn(b, length, d, dtype=dtype, device=device),
               torch.randn(b, m, d, dtype=dtype, device=device) / d**0.5,
               torch.randn(m, d, dtype=dtype, device=device) / d**0.5, torch.randn(m, d, dtype=dtype, device=device)]
    return tensors, {
        "vlfast triton": lambda *t: memvp_memory(*t, backend="triton"),
        "vlfast cuda": lambda *t: memvp_memory(*t, backend="cuda"),
        "vlfast auto": memvp_memory,
        "eager": memvp_memory_autograd,
    }


def _adapter(dims: dict[str, int], dtype: torch.dtype, device: torch.device):
    b, length, d, e, r = (dims[k] for k in ("B", "L", "D", "E", "R"))

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, dtype=dtype, device=device) * scale

    tensors = [randn(b, length, d), randn(b, d), randn(e, d, scale=d**-0.5), randn(e), randn(r, d, scale=d**-0.5),
               randn(r, scale=0.1), randn(e, d, r, scale=r**-0.5), randn(e, d, scale=0.1)]
    return tensors, {
        "vlfast triton": lambda *t: routed_adapter(*t, backend="triton"),
        "vlfast cuda": lambda *t: routed_adapter(*t, backend="cuda"),
        "vlfast auto": routed_adapter,
        "eager": routed_adapter_autograd,
    }


PROBLEMS = {"cross_attention": _attention, "memvp_memory": _memvp, "routed_adapter": _adapter}


def time_op(op: str, dtype: torch.dtype, device: torch.device, hw: Hardware, compile_eager: bool,
            deadline: float = float("inf")) -> Iterator[dict]:
    """One record per implementation and pass (forward; forward + backward): median seconds, the
    achieved bandwidth over the op's floor bytes (forward + backward: both passes' floors), and the
    projection where the cost model has one (forward + backward projected as both passes)."""
    dims = SHAPES[op]
    tensors, implementations = PROBLEMS[op](dims, dtype, device)
    if compile_eager:
        implementations["torch.compile(eager)"] = torch.compile(implementations["eager"], dynamic=False)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    dout = torch.randn_like(tensors[0])  # every op's output has the shape of its first input
    capturable = True
    for backward in (False, True):
        projection = project(op, dims, dtype, hw, backward)
        timed = []  # (row, call, grads): the CUDA-graph timings come after every call's events
        for name, fn in implementations.items():
            record = {"op": op, "shape": " ".join(f"{k}={v}" for k, v in dims.items()),
                      "dtype": str(dtype).removeprefix("torch."), "implementation": name,
                      "pass": "forward + backward" if backward else "forward"}
            if time.monotonic() > deadline:
                yield {**record, "status": "skipped", "reason": "the check's time budget was spent"}
                continue
            if backward:
                def run(fn=fn):
                    fn(*leaves).backward(dout)
                call, grads = run, leaves
            else:
                def call(fn=fn):
                    with torch.no_grad():
                        return fn(*tensors)
                grads = None
            try:
                seconds = median_seconds(call, grads)
            except Exception as error:  # a refusal (dtype, size) or a failure: both are results
                yield {**record, "status": "not run", "reason": f"{type(error).__name__}: {error}"[:600]}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # raises when the failure took the CUDA context with it
                continue
            row = {**record, "status": "ok", "median_s": seconds}
            row["floor_bandwidth"] = projection["floor_bytes"] / seconds  # the op's useful bytes per second
            row["projected_floor_s"] = projection["floor_s"]
            key = {"eager": "eager_s", "vlfast triton": "fused_s",
                   "sdpa flash (no mask: it takes none)": "flash_s"}.get(name)
            if key in projection:
                row["projected_s"] = projection[key]
            timed.append((row, call, grads))
        for row, call, grads in timed:
            if capturable and time.monotonic() < deadline:
                try:
                    row["graph_s"] = graph_seconds(call, grads)
                except Exception as error:  # not capturable (a host sync, say): the events' time stands alone
                    row["graph_reason"] = f"{type(error).__name__}: {error}"[:300]
                    if device.type == "cuda":
                        try:
                            torch.cuda.synchronize(device)
                        except RuntimeError as broken:  # the failure took the CUDA context with it
                            row["graph_reason"] += f"; then {broken}"[:300]
                            capturable = False  # the remaining rows keep their events time
            yield row

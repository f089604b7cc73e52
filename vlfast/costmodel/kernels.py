"""Projected GPU time of vlfast's Triton kernels as launched, of the eager PyTorch chains and of the
roofline floor, from counted bytes and FLOPs (no GPU is measured here; labelled so wherever shown).

The floor of an op is max(bytes / DRAM bandwidth, FLOPs / matrix rate) for the bytes it must move
(one read of each input, one write of each output) and the FLOPs it must do. The eager chain is the
sum over its kernels of a launch plus that roofline of each kernel's own reads and writes; its
matrix products (`matmul`) also pay the L2 traffic of cuBLAS's tiles, under the same L2 rule as the
fused kernels, and in fp32 run at the CUDA-core rate (PyTorch's default: no tf32).

A Triton kernel is modelled as launched (`Launch`), from the grid, tiles and warps its launcher's
`launch_config` picks: each program's DRAM traffic including re-reads (a re-read comes from L2 only
when everything touched between the two reads fits in L2_SHARE of it, else from DRAM again), the
bytes read through L2, the FLOPs of whole (padded) tiles, and the loop steps one program runs one
after another. Its time is a launch plus the largest of:
- DRAM: the busiest SM's programs' bytes at its share of the bandwidth (bandwidth / SMs): fewer
  programs than SMs, or a ragged last wave, leaves bandwidth unused (assumed: an SM draws no more
  than its share, pessimistic for grids far below the SM count);
- L2: the same for everything read through L2, at the stated L2 bandwidth;
- matrix FLOPs: the busiest SM's programs at its share of the matrix rate;
- latency: waves x steps x the DRAM latency / the steps in flight (a program waits on its loads;
  Triton's default 3-stage pipelining keeps two steps' loads in flight, 2 stages one).
Not modelled: instruction issue and the non-matrix arithmetic (exp, masks), bank conflicts, clock
changes, and the host's time to launch (these projections are of GPU time only).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # DRAM bytes/s, read + write
    matrix_flops: float  # dense 16-bit matrix FLOP/s
    l2_bytes: float  # last-level cache
    sms: int
    fp32_flops: float = 67e12  # fp32 FLOP/s on CUDA cores (H100 SXM / H200 datasheets)
    # Bytes/s read through L2: Chips and Cheese measured 5.5 TB/s on an H100 PCIe ("Nvidia's H100:
    # Funny L2, and Tons of Bandwidth", 2023: 114 SMs at 1,755 MHz), scaled by SMs x clock to the SXM
    # parts (132 SMs at 1,980 MHz): assumed. (The H200 rerun's memvp forward moved the model's 959 MB
    # through L2 in 145 us, >= 6.6 TB/s: the unscaled figure was too low.)
    l2_bandwidth: float = 5.5e12 * 132 / 114 * 1980 / 1755
    latency: float = 600e-9  # a load's round trip to DRAM under load: assumed (idle Hopper microbenchmarks: ~500 ns)
    launch: float = 3e-6  # a kernel's launch, ramp-up and drain on the GPU: assumed


# SPEC.md section 8: H100 copy bandwidth as measured on a machine of this workplace; A100 datasheet.
# L2 sizes and SM counts: the vendors' datasheets.
H100 = Hardware("H100 SXM", 3.0e12, 800e12, 50e6, 132)
A100 = Hardware("A100 80GB", 2.0e12, 312e12, 40e6, 108, fp32_flops=19.5e12,
                l2_bandwidth=4.0e12)  # L2: assumed 2x DRAM
# Copy bandwidth and bf16 matrix rate measured by vlfast.gpucheck on an H200
# (benchmarks/results/gpu/h200-2026-11-30); 132 SMs and 60 MiB of L2 as the device reported.
H200 = Hardware("H200", 4.24e12, 693e12, 60 * 2**20, 132)
# Data re-read while at most this share of L2 was touched since its last read is assumed to come from L2.
L2_SHARE = 0.75
# Programs an SM holds at once follow from registers alone: 64 K per SM (A100, H100), an assumed 128
# per thread for these tiled kernels (`python -m vlfast.kernels.report` reads the real counts).
REGISTERS_PER_SM, REGISTERS_PER_THREAD = 65536, 128
LOADS_IN_FLIGHT = 2  # loop steps whose loads one program has in flight: Triton's default 3 stages
TF32X3_SLOWDOWN = 6  # fp32 products run as 3 tf32 passes, tf32 at half the 16-bit rate (datasheets)
# The dtype a shape's itemsize stands for when asking a launcher for its configuration.
_MODELLED_DTYPES = {2: torch.bfloat16, 4: torch.float32}


@dataclass(frozen=True)
class Cost:
    """A kernel (or an op's floor) as bytes moved to and from DRAM, further bytes read through L2, and
    FLOPs done (on tensor cores, or with `fp32` on CUDA cores)."""

    bytes: float
    flops: float
    l2: float = 0.0
    fp32: bool = False

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops, self.l2 + other.l2, self.fp32 or other.fp32)

    def seconds(self, hw: Hardware) -> float:
        rate = hw.fp32_flops if self.fp32 else hw.matrix_flops
        return max(self.bytes / hw.bandwidth, (self.bytes + self.l2) / hw.l2_bandwidth, self.flops / rate)


# The output tile through which cuBLAS reads the eager chains' matrix product operands from L2:
# assumed 256 x 256 (Hopper kernels of 128 x 256 tiles in clusters of two that share their loads).
# Smaller would make the 8192^3 bf16 product vlfast.gpucheck measured at 717 TFLOP/s on the H200
# L2-bound, slower than measured.
GEMM_TILE = 256


def matmul(rows: int, cols: int, inner: int, itemsize: int, batch: int = 1, out_itemsize: int | None = None) -> Cost:
    """One (batched) product (rows x inner) @ (inner x cols) as cuBLAS runs it: each operand read once
    from DRAM and re-read through L2 by every further tile along the other side, the result written
    (in out_itemsize bytes per element, by default the operands')."""
    a, b = rows * inner, inner * cols
    rereads = a * (triton.cdiv(cols, GEMM_TILE) - 1) + b * (triton.cdiv(rows, GEMM_TILE) - 1)
    written = (out_itemsize or itemsize) * batch * rows * cols
    return Cost(itemsize * batch * (a + b) + written, 2.0 * batch * rows * cols * inner,
                itemsize * batch * rereads, fp32=itemsize == 4)


def resident_programs(warps: int) -> int:
    """Programs of `warps` warps an SM holds at once (register-limited, as assumed above)."""
    return max(1, REGISTERS_PER_SM // (REGISTERS_PER_THREAD * 32 * warps))


@dataclass(frozen=True)
class Launch:
    """One Triton kernel launch as its launcher configures it."""

    name: str
    programs: int
    warps: int
    dram: float  # bytes to and from DRAM, all programs
    l2: float  # further bytes read through L2: the re-reads that hit it
    flops: float  # matrix FLOPs on whole (padded) tiles
    steps: int  # loop steps one program runs one after another, each waiting on its loads
    fp32: bool = False  # products in 3-pass tf32
    in_flight: int = LOADS_IN_FLIGHT  # loop steps whose loads are in flight: pipeline stages - 1

    @property
    def bytes(self) -> float:
        return self.dram

    def waves(self, hw: Hardware) -> int:
        return triton.cdiv(self.programs, hw.sms * resident_programs(self.warps))

    def seconds(self, hw: Hardware) -> float:
        # The busiest SM runs cdiv(programs, SMs) programs: its work over an even 1 / SMs share.
        busiest = triton.cdiv(self.programs, hw.sms) * hw.sms / self.programs
        rate = hw.matrix_flops / (TF32X3_SLOWDOWN if self.fp32 else 1)
        return max(busiest * self.dram / hw.bandwidth, busiest * (self.dram + self.l2) / hw.l2_bandwidth,
                   busiest * self.flops / rate, self.waves(hw) * self.steps * hw.latency / self.in_flight)


def chain_seconds(kernels: Sequence[Cost | Launch], hw: Hardware) -> float:
    """Kernels run one after another, each paying a launch."""
    return sum(hw.launch + k.seconds(hw) for k in kernels)


def _reread(unique: float, reads: float, distance: float, hw: Hardware) -> tuple[float, float]:
    """(DRAM, L2) bytes of `reads` bytes of reads of `unique` distinct bytes: the repeats come from L2
    when the bytes touched between two reads of the same data (`distance`) fit in L2_SHARE of it."""
    if distance <= L2_SHARE * hw.l2_bytes:
        return unique, reads - unique
    return reads, 0.0


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    itemsize: int = 2  # bytes per element of q, k, v, out
    masked: bool = True

    @property
    def bh(self) -> int:
        return self.batch * self.heads

    def elements(self, length: int) -> int:
        return self.bh * length * self.head_dim


def cross_attention_floor(s: AttentionShape, backward: bool = False) -> Cost:
    """One read of every input and one write of every output; the unpadded matrix FLOPs
    (forward: q k^T and p v; backward: recomputed q k^T, then dp, dv, dk, dq)."""
    e = s.itemsize
    mask = s.batch * s.kv_len if s.masked else 0
    if not backward:
        return Cost(e * (2 * s.elements(s.q_len) + 2 * s.elements(s.kv_len)) + 4 * s.bh * s.q_len + mask,
                    4.0 * s.bh * s.q_len * s.kv_len * s.head_dim)
    reads = e * (3 * s.elements(s.q_len) + 2 * s.elements(s.kv_len)) + 4 * s.bh * s.q_len + mask  # q do o k v lse
    writes = e * (s.elements(s.q_len) + 2 * s.elements(s.kv_len))  # dq dk dv
    return Cost(reads + writes, 10.0 * s.bh * s.q_len * s.kv_len * s.head_dim)


def attention_config(s: AttentionShape) -> dict:
    """kernels/cross_attention.py's launch_config for this shape, as on a GPU."""
    from vlfast.kernels.cross_attention import launch_config

    dtype = _MODELLED_DTYPES[s.itemsize]
    return launch_config(torch.empty(1, 1, s.q_len, s.head_dim, dtype=dtype, device="meta"), s.kv_len,
                         interpret=False)


def cross_attention_triton(s: AttentionShape, cfg: dict, hw: Hardware, backward: bool = False) -> list[Launch]:
    """The kernels of kernels/cross_attention.py with the tiles and warps of `cfg` (its launch_config).
    Forward: a program per (batch x head, query block) streams all of K, V and the mask row in
    BLOCK_N steps. Backward: the same grid for dQ, and with one query block dK and dV too; with
    several, a second kernel per (batch x head, key block) reads Q, dO, lse and delta once per key
    block and recomputes the probabilities."""
    bm, bn, bd, warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["num_warps"]
    q_blocks, k_blocks = triton.cdiv(s.q_len, bm), triton.cdiv(s.kv_len, bn)
    e = s.itemsize
    q, kv, rows = e * s.elements(s.q_len), 2 * e * s.elements(s.kv_len), 4 * s.bh * s.q_len  # rows: fp32 lse
    mask = s.batch * s.kv_len if s.masked else 0
    programs = s.bh * q_blocks
    tile = programs * bm * k_blocks * bn * bd  # padded multiply-adds of one (queries x keys x head dim) product
    # Grid axis 0 walks (batch x head) first: all of K and V pass between two query blocks' reads of
    # the same K and V; a sample's mask row is re-read by its heads one after another.
    kv_dram, kv_l2 = _reread(kv, q_blocks * kv, kv, hw)
    mask_dram, mask_l2 = _reread(mask, q_blocks * s.heads * mask, kv / s.bh, hw)
    common = dict(warps=warps, fp32=e == 4)
    if not backward:
        return [Launch("forward", programs, dram=2 * q + rows + kv_dram + mask_dram, l2=kv_l2 + mask_l2,
                       flops=4.0 * tile, steps=k_blocks + 1, **common)]
    one = q_blocks == 1
    # Reads q, dO, O, lse; writes dQ, and dK, dV (one query block) or delta (several).
    dq = Launch("backward dQ, dK, dV" if one else "backward dQ", programs,
                dram=4 * q + rows + (kv if one else rows) + kv_dram + mask_dram, l2=kv_l2 + mask_l2,
                flops=(10.0 if one else 6.0) * tile, steps=k_blocks + 1, **common)
    if one:
        return [dq]
    q_side = 2 * q + 2 * rows  # q, dO, lse, delta: the whole Q side of a (batch x head) per key block
    q_dram, q_l2 = _reread(q_side, k_blocks * q_side, q_side, hw)
    kmask_dram, kmask_l2 = _reread(mask, q_blocks * s.heads * mask, kv / s.bh, hw)
    dkv = Launch("backward dK, dV", s.bh * k_blocks, dram=2 * kv + q_dram + kmask_dram, l2=q_l2 + kmask_l2,
                 flops=8.0 * tile, steps=q_blocks + 1, **common)
    return [dq, dkv]


# flash-attention 2's forward tiles for head dims <= 64 (128 queries x 128 keys, 4 warps; its kernel
# traits): assumed to be what torch SDPA's flash backend launches.
FLASH_TILES = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4}


def flash_attention_forward(s: AttentionShape, hw: Hardware) -> list[Launch]:
    """SDPA's flash forward modelled like vlfast's: a program per (batch x head, 128 queries)
    streaming K and V in 128-key blocks, without the mask (it takes none)."""
    cfg = {**FLASH_TILES, "BLOCK_D": max(16, triton.next_power_of_2(s.head_dim))}
    return cross_attention_triton(replace(s, masked=False), cfg, hw)


def cross_attention_eager(s: AttentionShape, backward: bool = False) -> list[Cost]:
    """The kernels of vlfast.ops.reference.cross_attention_autograd, `softmax(where(any row visible,
    masked_fill(q k^T * scale), 0)) * any @ v`, and its autograd backward, each reading its inputs
    and writing its output in the input dtype; the (B, Lk) mask's own small kernels cost a launch."""
    e = s.itemsize
    scores = e * s.bh * s.q_len * s.kv_len
    lq, lk, d = s.q_len, s.kv_len, s.head_dim
    masked = [Cost(2 * scores + s.batch * s.kv_len, 0), Cost(2 * scores, 0), Cost(2 * scores, 0)] if s.masked else []
    forward = [
        matmul(lq, lk, d, e, s.bh),  # q @ k^T
        Cost(2 * scores, 0),  # * scale
        *([Cost(2 * s.batch * s.kv_len, 0)] * 2 if s.masked else []),  # ~mask, mask.any
        *masked,  # masked_fill, where(has_keys, ., 0), softmax's output * has_keys
        Cost(2 * scores, 0),  # softmax
        matmul(lq, d, lk, e, s.bh),  # p @ v
    ]
    if not backward:
        return forward
    return forward + [
        matmul(lq, lk, d, e, s.bh),  # dp = do @ v^T
        matmul(lk, d, lq, e, s.bh),  # dv = p^T @ do
        *masked,  # * has_keys, where and masked_fill backward
        Cost(3 * scores, 0),  # softmax backward: reads p, dp; writes ds
        Cost(2 * scores, 0),  # * scale backward
        matmul(lq, d, lk, e, s.bh),  # dq = ds @ k
        matmul(lk, d, lq, e, s.bh),  # dk = ds^T @ q
    ]


@dataclass(frozen=True)
class MemVPShape:
    batch: int
    length: int  # L, text tokens
    memory: int  # M, memory rows (visual prompts + padding)
    dim: int  # D, LLM width
    itemsize: int = 2

    def elements(self, rows: int) -> int:
        return rows * self.dim


def memvp_floor(s: MemVPShape, backward: bool = False) -> Cost:
    """Forward: read x, z, key_pos, value_pos once, write out; 2 products of L x M x D. Backward: read
    them and dout, write their gradients; 4 products (dh, dV, dx, dK: the forward keeps the (B, L, M)
    pre-activation, M / D of x, not counted)."""
    e = s.itemsize
    moved = e * (2 * s.batch * s.elements(s.length) + s.batch * s.elements(s.memory) + 2 * s.elements(s.memory))
    return Cost(moved * (2 if backward else 1), (8.0 if backward else 4.0) * s.batch * s.length * s.memory * s.dim)


def memvp_config(s: MemVPShape) -> dict:
    """kernels/memvp_memory.py's launch_config (elements per program and warps of its Triton kernels)."""
    from vlfast.kernels.memvp_memory import launch_config

    return launch_config()


def memvp_intermediate_itemsize(s: MemVPShape) -> int:
    """Bytes per element of the (B, L, M) activation and its gradient, as kernels/memvp_memory.py's
    intermediate_dtype picks them for the modelled dtype."""
    from vlfast.kernels.memvp_memory import intermediate_dtype

    return intermediate_dtype(_MODELLED_DTYPES[s.itemsize]).itemsize


def _streaming(name: str, elements: int, cfg: dict, dram: float, steps: int = 1) -> Launch:
    """A Triton kernel of BLOCK elements per program that streams its bytes once (no products, no
    re-reads); `steps` loop steps each waiting on its loads (loops without products are not
    pipelined: one in flight)."""
    return Launch(name, triton.cdiv(elements, cfg["BLOCK"]), cfg["num_warps"], dram=dram, l2=0.0, flops=0.0,
                  steps=steps, in_flight=1)


def memvp_triton(s: MemVPShape, cfg: dict, hw: Hardware, backward: bool = False) -> list[Launch | Cost]:
    """The kernels of kernels/memvp_memory.py with the blocks of `cfg` (memvp_config): cuBLAS's
    products (`matmul`, as the eager chain's; pre and dL/dhidden written in fp32) and the Triton
    kernels between them, each streaming its bytes once. Forward: K and V (a program per block of
    the M x D elements, walking the samples), pre = x K^T, the activation, act V. Backward: K and V
    again, dL/dhidden = dout V^T, the activation and its gradient, dx, dK, dV, and dz, dkey_pos,
    dvalue_pos in one pass over dK and dV."""
    e, g, b, length, m, d = s.itemsize, memvp_intermediate_itemsize(s), s.batch, s.length, s.memory, s.dim
    mem, pos, act = b * m * d, m * d, b * length * m
    keys_values = _streaming("keys and values", pos, cfg["keys_values"], e * (mem + 2 * pos + 2 * mem), steps=b)
    if not backward:
        return [keys_values, matmul(length, m, d, e, b, out_itemsize=4),
                _streaming("activation", act, cfg["activation"], (4 + g) * act),
                matmul(length, d, m, e, b)]
    return [keys_values, matmul(length, m, d, e, b, out_itemsize=4),  # dL/dhidden
            _streaming("activation gradient", act, cfg["activation"], (4 + 4 + 2 * g) * act),
            matmul(length, d, m, e, b),  # dx = dpre K
            matmul(m, d, length, e, b, out_itemsize=g), matmul(m, d, length, e, b, out_itemsize=g),  # dK, dV
            _streaming("memory gradients", pos, cfg["memory_gradient"], 2 * g * mem + e * (mem + 2 * pos), steps=b)]


def memvp_eager(s: MemVPShape, dropout: bool = True, backward: bool = False) -> list[Cost]:
    """The unfused chain: K = z + key_pos, V = z + value_pos, a = x K^T, silu, dropout, h V, * scale;
    and autograd's backward of it (without dropout)."""
    e, b, length, m, d = s.itemsize, s.batch, s.length, s.memory, s.dim
    x, mem, pos = b * s.elements(length), b * s.elements(m), s.elements(m)
    act = b * length * m
    forward = [
        Cost(e * (2 * mem + pos), 0),  # K = z + key_pos
        Cost(e * (2 * mem + pos), 0),  # V = z + value_pos
        matmul(length, m, d, e, b),  # x @ K^T
        Cost(e * 2 * act, 0),  # silu
        *([Cost(e * 2 * act + act, 0)] if dropout else []),  # dropout (writes a bool mask)
        matmul(length, d, m, e, b),  # h @ V
        Cost(e * 2 * x, 0),  # * scale
    ]
    if not backward:
        return forward
    return forward + [
        Cost(e * 2 * x, 0),  # * scale
        matmul(length, m, d, e, b),  # dh = g V^T
        matmul(m, d, length, e, b),  # dV = h^T g
        Cost(e * (mem + pos), 0),  # dvalue_pos = dV summed over samples
        Cost(e * 3 * act, 0),  # silu backward
        matmul(length, d, m, e, b),  # dx = da K
        matmul(m, d, length, e, b),  # dK = da^T x
        Cost(e * (mem + pos), 0),  # dkey_pos
        Cost(e * 3 * mem, 0),  # dz = dK + dV
    ]


@dataclass(frozen=True)
class AdapterShape:
    batch: int
    tokens: int  # B x L
    dim: int
    rank: int
    experts: int
    itemsize: int = 2

    @property
    def length(self) -> int:
        return self.tokens // self.batch

    @property
    def weight_bytes(self) -> int:
        d, r, e = self.dim, self.rank, self.experts
        return self.itemsize * (r * d + r + e * d * r + e * d + e * d + e + self.batch * d)


def routed_adapter_floor(s: AdapterShape, backward: bool = False) -> Cost:
    """One read of x, one write of out, the weights once; the down and (mixed) up products. Backward:
    x and dout read, dx written, the weights and their gradients; 5 products (x W_d^T again, dh, the
    up projection's gradient, dx, dW_d)."""
    if backward:
        return Cost(3 * s.itemsize * s.tokens * s.dim + 2 * s.weight_bytes, 10.0 * s.tokens * s.dim * s.rank)
    return Cost(2 * s.itemsize * s.tokens * s.dim + s.weight_bytes, 4.0 * s.tokens * s.dim * s.rank)


def adapter_config(s: AdapterShape) -> dict:
    """kernels/routed_adapter.py's tiles for this shape, as on a GPU: "rows" (the forward and the
    backward's row kernel), "columns" (its column kernel), "programs_per_sm" and "forward_stages"
    (the persistent forward's programs per SM and pipeline stages)."""
    from vlfast.kernels.routed_adapter import PROGRAMS_PER_SM, columns_config, forward_stages, launch_config

    x = torch.empty(1, 1, s.dim, dtype=_MODELLED_DTYPES[s.itemsize], device="meta")
    return {"rows": launch_config(x, s.rank, s.experts, interpret=False),
            "columns": columns_config(x, s.rank, interpret=False), "programs_per_sm": PROGRAMS_PER_SM,
            "forward_stages": forward_stages(x)}


# PyTorch kernels of the routed_adapter backward outside the Triton ones (routing weights, the
# expert and router gradients of vlfast.ops.reference, ddown_bias and casts), counted in the code;
# small ((B, E, D, R) at most), so each costs about a launch.
ADAPTER_TORCH_KERNELS = 30


def routed_adapter_triton(s: AdapterShape, cfg: dict, hw: Hardware, backward: bool = False) -> list[Launch | Cost]:
    """The kernels of kernels/routed_adapter.py with the tiles of `cfg` (adapter_config).
    Forward: persistent programs walk blocks of BLOCK_L rows; per block three loops over D in BLOCK_D
    steps (routing weights, down projection, mixed up projection + residual), x read in two passes:
    the second from L2 when the resident programs' blocks fit in L2_SHARE of it. Backward: a
    program per row block (down projection, dL/dh, dx: dout read twice, the same L2 rule), then a
    program per D tile reducing over every row for dW_d and the mixed up-projection's gradient."""
    rows_cfg, cols_cfg = cfg["rows"], cfg["columns"]
    e, d, r, n = s.itemsize, s.dim, s.rank, s.tokens
    bl, br, bd = rows_cfg["BLOCK_L"], rows_cfg["BLOCK_R"], rows_cfg["BLOCK_D"]
    blocks, d_steps = s.batch * triton.cdiv(s.length, bl), triton.cdiv(d, bd)
    x = e * n * d
    per_block_weights = e * d * ((s.experts + 1) + r + s.experts * (r + 1))  # router, W_d, W_u and b_u: from L2
    if not backward:
        programs = min(blocks, int(cfg["programs_per_sm"] * hw.sms))
        resident = min(programs, hw.sms * resident_programs(rows_cfg["num_warps"]))
        x_dram, x_l2 = _reread(x, 2 * x, resident * bl * d * e, hw)
        return [Launch("forward", programs, rows_cfg["num_warps"], dram=x_dram + x + s.weight_bytes,
                       l2=x_l2 + blocks * per_block_weights, flops=4.0 * blocks * bl * br * d_steps * bd,
                       steps=triton.cdiv(blocks, programs) * 3 * d_steps, fp32=e == 4,
                       in_flight=cfg["forward_stages"] - 1)]
    resident = min(blocks, hw.sms * resident_programs(rows_cfg["num_warps"]))
    dout_dram, dout_l2 = _reread(x, 2 * x, resident * bl * d * e, hw)
    hidden = 2 * 4 * n * r  # the dropped hidden state and its gradient, fp32
    row_kernel = Launch("backward rows", blocks, rows_cfg["num_warps"],
                        dram=x + dout_dram + hidden + x + s.weight_bytes, l2=dout_l2 + blocks * per_block_weights,
                        flops=6.0 * blocks * bl * br * d_steps * bd, steps=3 * d_steps, fp32=e == 4)
    cl, cbr, cbd = cols_cfg["BLOCK_L"], cols_cfg["BLOCK_R"], cols_cfg["BLOCK_D"]
    columns, steps = triton.cdiv(d, cbd), s.batch * triton.cdiv(s.length, cl)
    # Every column program reads all of hidden and its gradient; programs walk the samples in step.
    h_dram, h_l2 = _reread(hidden, columns * hidden, (hidden + 2 * x) / s.batch, hw)
    column_kernel = Launch("backward columns", columns, cols_cfg["num_warps"],
                           dram=2 * x + h_dram + 4 * s.batch * d * (r + 1) + e * r * d, l2=h_l2,
                           flops=4.0 * columns * steps * cl * cbr * cbd, steps=steps, fp32=e == 4)
    mixed = 4 * s.batch * d * r + e * s.experts * d * r  # the (B, D, R) gradient and W_u: read by two einsums
    return [row_kernel, column_kernel, Cost(mixed, 0), Cost(mixed, 0), Cost(4 * n * r, 0),
            *[Cost(0, 0)] * (ADAPTER_TORCH_KERNELS - 3)]


def routed_adapter_eager(s: AdapterShape, backward: bool = False) -> list[Cost]:
    """The kernels of vlfast.ops.reference.routed_adapter_autograd (no dropout): h = x W_d^T + b_d,
    y_e = h W_u[e]^T + b_u[e] stacked, weighted by the routing weights, summed over experts, * scale,
    + x; and autograd's backward of it. The router's (B, E)-sized kernels cost a launch each."""
    e, n, experts, d, r = s.itemsize, s.tokens, s.experts, s.dim, s.rank
    x, h = e * n * d, e * n * r
    small = Cost(0, 0)
    forward = [
        *[small] * 4,  # router: product, + bias, / temperature, softmax
        matmul(n, r, d, e),  # x W_d^T
        Cost(2 * h, 0),  # + b_d
        *[matmul(n, d, r, e), Cost(2 * x, 0)] * experts,  # h W_u[e]^T, + b_u[e]
        Cost(2 * experts * x, 0),  # stack
        Cost(2 * experts * x, 0),  # * routing weights
        Cost(experts * x + x, 0),  # sum over experts
        Cost(2 * x, 0),  # * scale
        Cost(3 * x, 0),  # + x
    ]
    if not backward:
        return forward
    return forward + [
        Cost(2 * x, 0),  # * scale
        Cost(x + experts * x, 0),  # d(stacked) = g * routing weights
        Cost(experts * x + x + experts * x, 0), Cost(experts * x, 0),  # d(routing weights): g * stacked, summed
        *[Cost(x, 0), matmul(n, r, d, e), matmul(d, r, n, e)] * experts,  # d b_u[e], dh_e = dy W_u[e], dW_u[e] = dy^T h
        Cost(experts * h, 0),  # dh summed over experts
        Cost(h, 0),  # d b_d
        matmul(n, d, r, e), matmul(r, d, n, e),  # dh W_d, dh^T x
        Cost(3 * x, 0),  # dx = g + dh W_d
        *[small] * 6,  # router backward
    ]


def project(op: str, dims: dict[str, int], dtype, hw: Hardware, backward: bool = False) -> dict[str, float]:
    """Projected seconds of the floor, the fused Triton kernels (as the launchers configure them) and
    the eager chain for one op at `dims` (the names of vlfast.gpucheck's cases): the forward, or with
    `backward` the forward + backward (as vlfast.gpucheck times them); no "fused_s" for memvp_memory
    in fp16. For cross_attention also "flash_s": SDPA's flash forward as modelled by
    flash_attention_forward (forward only)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    passes = (False, True) if backward else (False,)
    if op == "cross_attention":
        s = AttentionShape(dims["B"], dims["H"], dims["Lq"], dims["Lk"], dims["D"], itemsize=itemsize)
        cfg = attention_config(s)
        floor = sum((cross_attention_floor(s, b) for b in passes), Cost(0, 0))
        fused = [k for b in passes for k in cross_attention_triton(s, cfg, hw, b)]
        eager = cross_attention_eager(s, backward)
        extra = {} if backward else {"flash_s": chain_seconds(flash_attention_forward(s, hw), hw)}
    elif op == "memvp_memory":
        s = MemVPShape(dims["B"], dims["L"], dims["M"], dims["D"], itemsize=itemsize)
        floor = sum((memvp_floor(s, b) for b in passes), Cost(0, 0))
        # fp16 keeps fp32 intermediates and fits them to fp16 before each product: not modelled.
        fused = None if dtype == torch.float16 else [k for b in passes for k in memvp_triton(s, memvp_config(s), hw, b)]
        eager, extra = memvp_eager(s, dropout=False, backward=backward), {}
    else:
        s = AdapterShape(dims["B"], dims["B"] * dims["L"], dims["D"], dims["R"], dims["E"], itemsize=itemsize)
        floor = sum((routed_adapter_floor(s, b) for b in passes), Cost(0, 0))
        fused = [k for b in passes for k in routed_adapter_triton(s, adapter_config(s), hw, b)]
        eager, extra = routed_adapter_eager(s, backward), {}
    if fused is not None:
        extra["fused_s"] = chain_seconds(fused, hw)
    return {"floor_s": floor.seconds(hw), "floor_bytes": floor.bytes, "eager_s": chain_seconds(eager, hw), **extra}

"""Projected GPU time from counted bytes and FLOPs (no GPU is measured here).

A kernel's time is projected as max(bytes moved / bandwidth, FLOPs / matrix rate); a chain of
kernels as the sum of its kernels' times. The floor of an op is the same formula applied to the
bytes it must move (one read of each input, one write of each output) and the FLOPs it must do.
Launch latency, occupancy and tail effects are not modelled: these are projections, labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class Hardware:
    name: str
    bandwidth: float  # bytes/s, read + write
    matrix_flops: float  # dense 16-bit matrix FLOP/s
    l2_bytes: float  # last-level cache
    sms: int


# SPEC.md section 8: H100 copy bandwidth as measured on a machine of this workplace; A100 datasheet.
# L2 sizes and SM counts: the vendors' datasheets.
H100 = Hardware("H100 SXM", 3.0e12, 800e12, 50e6, 132)
A100 = Hardware("A100 80GB", 2.0e12, 312e12, 40e6, 108)
# Data re-read while at most this share of L2 is in flight is assumed to come from L2.
L2_SHARE = 0.75


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def seconds(self, hw: Hardware) -> float:
        return max(self.bytes / hw.bandwidth, self.flops / hw.matrix_flops)


def chain_seconds(kernels: list[Cost], hw: Hardware) -> float:
    return sum(k.seconds(hw) for k in kernels)


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


def cross_attention_triton(s: AttentionShape, block_m: int, block_n: int, block_d: int,
                           backward: bool = False) -> Cost:
    """What the Triton kernels move and compute with their block sizes: K and V (and the mask) are
    read once per query block, and tensor-core FLOPs are spent on whole (padded) tiles. With several
    query blocks the backward runs a second kernel per key block for dK and dV, which reads Q, dO,
    lse and delta once per key block and recomputes the probabilities."""
    q_blocks, k_blocks = triton.cdiv(s.q_len, block_m), triton.cdiv(s.kv_len, block_n)
    padded_flops = s.bh * q_blocks * block_m * k_blocks * block_n * block_d
    e = s.itemsize
    mask = q_blocks * s.bh * s.kv_len if s.masked else 0
    kv_reads = q_blocks * e * 2 * s.elements(s.kv_len)
    if not backward:
        return Cost(e * 2 * s.elements(s.q_len) + 4 * s.bh * s.q_len + kv_reads + mask, 4.0 * padded_flops)
    q_side = e * 4 * s.elements(s.q_len) + 4 * s.bh * s.q_len  # read q do o lse, write dq
    kv_writes = e * 2 * s.elements(s.kv_len)
    if q_blocks == 1:
        return Cost(q_side + kv_reads + mask + kv_writes, 10.0 * padded_flops)
    delta_write = 4 * s.bh * s.q_len
    kv_kernel = Cost(k_blocks * (e * 2 * s.elements(s.q_len) + 8 * s.bh * s.q_len + (s.batch * s.kv_len if s.masked
                                                                                    else 0))
                     + e * 2 * s.elements(s.kv_len) + kv_writes, 8.0 * padded_flops)
    return Cost(q_side + kv_reads + mask + delta_write, 6.0 * padded_flops) + kv_kernel


def cross_attention_eager(s: AttentionShape, backward: bool = False) -> list[Cost]:
    """The kernels of the unfused PyTorch chain `softmax((q @ k^T) * scale masked) @ v` and its
    autograd backward, each reading its inputs and writing its output in the input dtype."""
    e = s.itemsize
    scores = e * s.bh * s.q_len * s.kv_len
    q, kv = e * s.elements(s.q_len), e * s.elements(s.kv_len)
    mm = 2.0 * s.bh * s.q_len * s.kv_len * s.head_dim
    forward = [
        Cost(q + kv + scores, mm),  # q @ k^T
        Cost(2 * scores, 0),  # * scale
        *([Cost(2 * scores + s.batch * s.kv_len, 0)] if s.masked else []),  # masked_fill
        Cost(2 * scores, 0),  # softmax
        Cost(scores + kv + q, mm),  # p @ v
    ]
    if not backward:
        return forward
    return [
        Cost(q + kv + scores, mm),  # dp = do @ v^T
        Cost(scores + q + kv, mm),  # dv = p^T @ do
        Cost(3 * scores, 0),  # softmax backward: reads p, dp; writes ds
        *([Cost(2 * scores + s.batch * s.kv_len, 0)] if s.masked else []),  # masked_fill backward
        Cost(2 * scores, 0),  # * scale backward
        Cost(scores + kv + q, mm),  # dq = ds @ k
        Cost(scores + q + kv, mm),  # dk = ds^T @ q
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


def memvp_floor(s: MemVPShape) -> Cost:
    """Forward: read x, z, key_pos, value_pos once, write out; 2 products of L x M x D."""
    e = s.itemsize
    moved = e * (2 * s.batch * s.elements(s.length) + s.batch * s.elements(s.memory) + 2 * s.elements(s.memory))
    return Cost(moved, 4.0 * s.batch * s.length * s.memory * s.dim)


def memvp_triton(s: MemVPShape, cfg: dict) -> tuple[Cost, float]:
    """The two tiled products of kernels/memvp_memory.py as launch_config tiles them: the activation
    kernel reads x once per memory tile and z + key_pos once per row tile, writing the (B, L, M)
    activation; the product kernel reads the activation once per D tile and z + value_pos once per
    row tile, writing out. Assumed: re-reads hit L2 when one sample's operand fits in half of it,
    so DRAM moves x, z and the activation's write and read once each; FLOPs are spent on whole
    (padded) tiles. Returns the DRAM cost and the bytes read through L2."""
    e = s.itemsize
    act, product = cfg["act"], cfg["product"]
    row_tiles = triton.cdiv(s.length, act["BLOCK_L"])
    mem_tiles = triton.cdiv(s.memory, act["BLOCK_M"])
    d_tiles = triton.cdiv(s.dim, product["BLOCK_D"])
    x, activation = s.batch * s.elements(s.length), s.batch * s.length * s.memory
    memory = s.batch * s.elements(s.memory) + 2 * s.elements(s.memory)
    dram = e * (2 * x + 2 * activation + memory)
    l2 = e * (mem_tiles * x + row_tiles * 2 * s.batch * s.elements(s.memory)
              + d_tiles * activation + triton.cdiv(s.length, product["BLOCK_L"]) * 2 * s.batch * s.elements(s.memory))
    padded_l = row_tiles * act["BLOCK_L"]
    flops = 2.0 * s.batch * padded_l * (mem_tiles * act["BLOCK_M"] * s.dim + triton.cdiv(s.memory, product["BLOCK_M"])
                                        * product["BLOCK_M"] * d_tiles * product["BLOCK_D"])
    return Cost(dram, flops), l2


def memvp_eager(s: MemVPShape, dropout: bool = True) -> list[Cost]:
    """The unfused chain: K = z + key_pos, V = z + value_pos, a = x K^T, silu, dropout, h V, * scale."""
    e = s.itemsize
    x, mem, pos = s.batch * s.elements(s.length), s.batch * s.elements(s.memory), s.elements(s.memory)
    act = s.batch * s.length * s.memory
    mm = 2.0 * s.batch * s.length * s.memory * s.dim
    return [
        Cost(e * (2 * mem + pos), 0),  # K = z + key_pos
        Cost(e * (2 * mem + pos), 0),  # V = z + value_pos
        Cost(e * (x + mem + act), mm),  # x @ K^T
        Cost(e * 2 * act, 0),  # silu
        *([Cost(e * 2 * act + act, 0)] if dropout else []),  # dropout (writes a bool mask)
        Cost(e * (act + mem + x), mm),  # h @ V
        Cost(e * 2 * x, 0),  # * scale
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
    def weight_bytes(self) -> int:
        d, r, e = self.dim, self.rank, self.experts
        return self.itemsize * (r * d + r + e * d * r + e * d + e * d + e + self.batch * d)


def routed_adapter_floor(s: AdapterShape) -> Cost:
    """One read of x, one write of out, the weights once; the down and (mixed) up products."""
    return Cost(2 * s.itemsize * s.tokens * s.dim + s.weight_bytes, 4.0 * s.tokens * s.dim * s.rank)


def routed_adapter_triton(s: AdapterShape, block_l: int, block_r: int, programs: int, hw: Hardware) -> Cost:
    """The persistent fused forward: x is read in two passes per block of rows; the second comes
    from L2 when the blocks in flight (programs x block_l rows) fit in L2_SHARE of it. Products run
    on the rank padded to block_r."""
    in_flight = programs * block_l * s.dim * s.itemsize
    second_read = 0 if in_flight <= L2_SHARE * hw.l2_bytes else s.itemsize * s.tokens * s.dim
    return Cost(routed_adapter_floor(s).bytes + second_read, 4.0 * s.tokens * s.dim * block_r)


def routed_adapter_eager(s: AdapterShape) -> list[Cost]:
    """The unfused chain, expert by expert: h = x W_d^T + b_d, dropout, y_e = h W_u[e]^T + b_u[e],
    w_e * y_e, the sum over experts, * scale, + x."""
    e, n = s.itemsize, s.tokens
    x, h = n * s.dim, n * s.rank
    mm = 2.0 * n * s.dim * s.rank
    per_expert = [Cost(e * (h + x), mm), Cost(e * 2 * x, 0)]  # y_e = h W_u[e]^T + b_u[e]; w_e * y_e
    return [
        Cost(e * (x + h), mm),  # h = x W_d^T + b_d
        Cost(e * 2 * h + h, 0),  # dropout (writes a bool mask)
        *per_expert * s.experts,
        Cost(e * (s.experts * x + x), 0),  # sum over experts
        Cost(e * 2 * x, 0),  # * scale
        Cost(e * 3 * x, 0),  # + x
    ]


def project(op: str, dims: dict[str, int], dtype, hw: Hardware, backward: bool = False) -> dict[str, float] | None:
    """Projected seconds of the floor, the fused Triton kernels (as the launchers configure them) and
    the eager chain for one op at `dims` (the names of vlfast.gpucheck's cases); None where the fused
    kernel has no model (memvp_memory's and routed_adapter's backward)."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    meta = dict(dtype=dtype, device="meta")
    if op == "cross_attention":
        from vlfast.kernels.cross_attention import launch_config

        s = AttentionShape(dims["B"], dims["H"], dims["Lq"], dims["Lk"], dims["D"], itemsize=itemsize)
        cfg = launch_config(torch.empty(1, 1, s.q_len, s.head_dim, **meta), s.kv_len, interpret=False)
        floor = cross_attention_floor(s, backward)
        fused = cross_attention_triton(s, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], backward)
        eager = cross_attention_eager(s, backward)
    elif backward:
        return None
    elif op == "memvp_memory":
        from vlfast.kernels.memvp_memory import launch_config

        s = MemVPShape(dims["B"], dims["L"], dims["M"], dims["D"], itemsize=itemsize)
        cfg = launch_config(torch.empty(1, 1, s.dim, **meta), s.memory, interpret=False)
        floor, (fused, _) = memvp_floor(s), memvp_triton(s, cfg)
        eager = memvp_eager(s, dropout=False)
    else:
        from vlfast.kernels.routed_adapter import PROGRAMS_PER_SM, launch_config

        s = AdapterShape(dims["B"], dims["B"] * dims["L"], dims["D"], dims["R"], dims["E"], itemsize=itemsize)
        cfg = launch_config(torch.empty(1, 1, s.dim, **meta), s.rank, s.experts, interpret=False)
        floor = routed_adapter_floor(s)
        fused = routed_adapter_triton(s, cfg["BLOCK_L"], cfg["BLOCK_R"], PROGRAMS_PER_SM * hw.sms, hw)
        eager = routed_adapter_eager(s)
    return {"floor_s": floor.seconds(hw), "floor_bytes": floor.bytes, "fused_s": fused.seconds(hw),
            "eager_s": chain_seconds(eager, hw)}

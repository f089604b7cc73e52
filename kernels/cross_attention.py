"""Fused cross-attention in Triton: softmax(scale q k^T + mask) v and its backward.

Tuned for the Q-Former: 32 query tokens attend to 257 image tokens per (batch, head). One program
owns a block of queries that covers all of them (BLOCK_M = 32), so K and V of a (batch, head) are
read exactly once in the forward, and once in the backward, where the same program also owns the
whole dK and dV of that (batch, head) and writes them without atomics. Longer query sequences use
several query blocks; their backward computes dQ per query block and dK / dV in a second kernel
per key block (no atomics, deterministic).

Scores never reach memory: the forward keeps an online softmax (running max and sum per row) and
saves only the row log-sum-exp (+inf for a row with no visible key, whose output is 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from vlfast.kernels.utils import KernelSpec, dot_options, new_output, pointer_type, storage_dtype


@triton.jit
def _load_rows(ptr, rows, cols, n_rows, n_cols, ld):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * ld + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _visible_keys(mask_ptr, batch, keys, kv_len, HAS_MASK: tl.constexpr):
    visible = keys < kv_len
    if HAS_MASK:
        visible = visible & (tl.load(mask_ptr + batch * kv_len + keys, mask=keys < kv_len, other=0) != 0)
    return visible


@triton.jit
def cross_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    heads, q_len, kv_len, head_dim, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # (batch x head) on grid axis 0, whose limit is 2^31 - 1 (axis 1 stops at 65535); 64-bit
    # offsets, as B x H x L x D can pass 2^31.
    bh = tl.program_id(0).to(tl.int64)
    block_m = tl.program_id(1)
    batch = bh // heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    key_offsets = tl.arange(0, BLOCK_N)
    q = _load_rows(q_ptr + bh * q_len * head_dim, rows, cols, q_len, head_dim, head_dim)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + bh * kv_len * head_dim
    v_base = v_ptr + bh * kv_len * head_dim

    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        keys = start + key_offsets
        k = _load_rows(k_base, keys, cols, kv_len, head_dim, head_dim)
        v = _load_rows(v_base, keys, cols, kv_len, head_dim, head_dim)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = _visible_keys(mask_ptr, batch, keys, kv_len, HAS_MASK)
        logits = tl.where(visible[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        # A row with no visible key so far keeps max -inf; shift by 0 instead to avoid inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - shift)
        p = tl.exp(logits - shift[:, None])
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    has_keys = row_sum > 0.0
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None]
    row_ok = rows < q_len
    out_mask = row_ok[:, None] & (cols[None, :] < head_dim)
    tl.store(out_ptr + bh * q_len * head_dim + rows[:, None] * head_dim + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=out_mask)
    lse = tl.where(has_keys, row_max + tl.log(tl.where(has_keys, row_sum, 1.0)), float("inf"))
    tl.store(lse_ptr + bh * q_len + rows, lse, mask=row_ok)


@triton.jit
def _probabilities(q, k, mask_ptr, batch, keys, kv_len, lse, scale,
                   HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """softmax probabilities of a (queries, keys) tile recomputed from the saved log-sum-exp; rows
    with lse = +inf (no visible key, or past q_len) get 0."""
    logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    visible = _visible_keys(mask_ptr, batch, keys, kv_len, HAS_MASK)
    return tl.exp(tl.where(visible[None, :], logits, float("-inf")) - lse[:, None])


@triton.jit
def cross_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    heads, q_len, kv_len, head_dim, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_KV: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of a block of queries over all keys. With WRITE_KV (one query block covers all queries)
    also dK and dV, which this program then owns whole; otherwise it saves the rows' delta for
    cross_attention_bwd_kv_kernel."""
    # (batch x head) on grid axis 0, whose limit is 2^31 - 1 (axis 1 stops at 65535); 64-bit
    # offsets, as B x H x L x D can pass 2^31.
    bh = tl.program_id(0).to(tl.int64)
    block_m = tl.program_id(1)
    batch = bh // heads
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    key_offsets = tl.arange(0, BLOCK_N)
    row_ok = rows < q_len
    q_offset = bh * q_len * head_dim
    q = _load_rows(q_ptr + q_offset, rows, cols, q_len, head_dim, head_dim)
    do = _load_rows(dout_ptr + q_offset, rows, cols, q_len, head_dim, head_dim)
    o = _load_rows(out_ptr + q_offset, rows, cols, q_len, head_dim, head_dim)
    # delta = rowsum(dO * O), the softmax backward's row correction; rows past q_len get lse = +inf
    # and so probability 0.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    if not WRITE_KV:
        tl.store(delta_ptr + bh * q_len + rows, delta, mask=row_ok)
    lse = tl.load(lse_ptr + bh * q_len + rows, mask=row_ok, other=float("inf"))
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    kv_offset = bh * kv_len * head_dim

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        keys = start + key_offsets
        k = _load_rows(k_ptr + kv_offset, keys, cols, kv_len, head_dim, head_dim)
        v = _load_rows(v_ptr + kv_offset, keys, cols, kv_len, head_dim, head_dim)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = _visible_keys(mask_ptr, batch, keys, kv_len, HAS_MASK)
        logits = tl.where(visible[None, :], logits, float("-inf"))
        p = tl.exp(logits - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        if WRITE_KV:
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if WRITE_KV:
            kv_ptrs = kv_offset + keys[:, None] * head_dim + cols[None, :]
            kv_mask = (keys[:, None] < kv_len) & (cols[None, :] < head_dim)
            tl.store(dk_ptr + kv_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(dv_ptr + kv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    tl.store(dq_ptr + q_offset + rows[:, None] * head_dim + cols[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < head_dim))


@triton.jit
def cross_attention_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    heads, q_len, kv_len, head_dim, scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK and dV of a block of keys over all query blocks (used when there are several): each
    program owns its rows of dK and dV, so no atomics and a deterministic result."""
    bh = tl.program_id(0).to(tl.int64)  # as in the kernels above
    block_n = tl.program_id(1)
    batch = bh // heads
    keys = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    kv_offset = bh * kv_len * head_dim
    k = _load_rows(k_ptr + kv_offset, keys, cols, kv_len, head_dim, head_dim)
    v = _load_rows(v_ptr + kv_offset, keys, cols, kv_len, head_dim, head_dim)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_offset = bh * q_len * head_dim
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, q_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q = _load_rows(q_ptr + q_offset, rows, cols, q_len, head_dim, head_dim)
        do = _load_rows(dout_ptr + q_offset, rows, cols, q_len, head_dim, head_dim)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + bh * q_len + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + bh * q_len + rows, mask=row_ok, other=0.0)
        p = _probabilities(q, k, mask_ptr, batch, keys, kv_len, lse, scale, HAS_MASK, PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None]) * scale
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    kv_ptrs = kv_offset + keys[:, None] * head_dim + cols[None, :]
    kv_mask = (keys[:, None] < kv_len) & (cols[None, :] < head_dim)
    tl.store(dk_ptr + kv_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


def launch_config(q: torch.Tensor, kv_len: int, interpret: bool | None = None) -> dict:
    """Launch options for a problem; shared by the launchers and the static report (which
    compiles for a GPU, so passes interpret=False). Chosen from the report: no spills on sm_80 and
    sm_90 at the sizes it lists."""
    q_len, head_dim = q.shape[2], q.shape[3]
    block_d = max(16, triton.next_power_of_2(head_dim))
    narrow = q.element_size() == 2 and block_d <= 64
    return {
        # One query block covers the Q-Former's 32 queries; longer sequences tile by 32.
        "BLOCK_M": min(32, max(16, triton.next_power_of_2(q_len))),
        "BLOCK_N": 64 if narrow else 32 if q.element_size() == 2 else 16,
        "BLOCK_D": block_d,
        "num_warps": 4 if narrow else 8,
        **dot_options(q, interpret),
    }


def report_specs() -> list[KernelSpec]:
    """The compiled variants the static GPU report checks: the Q-Former shape in each dtype, the
    largest head dim, and a long query sequence (dK / dV in their own kernel)."""
    problems = [  # (B, H, Lq, Lk, D, dtype)
        (32, 12, 32, 257, 64, torch.float16),
        (32, 12, 32, 257, 64, torch.bfloat16),
        (32, 12, 32, 257, 64, torch.float32),
        (32, 12, 32, 257, 128, torch.float16),
        (8, 12, 256, 257, 64, torch.float16),
    ]
    specs = []
    for b, h, lq, lk, d, dtype in problems:
        q = torch.empty(b, h, lq, d, dtype=dtype, device="meta")
        cfg = launch_config(q, lk, interpret=False)
        warps = cfg.pop("num_warps")
        label = f"B={b} H={h} Lq={lq} Lk={lk} D={d} {str(dtype).removeprefix('torch.')}"
        values = {"heads": h, "q_len": lq, "kv_len": lk, "head_dim": d}
        t, scalars = pointer_type(dtype), {"heads": "i32", "q_len": "i32", "kv_len": "i32", "head_dim": "i32",
                                           "scale": "fp32"}
        fwd_ptrs = dict(q_ptr=t, k_ptr=t, v_ptr=t, mask_ptr="*u8", out_ptr=t, lse_ptr="*fp32")
        specs.append(KernelSpec(cross_attention_fwd_kernel, {**fwd_ptrs, **scalars},
                                {"HAS_MASK": True, **cfg}, num_warps=warps, label=label, sizes=values))
        one_block = triton.cdiv(lq, cfg["BLOCK_M"]) == 1
        bwd_ptrs = dict(q_ptr=t, k_ptr=t, v_ptr=t, mask_ptr="*u8", out_ptr=t, dout_ptr=t, lse_ptr="*fp32",
                        delta_ptr="*fp32", dq_ptr=t, dk_ptr=t, dv_ptr=t)
        specs.append(KernelSpec(cross_attention_bwd_kernel, {**bwd_ptrs, **scalars},
                                {"HAS_MASK": True, "WRITE_KV": one_block, **cfg}, num_warps=warps, label=label,
                                sizes=values))
        if not one_block:
            kv_ptrs = dict(q_ptr=t, k_ptr=t, v_ptr=t, mask_ptr="*u8", dout_ptr=t, lse_ptr="*fp32",
                           delta_ptr="*fp32", dk_ptr=t, dv_ptr=t)
            specs.append(KernelSpec(cross_attention_bwd_kv_kernel, {**kv_ptrs, **scalars},
                                    {"HAS_MASK": True, **cfg}, num_warps=warps, label=label, sizes=values))
    return specs


def _mask_arg(kv_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    return q if kv_mask is None else kv_mask.view(torch.uint8)  # any pointer when HAS_MASK=False


def cross_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (B,H,L,D) q, k, v and optional (B,Lk) bool mask -> (out, fp32 lse (B,H,Lq))."""
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    out = new_output(q.shape, storage_dtype(q.dtype), q.device)
    lse = new_output((batch, heads, q_len), torch.float32, q.device)
    cfg = launch_config(q, kv_len)
    grid = (batch * heads, triton.cdiv(q_len, cfg["BLOCK_M"]))
    cross_attention_fwd_kernel[grid](
        q, k, v, _mask_arg(kv_mask, q), out, lse, heads, q_len, kv_len, head_dim, scale,
        HAS_MASK=kv_mask is not None, **cfg,
    )
    return out.to(q.dtype), lse


def cross_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    kv_mask: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    cfg = launch_config(q, kv_len)
    q_blocks = triton.cdiv(q_len, cfg["BLOCK_M"])
    written = storage_dtype(q.dtype)
    dq = new_output(q.shape, written, q.device)
    dk = new_output(k.shape, written, k.device)
    dv = new_output(v.shape, written, v.device)
    # One query block: one kernel owns all of dK, dV. Several: a second kernel per key block.
    delta = lse if q_blocks == 1 else new_output(lse.shape, torch.float32, q.device)  # lse: never written
    mask = _mask_arg(kv_mask, q)
    cross_attention_bwd_kernel[(batch * heads, q_blocks)](
        q, k, v, mask, out, dout, lse, delta, dq, dk, dv, heads, q_len, kv_len, head_dim, scale,
        HAS_MASK=kv_mask is not None, WRITE_KV=q_blocks == 1, **cfg,
    )
    if q_blocks > 1:
        cross_attention_bwd_kv_kernel[(batch * heads, triton.cdiv(kv_len, cfg["BLOCK_N"]))](
            q, k, v, mask, dout, lse, delta, dk, dv, heads, q_len, kv_len, head_dim, scale,
            HAS_MASK=kv_mask is not None, **cfg,
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

"""MemVP's FFN memory in Triton: out = scale * dropout(silu(x K^T)) V, K = z + key_pos, V = z + value_pos.

A one-head attention with SiLU instead of softmax, so no running maximum is needed and the memory
(M rows) is tiled like any matrix dimension: any M runs. The forward is two tiled matrix products:
`memvp_activation_kernel` writes the (B, L, M) activation dropout(silu(x K^T)) * scale per
(rows x memory) tile, accumulating over D, and `memvp_times_memory_kernel` multiplies it by V per
(rows x D) tile, accumulating over M. Only that activation and the fp32 pre-activation x K^T, kept
for the backward (each M / D of x's elements), make the round trip through memory; K and V are formed
tile by tile from z and the shared position rows, never materialised. (An earlier version held the
whole memory per program and re-read K and V for every 16 rows: 8.5x slower than plain PyTorch on an
H200, and limited to M <= 512.)

The backward runs the activation kernel in its gradient mode: the product dL/dhidden = dout V^T,
and from the kept pre-activation (no recomputation over D) the dropped activation and the
pre-activation gradient (B, L, M), in bf16 for bf16 inputs (as the unfused op holds them) and fp32
otherwise; then dx = dpre K with the same product kernel, then reduces over rows for dz, dkey_pos
and dvalue_pos (`memvp_bwd_memory_kernel`), deterministically and without atomics.

fp16 (max 65504): the activation and dpre can pass the fp16 range where the fp32 reference and the
op's results do not (x K^T of 2e5 with small V). Wherever such a tile is rounded to fp16 for a
tensor-core product, it is first multiplied by a power of 2 per row of the product's result
(uniform along the reduction), and the fp32 product by its inverse (`_fp16_safe_factor`); the factor
is 1 below 2^15, so ordinary inputs round exactly as before. The fp16 backward's (B, L, M) operands
are fp32 in memory, so each tile finds its own factor. The forward's activation stays fp16 in memory
with one fp32 factor per (row, activation tile) beside it (1/64 more bytes at BLOCK_M = 128), which
costs less traffic than writing the activation in fp32 (twice the bytes, read once per D tile of the
product).

Dropout is counter-based (`kernels/utils.py: dropout_factor`), so the mask is regenerated from the
seed in backward and equal on all backends. Offsets into (B, L, D) and (B, L, M) tensors are 64-bit:
B x L x D can pass 2^31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from vlfast.kernels.utils import (
    KernelSpec,
    dot_options,
    drop_and_save,
    dropout_args,
    dropout_factor,
    new_output,
    pointer_type,
    storage_dtype,
)


@triton.jit
def _memory_rows(z_ptr, pos_ptr, batch, m0, d0, memory, dim,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """The (BLOCK_M, BLOCK_D) tile at (m0, d0) of z[batch] + pos, zero outside (memory, dim), added in
    z's dtype as the unfused op does (fp32 when the interpreter needs fp32 dot operands)."""
    mem, cols = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    mask = (m0 + mem[:, None] < memory) & (d0 + cols[None, :] < dim)
    tile = mem[:, None] * dim + cols[None, :]
    start = tl.cast(m0, tl.int64) * dim + d0
    z = tl.load(z_ptr + batch.to(tl.int64) * memory * dim + start + tile, mask=mask, other=0.0)
    pos = tl.load(pos_ptr + start + tile, mask=mask, other=0.0)
    if DOT_FP32:
        return z.to(tl.float32) + pos.to(tl.float32)
    return z + pos


@triton.jit
def _fp16_safe_factor(tile_max):
    """A power of 2, at most 1, that brings tile_max below 2^15 (fp16's max is 65504): 1 for ordinary
    values, so their fp16 rounding is unchanged; powers of 2 scale without rounding."""
    return tl.exp2(-tl.maximum(tl.floor(tl.log2(tl.maximum(tile_max, 1.0))) - 14.0, 0.0))


@triton.jit
def _pre_activation(x_ptr, z_ptr, pos_ptr, batch, row0, m0, length, memory, dim,
                    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """x[batch, row0:] (z[batch] + pos)[m0:]^T, accumulated over D in fp32: (BLOCK_L, BLOCK_M)."""
    rows, cols = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_D)
    x_rows = x_ptr + (batch * length + row0).to(tl.int64) * dim + rows[:, None] * dim + cols[None, :]
    pre = tl.zeros((BLOCK_L, BLOCK_M), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        x = tl.load(x_rows + d0, mask=(row0 + rows[:, None] < length) & (d0 + cols[None, :] < dim), other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
        memory_rows = _memory_rows(z_ptr, pos_ptr, batch, m0, d0, memory, dim, BLOCK_M, BLOCK_D, DOT_FP32)
        pre += tl.dot(x, tl.trans(memory_rows), input_precision=PRECISION)
    return pre


@triton.jit
def memvp_activation_kernel(
    rows_ptr, z_ptr, pos_ptr, pre_ptr, act_ptr, dpre_ptr, unscale_ptr,
    length, memory, dim, scale, keep_scale, seed, threshold,
    BACKWARD: tl.constexpr, DROPOUT: tl.constexpr, FP16_SAFE: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (rows x memory) tile of rows (z + pos)^T, accumulated over D in fp32, and what follows.
    Forward (rows = x, pos = key_pos): stores pre = x K^T (fp32) and act = dropout(silu(pre)) * scale,
    with FP16_SAFE times a per-row power of 2 whose inverse goes to unscale (B, L, cdiv(M, BLOCK_M)).
    Backward (rows = dout, pos = value_pos: the product is dL/dhidden / scale): from the stored pre,
    stores act = dropout(silu(pre)) * scale and dpre = dropout(scale dhidden) silu'(pre) in act's
    dtype (16-bit inputs take smaller tiles than the forward's: pre loaded beside the product would
    spill registers). Offsets are a 64-bit start per tile plus 32-bit offsets within it (B x L x D
    can pass 2^31), computed after the loop so that they hold no registers during it."""
    batch = tl.program_id(2)
    row0, m0 = tl.program_id(0) * BLOCK_L, tl.program_id(1) * BLOCK_M
    product = _pre_activation(rows_ptr, z_ptr, pos_ptr, batch, row0, m0, length, memory, dim,
                              BLOCK_L, BLOCK_M, BLOCK_D, DOT_FP32, PRECISION)
    rows, mem = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_M)
    start = (batch * length + row0).to(tl.int64) * memory + m0
    tile = rows[:, None] * memory + mem[None, :]
    inside = (row0 + rows[:, None] < length) & (m0 + mem[None, :] < memory)
    # The dropout hash takes the element's index modulo 2^32: int32 arithmetic wraps to the same bits.
    hashed = start.to(tl.int32) + tile
    if BACKWARD:
        pre = tl.load(pre_ptr + start + tile, mask=inside, other=0.0)
        sig = tl.sigmoid(pre)
        dpre = product * scale * sig * (1.0 + pre * (1.0 - sig))  # silu'(a) = s (1 + a (1 - s))
        drop_and_save(pre * sig * scale, dpre, act_ptr + start, dpre_ptr + start, tile, hashed, inside, seed,
                      threshold, keep_scale, DROPOUT)
    else:
        tl.store(pre_ptr + start + tile, product, mask=inside)
        hidden = product * tl.sigmoid(product) * scale
        if DROPOUT:
            hidden = hidden * dropout_factor(seed, hashed, threshold, keep_scale)
        if FP16_SAFE:
            factor = _fp16_safe_factor(tl.max(tl.abs(hidden), axis=1))
            hidden = hidden * factor[:, None]
            tiles = tl.num_programs(1)
            tl.store(unscale_ptr + (batch * length + row0 + rows).to(tl.int64) * tiles + tl.program_id(1),
                     1.0 / factor, mask=row0 + rows < length)
        tl.store(act_ptr + start + tile, hidden.to(act_ptr.dtype.element_ty), mask=inside)


@triton.jit
def memvp_times_memory_kernel(
    act_ptr, unscale_ptr, z_ptr, pos_ptr, out_ptr, length, memory, dim, act_tile,
    STORED_SCALES: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """One (rows x D) tile of out = act (z + pos), act (B, L, M), accumulated over M in fp32. The
    activation is rounded to the output's dtype first, as the unfused op holds it. For an fp16
    output, rows are scaled to fit fp16 first: STORED_SCALES, the activation kernel's (one per
    act_tile columns, which a BLOCK_M tile never straddles), else each tile's own."""
    batch = tl.program_id(2)
    row0, d0 = tl.program_id(0) * BLOCK_L, tl.program_id(1) * BLOCK_D
    rows, mem = tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_M)
    row_start = (batch * length + row0).to(tl.int64)
    act_rows = act_ptr + row_start * memory + rows[:, None] * memory + mem[None, :]
    acc = tl.zeros((BLOCK_L, BLOCK_D), tl.float32)
    for m0 in range(0, memory, BLOCK_M):
        act = tl.load(act_rows + m0, mask=(row0 + rows[:, None] < length) & (m0 + mem[None, :] < memory), other=0.0)
        memory_rows = _memory_rows(z_ptr, pos_ptr, batch, m0, d0, memory, dim, BLOCK_M, BLOCK_D, DOT_FP32)
        if out_ptr.dtype.element_ty == tl.float16:
            if STORED_SCALES:
                factor = 1.0 / tl.load(unscale_ptr + (row_start + rows) * tl.cdiv(memory, act_tile) + m0 // act_tile,
                                       mask=row0 + rows < length, other=1.0)
            else:
                factor = _fp16_safe_factor(tl.max(tl.abs(act), axis=1))
                act = act * factor[:, None]
            # Scaling the accumulator too (by a power of 2: exact) spares a second (BLOCK_L, BLOCK_D) tile.
            acc = tl.dot(act.to(tl.float16), memory_rows, acc * factor[:, None], input_precision=PRECISION)
            acc = acc / factor[:, None]
        else:
            act = act.to(out_ptr.dtype.element_ty)
            if DOT_FP32:
                act = act.to(tl.float32)
            acc += tl.dot(act, memory_rows, input_precision=PRECISION)
    cols = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + row_start * dim + d0 + rows[:, None] * dim + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(row0 + rows[:, None] < length) & (d0 + cols[None, :] < dim))


@triton.jit
def memvp_bwd_memory_kernel(
    act_ptr, rows_ptr, dz_in_ptr, dz_out_ptr, dpos_ptr,
    batches, length, memory, dim,
    ACCUMULATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (memory rows, D columns) tile, one side of the memory gradient: G_b = act_b^T rows_b summed
    over the L rows, with (act, rows) = (dpre, x) for the keys and (scale * hidden, dout) for the
    values. dz_out_b = G_b (fp32), or with ACCUMULATE (the second side) dz_in_b + G_b in
    dz_out's dtype; dpos = sum_b G_b. fp16 act tiles are scaled per memory row to fit fp16
    (`_fp16_safe_factor`)."""
    mem = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tile_mask = (mem[:, None] < memory) & (cols[None, :] < dim)
    dpos = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for batch in range(0, batches):
        grad = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for l0 in range(0, length, BLOCK_L):
            steps = l0 + tl.arange(0, BLOCK_L)
            act = tl.load(act_ptr + (batch * length + steps[:, None]).to(tl.int64) * memory + mem[None, :],
                          mask=(steps[:, None] < length) & (mem[None, :] < memory), other=0.0)
            rows = tl.load(rows_ptr + (batch * length + steps[:, None]).to(tl.int64) * dim + cols[None, :],
                           mask=(steps[:, None] < length) & (cols[None, :] < dim), other=0.0)
            if DOT_FP32:
                grad += tl.dot(tl.trans(act), rows.to(tl.float32), input_precision=PRECISION)
            elif rows_ptr.dtype.element_ty == tl.float16:
                # Scaling the accumulator too (by a power of 2: exact) spares a second (BLOCK_M, BLOCK_D) tile.
                fit = _fp16_safe_factor(tl.max(tl.abs(act), axis=0))
                grad = tl.dot(tl.trans((act * fit[None, :]).to(tl.float16)), rows, grad * fit[:, None],
                              input_precision=PRECISION) / fit[:, None]
            else:
                grad += tl.dot(tl.trans(act.to(rows.dtype)), rows, input_precision=PRECISION)
        dz = (batch * memory + mem[:, None]).to(tl.int64) * dim + cols[None, :]
        if ACCUMULATE:
            total = tl.load(dz_in_ptr + dz, mask=tile_mask, other=0.0) + grad
            tl.store(dz_out_ptr + dz, total.to(dz_out_ptr.dtype.element_ty), mask=tile_mask)
        else:
            tl.store(dz_out_ptr + dz, grad, mask=tile_mask)
        dpos += grad
    tl.store(dpos_ptr + mem[:, None] * dim + cols[None, :], dpos.to(dpos_ptr.dtype.element_ty), mask=tile_mask)


# (BLOCK_L, BLOCK_M, BLOCK_D, warps) of every kernel for 2-byte and 4-byte inputs (fp32: 3-pass tf32,
# smaller tiles). The activation kernels' BLOCK_M is a cap: they take the memory's power of 2 up to it.
TILES = {
    2: {"act": (128, 128, 64, 8), "act_backward": (128, 64, 64, 8), "product": (128, 32, 128, 8),
        "memory": (32, 128, 64, 8)},
    4: {"act": (64, 64, 32, 8), "act_backward": (64, 64, 32, 8), "product": (128, 32, 64, 8),
        "memory": (32, 64, 64, 8)},
}


def launch_config(x: torch.Tensor, memory: int, interpret: bool | None = None) -> dict:
    """Tiles and warps of every kernel (TILES): `act` / `act_backward`, (rows x memory) activation
    tiles reduced over D; `product`, (rows x D) output tiles reduced over M (out and dx); `memory`,
    the memory-gradient kernel's (memory x D) tiles reduced over rows. Chosen with `python -m
    vlfast.kernels.report`: no spills on sm_80 and sm_90, and shared memory within 99 KiB on sm_80
    (A10 / L4 / L40S-class GPUs). Large tiles: every operand is re-read through L2 once per tile
    along the other side, so 128 x 128 activation tiles read x 3 times and z + pos 4 times at
    LLaMA-7B's L = 512, M = 320 (64 x 64: 5 and 8 times)."""
    dots = dot_options(x, interpret)
    config = {}
    for kernel, (block_l, block_m, block_d, warps) in TILES[x.element_size()].items():
        if kernel.startswith("act"):
            block_m = min(block_m, max(16, triton.next_power_of_2(memory)))
        config[kernel] = dict(BLOCK_L=block_l, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, **dots)
    return config


def _activation(rows, z, pos, pre, act, dpre, unscale, scale, dropout_p, seed, cfg) -> None:
    """The forward's activation (dpre None) or the backward's (rows = dout, pos = value_pos)."""
    batch, length, dim = rows.shape
    memory = z.shape[1]
    tiles = cfg["act" if dpre is None else "act_backward"]
    grid = (triton.cdiv(length, tiles["BLOCK_L"]), triton.cdiv(memory, tiles["BLOCK_M"]), batch)
    memvp_activation_kernel[grid](
        rows, z, pos, pre, act, dpre if dpre is not None else act, unscale if unscale is not None else pre,
        length, memory, dim, scale, **dropout_args(dropout_p, seed),
        BACKWARD=dpre is not None, DROPOUT=dropout_p > 0, FP16_SAFE=unscale is not None, **tiles,
    )


def _times_memory(act, unscale, z, pos, out, cfg) -> None:
    """out = act (z + pos); unscale: the activation kernel's fp16 factors (forward, fp16), or None."""
    batch, length, dim = out.shape
    memory = z.shape[1]
    tiles = cfg["product"]
    act_tile = cfg["act"]["BLOCK_M"]
    # A product tile must lie within one activation tile to share its row factors.
    assert act_tile % tiles["BLOCK_M"] == 0 or act_tile >= memory, (act_tile, tiles["BLOCK_M"])
    grid = (triton.cdiv(length, tiles["BLOCK_L"]), triton.cdiv(dim, tiles["BLOCK_D"]), batch)
    memvp_times_memory_kernel[grid](act, unscale if unscale is not None else act, z, pos, out, length, memory, dim,
                                    act_tile, STORED_SCALES=unscale is not None, **tiles)


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the backward's (B, L, M) activation and pre-activation gradient: bf16 for bf16
    inputs, as the unfused op holds them (half the traffic of fp32, read once per D tile by three
    products), fp32 otherwise (fp16 ones can pass 65504 where the results do not)."""
    return dtype if dtype == torch.bfloat16 else torch.float32


def memvp_memory_forward(x, z, key_pos, value_pos, scale: float, dropout_p: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, pre): pre = x (z + key_pos)^T in fp32, for the backward."""
    batch, length, _ = x.shape
    memory = z.shape[1]
    cfg = launch_config(x, memory)
    # The activation in the dtype the product reads (fp32 where the interpreter needs fp32 operands).
    act = new_output((batch, length, memory), torch.float32 if cfg["act"]["DOT_FP32"] else x.dtype, x.device)
    pre = new_output((batch, length, memory), torch.float32, x.device)
    unscale = None
    if x.dtype == torch.float16:
        unscale = new_output((batch, length, triton.cdiv(memory, cfg["act"]["BLOCK_M"])), torch.float32, x.device)
    _activation(x, z, key_pos, pre, act, None, unscale, scale, dropout_p, seed, cfg)
    out = new_output(x.shape, storage_dtype(x.dtype), x.device)
    _times_memory(act, unscale, z, value_pos, out, cfg)
    return out.to(x.dtype), pre


def memvp_memory_backward(dout, x, z, key_pos, value_pos, pre, scale: float, dropout_p: float, seed: int):
    batch, length, dim = x.shape
    memory = z.shape[1]
    kept = storage_dtype(gradient_dtype(x.dtype))
    hidden = new_output((batch, length, memory), kept, x.device)  # scale * dropout(silu(pre))
    dpre = new_output((batch, length, memory), kept, x.device)
    cfg = launch_config(x, memory)
    _activation(dout, z, value_pos, pre, hidden, dpre, None, scale, dropout_p, seed, cfg)
    written = storage_dtype(x.dtype)
    dx = new_output(x.shape, written, x.device)
    _times_memory(dpre, None, z, key_pos, dx, cfg)
    # dz = dK + dV: the keys' launch writes dK in fp32, the values' adds dV and rounds once.
    dkeys = new_output(z.shape, torch.float32, z.device)
    dz = new_output(z.shape, written, z.device)
    dkey_pos = new_output(key_pos.shape, written, key_pos.device)
    dvalue_pos = new_output(value_pos.shape, written, value_pos.device)
    mcfg = cfg["memory"]
    grid = (triton.cdiv(memory, mcfg["BLOCK_M"]), triton.cdiv(dim, mcfg["BLOCK_D"]))
    for act, rows, out, dpos, accumulate in ((dpre, x, dkeys, dkey_pos, False), (hidden, dout, dz, dvalue_pos, True)):
        memvp_bwd_memory_kernel[grid](act, rows, dkeys, out, dpos, batch, length, memory, dim, ACCUMULATE=accumulate,
                                      **mcfg)
    return dx.to(x.dtype), dz.to(z.dtype), dkey_pos.to(key_pos.dtype), dvalue_pos.to(value_pos.dtype)


def report_specs() -> list[KernelSpec]:
    """LLaMA-7B's MemVP shape (D = 4096, L = 512, M = 320) in fp16, bf16 and fp32."""
    specs = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.empty(1, 512, 4096, dtype=dtype, device="meta")
        t, g = pointer_type(dtype), pointer_type(gradient_dtype(dtype))
        label = f"L=512 M=320 D=4096 {str(dtype).removeprefix('torch.')}"
        cfg = launch_config(x, 320, interpret=False)
        act, backward, product, memory_cfg = (dict(cfg[k]) for k in ("act", "act_backward", "product", "memory"))
        act_warps, backward_warps, product_warps, memory_warps = (
            c.pop("num_warps") for c in (act, backward, product, memory_cfg))
        values = {"length": 512, "memory": 320, "dim": 4096, "act_tile": act["BLOCK_M"]}
        sizes = {"length": "i32", "memory": "i32", "dim": "i32"}
        act_args = {"rows_ptr": t, "z_ptr": t, "pos_ptr": t, "pre_ptr": "*fp32", "unscale_ptr": "*fp32", **sizes,
                    "scale": "fp32", "keep_scale": "fp32", "seed": "i32", "threshold": "i32"}
        fp16_safe = dtype == torch.float16
        product_args = {"act_ptr": t, "unscale_ptr": "*fp32", "z_ptr": t, "pos_ptr": t, "out_ptr": t, **sizes,
                        "act_tile": "i32"}
        specs += [
            KernelSpec(memvp_activation_kernel, {**act_args, "act_ptr": t, "dpre_ptr": t},
                       {"BACKWARD": False, "DROPOUT": True, "FP16_SAFE": fp16_safe, **act}, act_warps,
                       label + " forward", sizes=values),
            KernelSpec(memvp_activation_kernel, {**act_args, "act_ptr": g, "dpre_ptr": g},
                       {"BACKWARD": True, "DROPOUT": True, "FP16_SAFE": False, **backward}, backward_warps,
                       label + " backward", sizes=values),
            KernelSpec(memvp_times_memory_kernel, product_args, {"STORED_SCALES": fp16_safe, **product},
                       product_warps, label + " forward", sizes=values),
            KernelSpec(memvp_times_memory_kernel, {**product_args, "act_ptr": g},
                       {"STORED_SCALES": False, **product}, product_warps, label + " backward (dx)", sizes=values),
            KernelSpec(memvp_bwd_memory_kernel, {
                "act_ptr": g, "rows_ptr": t, "dz_in_ptr": "*fp32", "dz_out_ptr": t, "dpos_ptr": t,
                "batches": "i32", "length": "i32", "memory": "i32", "dim": "i32"},
                {"ACCUMULATE": True, **memory_cfg}, memory_warps, label, sizes=values),
        ]
    return specs

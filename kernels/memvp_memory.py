"""MemVP's FFN memory in Triton: out = scale * dropout(silu(x K^T)) V, K = z + key_pos, V = z + value_pos.

A one-head attention with SiLU instead of softmax. The forward is two chained matrix products per
block of rows: the program accumulates the (rows x M) pre-activation over D in registers, applies
SiLU and dropout there, and multiplies by V chunk by chunk of D, so the (B, L, M) activation never
reaches memory. K and V are formed tile by tile from z and the shared position rows, never
materialised. The whole memory (M <= 512, padded to a power of two) is held per program.

The backward writes the dropped activation and the pre-activation gradient (B, L, M) once
(`memvp_bwd_rows_kernel`, which also produces dx), then reduces over rows for dz, dkey_pos and
dvalue_pos (`memvp_bwd_memory_kernel`), deterministically and without atomics.

Dropout is counter-based (`kernels/utils.py: dropout_factor`), so the mask is regenerated from the
seed in backward and equal on all backends.
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
def _memory_rows(z_ptr, pos_ptr, batch, mem, cols, memory, dim, DOT_FP32: tl.constexpr):
    """A (BLOCK_M, BLOCK_D) tile of z[batch] + pos, zero outside (memory, dim), added in z's dtype
    as the unfused op does (fp32 when the interpreter needs fp32 dot operands)."""
    mask = (mem[:, None] < memory) & (cols[None, :] < dim)
    offsets = mem[:, None] * dim + cols[None, :]
    z = tl.load(z_ptr + (batch * memory).to(tl.int64) * dim + offsets, mask=mask, other=0.0)
    pos = tl.load(pos_ptr + offsets, mask=mask, other=0.0)
    if DOT_FP32:
        return z.to(tl.float32) + pos.to(tl.float32)
    return z + pos


@triton.jit
def _pre_activation(x_ptr, z_ptr, pos_ptr, batch, rows, mem, length, memory, dim,
                    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """x[batch, rows] (z[batch] + pos)^T, accumulated over D in fp32: (BLOCK_L, BLOCK_M). Offsets into
    (B, L, D) tensors are 64-bit here and below: B x L x D can pass 2^31."""
    pre = tl.zeros((BLOCK_L, BLOCK_M), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + (batch * length + rows[:, None]).to(tl.int64) * dim + cols[None, :],
                    mask=(rows[:, None] < length) & (cols[None, :] < dim), other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
        memory_rows = _memory_rows(z_ptr, pos_ptr, batch, mem, cols, memory, dim, DOT_FP32)
        pre += tl.dot(x, tl.trans(memory_rows), input_precision=PRECISION)
    return pre


@triton.jit
def _store_times_memory(out_ptr, act, z_ptr, pos_ptr, batch, rows, mem, length, memory, dim,
                        BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """out[batch, rows] = act (z[batch] + pos), one D chunk at a time; act is (BLOCK_L, BLOCK_M) fp32."""
    act = act.to(tl.float32 if DOT_FP32 else out_ptr.dtype.element_ty)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        memory_rows = _memory_rows(z_ptr, pos_ptr, batch, mem, cols, memory, dim, DOT_FP32)
        out = tl.dot(act, memory_rows, input_precision=PRECISION)
        tl.store(out_ptr + (batch * length + rows[:, None]).to(tl.int64) * dim + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < length) & (cols[None, :] < dim))


@triton.jit
def memvp_fwd_kernel(
    x_ptr, z_ptr, key_pos_ptr, value_pos_ptr, out_ptr,
    length, memory, dim, scale, keep_scale, seed, threshold,
    DROPOUT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    batch = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mem = tl.arange(0, BLOCK_M)
    pre = _pre_activation(x_ptr, z_ptr, key_pos_ptr, batch, rows, mem, length, memory, dim,
                          BLOCK_L, BLOCK_M, BLOCK_D, DOT_FP32, PRECISION)
    hidden = pre * tl.sigmoid(pre) * scale
    if DROPOUT:
        offsets = (batch * length + rows[:, None]).to(tl.int64) * memory + mem[None, :]
        hidden = hidden * dropout_factor(seed, offsets, threshold, keep_scale)
    _store_times_memory(out_ptr, hidden, z_ptr, value_pos_ptr, batch, rows, mem, length, memory, dim,
                        BLOCK_D, DOT_FP32, PRECISION)


@triton.jit
def memvp_bwd_rows_kernel(
    x_ptr, z_ptr, key_pos_ptr, value_pos_ptr, dout_ptr, hidden_ptr, dpre_ptr, dx_ptr,
    length, memory, dim, scale, keep_scale, seed, threshold,
    DROPOUT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per block of rows: hidden = dropout(silu(pre)) and dpre = dL/dpre (fp32, (B, L, M)), and dx."""
    batch = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mem = tl.arange(0, BLOCK_M)
    pre = _pre_activation(x_ptr, z_ptr, key_pos_ptr, batch, rows, mem, length, memory, dim,
                          BLOCK_L, BLOCK_M, BLOCK_D, DOT_FP32, PRECISION)
    # dL/dhidden = dout (z + value_pos)^T: the same product as the pre-activation.
    dhidden = _pre_activation(dout_ptr, z_ptr, value_pos_ptr, batch, rows, mem, length, memory, dim,
                              BLOCK_L, BLOCK_M, BLOCK_D, DOT_FP32, PRECISION)
    sig = tl.sigmoid(pre)
    dpre = dhidden * scale * sig * (1.0 + pre * (1.0 - sig))
    offsets = (batch * length + rows[:, None]).to(tl.int64) * memory + mem[None, :]
    dpre = drop_and_save(pre * sig, dpre, hidden_ptr, dpre_ptr, offsets,
                         (rows[:, None] < length) & (mem[None, :] < memory), seed, threshold, keep_scale, DROPOUT)
    _store_times_memory(dx_ptr, dpre, z_ptr, key_pos_ptr, batch, rows, mem, length, memory, dim,
                        BLOCK_D, DOT_FP32, PRECISION)


@triton.jit
def memvp_bwd_memory_kernel(
    act_ptr, rows_ptr, dz_ptr, dpos_ptr,
    batches, length, memory, dim, factor,
    ACCUMULATE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (memory rows, D columns) tile, one side of the memory gradient: G_b = factor * act_b^T
    rows_b summed over the L rows, with (act, rows) = (dpre, x) for the keys and (hidden, dout)
    for the values. dz_b = G_b (or += G_b when ACCUMULATE: the second side), dpos = sum_b G_b."""
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
                rows = rows.to(tl.float32)
            else:
                act = act.to(rows.dtype)
            grad += tl.dot(tl.trans(act), rows, input_precision=PRECISION)
        grad = grad * factor
        dz_ptrs = dz_ptr + (batch * memory + mem[:, None]).to(tl.int64) * dim + cols[None, :]
        if ACCUMULATE:
            tl.store(dz_ptrs, tl.load(dz_ptrs, mask=tile_mask, other=0.0) + grad, mask=tile_mask)
        else:
            tl.store(dz_ptrs, grad, mask=tile_mask)
        dpos += grad
    tl.store(dpos_ptr + mem[:, None] * dim + cols[None, :], dpos.to(dpos_ptr.dtype.element_ty), mask=tile_mask)


def max_memory(dtype: torch.dtype) -> int:
    """Largest M the row kernels hold per program without spilling (static report, sm_80/sm_90)."""
    return 128 if dtype == torch.float32 else 512


def launch_config(x: torch.Tensor, memory: int, interpret: bool | None = None) -> dict:
    """Launch options of the row kernels: the whole memory per program; wide tiles (memory >= 256
    16-bit or >= 128 fp32 elements) get 16 rows, 16-wide D chunks and 8 warps to stay in registers."""
    block_m = max(16, triton.next_power_of_2(memory))
    wide = block_m * x.element_size() >= 512
    return {
        "BLOCK_L": 16 if wide else 32,
        "BLOCK_M": block_m,
        "BLOCK_D": 16 if wide else 32,
        "num_warps": 8 if wide else 4,
        **dot_options(x, interpret),
    }


def memory_kernel_config(x: torch.Tensor, interpret: bool | None = None) -> dict:
    return {"BLOCK_L": 16, "BLOCK_M": 32, "BLOCK_D": 64, "num_warps": 4, **dot_options(x, interpret)}


def memvp_memory_forward(x, z, key_pos, value_pos, scale: float, dropout_p: float, seed: int) -> torch.Tensor:
    batch, length, dim = x.shape
    memory = z.shape[1]
    out = new_output(x.shape, storage_dtype(x.dtype), x.device)
    cfg = launch_config(x, memory)
    grid = (triton.cdiv(length, cfg["BLOCK_L"]), batch)
    memvp_fwd_kernel[grid](
        x, z, key_pos, value_pos, out, length, memory, dim, scale, **dropout_args(dropout_p, seed),
        DROPOUT=dropout_p > 0, **cfg,
    )
    return out.to(x.dtype)


def memvp_memory_backward(dout, x, z, key_pos, value_pos, scale: float, dropout_p: float, seed: int):
    batch, length, dim = x.shape
    memory = z.shape[1]
    hidden = new_output((batch, length, memory), torch.float32, x.device)
    dpre = new_output((batch, length, memory), torch.float32, x.device)
    written = storage_dtype(x.dtype)
    dx = new_output(x.shape, written, x.device)
    cfg = launch_config(x, memory)
    memvp_bwd_rows_kernel[(triton.cdiv(length, cfg["BLOCK_L"]), batch)](
        x, z, key_pos, value_pos, dout, hidden, dpre, dx, length, memory, dim, scale,
        **dropout_args(dropout_p, seed), DROPOUT=dropout_p > 0, **cfg,
    )
    # dz = dK + dV is summed in fp32 over two launches (keys, then values) and rounded once.
    dz = new_output(z.shape, torch.float32, z.device)
    dkey_pos = new_output(key_pos.shape, written, key_pos.device)
    dvalue_pos = new_output(value_pos.shape, written, value_pos.device)
    mcfg = memory_kernel_config(x)
    grid = (triton.cdiv(memory, mcfg["BLOCK_M"]), triton.cdiv(dim, mcfg["BLOCK_D"]))
    for act, rows, dpos, factor, accumulate in ((dpre, x, dkey_pos, 1.0, False),
                                                (hidden, dout, dvalue_pos, scale, True)):
        memvp_bwd_memory_kernel[grid](act, rows, dz, dpos, batch, length, memory, dim, factor,
                                      ACCUMULATE=accumulate, **mcfg)
    return dx.to(x.dtype), dz.to(z.dtype), dkey_pos.to(key_pos.dtype), dvalue_pos.to(value_pos.dtype)


def report_specs() -> list[KernelSpec]:
    """LLaMA-7B's MemVP shape (D = 4096, L = 512, M = 320) in fp16 and bf16, a small memory
    (M = 64), and fp32 at its largest memory (M = 128)."""
    specs = []
    for memory, dtype in ((320, torch.float16), (320, torch.bfloat16), (64, torch.float16),
                          (128, torch.float32)):
        x = torch.empty(1, 512, 4096, dtype=dtype, device="meta")
        t = pointer_type(dtype)
        label = f"L=512 M={memory} D=4096 {str(dtype).removeprefix('torch.')}"
        scalars = {"length": "i32", "memory": "i32", "dim": "i32", "scale": "fp32", "keep_scale": "fp32",
                   "seed": "i32", "threshold": "i32"}
        cfg = launch_config(x, memory, interpret=False)
        warps = cfg.pop("num_warps")
        memory_cfg = memory_kernel_config(x, interpret=False)
        memory_warps = memory_cfg.pop("num_warps")
        rows = {"x_ptr": t, "z_ptr": t, "key_pos_ptr": t, "value_pos_ptr": t}
        specs += [
            KernelSpec(memvp_fwd_kernel, {**rows, "out_ptr": t, **scalars}, {"DROPOUT": True, **cfg}, warps, label),
            KernelSpec(memvp_bwd_rows_kernel, {**rows, "dout_ptr": t, "hidden_ptr": "*fp32", "dpre_ptr": "*fp32",
                                               "dx_ptr": t, **scalars}, {"DROPOUT": True, **cfg}, warps, label),
            KernelSpec(memvp_bwd_memory_kernel, {
                "act_ptr": "*fp32", "rows_ptr": t, "dz_ptr": "*fp32", "dpos_ptr": t, "batches": "i32",
                "length": "i32", "memory": "i32", "dim": "i32", "factor": "fp32"},
                {"ACCUMULATE": True, **memory_cfg}, memory_warps, label),
        ]
    return specs

"""LaVIN's mixture-of-modality adapter in Triton: out = x + scale * sum_e w_e (h W_u[e]^T + b_u[e]),
h = dropout(x W_d^T + b_d), w = softmax((router_input W_r^T + b_r) / temperature).

Memory-bound for small ranks. One program owns a block of rows of one sample and does everything
in one launch: the routing weights (recomputed per program, E x D multiply-adds), the down
projection, dropout, the experts' up projections mixed by the routing weights tile by tile of D
(sum_e w_e W_u[e] is never stored), the scale and the residual. x is read in two passes over D
(the down projection needs all of D before the up projection can start); the forward is
persistent (a fixed number of programs walk the row blocks), so only programs x rows x D elements
are between the passes at any time and the second read comes from L2.

The backward's row kernel writes the dropped hidden state and its gradient ((B, L, R), R <= 64)
and dx; a column kernel reduces over rows for dW_d and the per-sample gradients of the mixed up
projection; the (B, E, D, R)-sized rest is left to PyTorch by the caller.
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
def _routing_weights(router_input_ptr, router_weight_ptr, router_bias_ptr, batch, experts, dim, temperature,
                     BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """softmax((router_input[batch] W_r^T + b_r) / temperature) over the experts, 0 past them."""
    expert = tl.arange(0, BLOCK_E)
    logits = tl.zeros((BLOCK_E,), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        inputs = tl.load(router_input_ptr + batch * dim + cols, mask=cols < dim, other=0.0).to(tl.float32)
        weight = tl.load(router_weight_ptr + expert[:, None] * dim + cols[None, :],
                         mask=(expert[:, None] < experts) & (cols[None, :] < dim), other=0.0).to(tl.float32)
        logits += tl.sum(weight * inputs[None, :], axis=1)
    bias = tl.load(router_bias_ptr + expert, mask=expert < experts, other=0.0).to(tl.float32)
    logits = tl.where(expert < experts, (logits + bias) / temperature, float("-inf"))
    weights = tl.exp(logits - tl.max(logits, axis=0))
    return weights / tl.sum(weights, axis=0)


@triton.jit
def _rows_tile(ptr, batch, rows, cols, length, dim):
    """A (rows, cols) tile of a (B, L, D) tensor; offsets in 64 bits, as B x L x D can pass 2^31."""
    return tl.load(ptr + (batch * length + rows[:, None]).to(tl.int64) * dim + cols[None, :],
                   mask=(rows[:, None] < length) & (cols[None, :] < dim), other=0.0)


@triton.jit
def _down_projection(x_ptr, down_weight_ptr, down_bias_ptr, batch, rows, length, dim, rank,
                     BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """x[batch, rows] W_d^T + b_d, (BLOCK_L, BLOCK_R) in fp32, 0 past the rank."""
    ranks = tl.arange(0, BLOCK_R)
    hidden = tl.zeros((BLOCK_L, BLOCK_R), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = _rows_tile(x_ptr, batch, rows, cols, length, dim)
        weight = tl.load(down_weight_ptr + ranks[:, None] * dim + cols[None, :],
                         mask=(ranks[:, None] < rank) & (cols[None, :] < dim), other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            weight = weight.to(tl.float32)
        hidden += tl.dot(x, tl.trans(weight), input_precision=PRECISION)
    bias = tl.load(down_bias_ptr + ranks, mask=ranks < rank, other=0.0).to(tl.float32)
    return hidden + bias[None, :]


@triton.jit
def _mixed_up_tile(up_weight_ptr, up_bias_ptr, weights, cols, experts, dim, rank,
                   BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_e w_e W_u[e][cols] (BLOCK_D, BLOCK_R) and sum_e w_e b_u[e][cols] (BLOCK_D), fp32."""
    expert = tl.arange(0, BLOCK_E)
    ranks = tl.arange(0, BLOCK_R)
    mixed = tl.zeros((BLOCK_D, BLOCK_R), tl.float32)
    mixed_bias = tl.zeros((BLOCK_D,), tl.float32)
    tile_mask = (cols[:, None] < dim) & (ranks[None, :] < rank)
    for e in range(0, experts):
        w = tl.sum(tl.where(expert == e, weights, 0.0), axis=0)
        up = tl.load(up_weight_ptr + (e * dim + cols[:, None]) * rank + ranks[None, :], mask=tile_mask, other=0.0)
        mixed += w * up.to(tl.float32)
        mixed_bias += w * tl.load(up_bias_ptr + e * dim + cols, mask=cols < dim, other=0.0).to(tl.float32)
    return mixed, mixed_bias


@triton.jit
def routed_adapter_fwd_kernel(
    x_ptr, router_input_ptr, router_weight_ptr, router_bias_ptr, down_weight_ptr, down_bias_ptr,
    up_weight_ptr, up_bias_ptr, out_ptr,
    batches, length, dim, rank, experts, temperature, scale, keep_scale, seed, threshold,
    DROPOUT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Persistent: each program walks row blocks (batch-major), so at most one block per program is
    between its two passes over x, and the second pass reads it from L2."""
    ranks = tl.arange(0, BLOCK_R)
    blocks_per_sample = tl.cdiv(length, BLOCK_L)
    for block in range(tl.program_id(0), batches * blocks_per_sample, tl.num_programs(0)):
        batch = block // blocks_per_sample
        rows = (block % blocks_per_sample) * BLOCK_L + tl.arange(0, BLOCK_L)
        weights = _routing_weights(router_input_ptr, router_weight_ptr, router_bias_ptr, batch, experts, dim,
                                   temperature, BLOCK_E, BLOCK_D)
        hidden = _down_projection(x_ptr, down_weight_ptr, down_bias_ptr, batch, rows, length, dim, rank,
                                  BLOCK_L, BLOCK_R, BLOCK_D, DOT_FP32, PRECISION)
        if DROPOUT:
            offsets = (batch * length + rows[:, None]).to(tl.int64) * rank + ranks[None, :]
            hidden = hidden * dropout_factor(seed, offsets, threshold, keep_scale)
        hidden = hidden.to(tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty)
        for d0 in range(0, dim, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mixed, mixed_bias = _mixed_up_tile(up_weight_ptr, up_bias_ptr, weights, cols, experts, dim, rank,
                                               BLOCK_E, BLOCK_R, BLOCK_D)
            up = tl.dot(hidden, tl.trans(mixed.to(hidden.dtype)), input_precision=PRECISION)
            x = _rows_tile(x_ptr, batch, rows, cols, length, dim).to(tl.float32)
            out = x + scale * (up + mixed_bias[None, :])
            tl.store(out_ptr + (batch * length + rows[:, None]).to(tl.int64) * dim + cols[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < length) & (cols[None, :] < dim))


@triton.jit
def routed_adapter_bwd_rows_kernel(
    x_ptr, dout_ptr, weights_ptr, down_weight_ptr, down_bias_ptr, up_weight_ptr, up_bias_ptr,
    hidden_ptr, dhidden_ptr, dx_ptr,
    length, dim, rank, experts, scale, keep_scale, seed, threshold,
    DROPOUT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per block of rows: the dropped hidden state h and dL/d(x W_d^T + b_d) (fp32, (B, L, R)), and dx."""
    batch = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    ranks = tl.arange(0, BLOCK_R)
    expert = tl.arange(0, BLOCK_E)
    weights = tl.load(weights_ptr + batch * experts + expert, mask=expert < experts, other=0.0)
    hidden = _down_projection(x_ptr, down_weight_ptr, down_bias_ptr, batch, rows, length, dim, rank,
                              BLOCK_L, BLOCK_R, BLOCK_D, DOT_FP32, PRECISION)
    dhidden = tl.zeros((BLOCK_L, BLOCK_R), tl.float32)
    # dL/dh = scale * dout W_mix, W_mix = sum_e w_e W_u[e] (zero rows past the rank).
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mixed, _ = _mixed_up_tile(up_weight_ptr, up_bias_ptr, weights, cols, experts, dim, rank,
                                  BLOCK_E, BLOCK_R, BLOCK_D)
        dout = _rows_tile(dout_ptr, batch, rows, cols, length, dim)
        if DOT_FP32:
            dout = dout.to(tl.float32)
        dhidden += tl.dot(dout, mixed.to(dout.dtype), input_precision=PRECISION)
    offsets = (batch * length + rows[:, None]).to(tl.int64) * rank + ranks[None, :]
    dhidden = drop_and_save(hidden, dhidden * scale, hidden_ptr, dhidden_ptr, offsets,
                            (rows[:, None] < length) & (ranks[None, :] < rank), seed, threshold, keep_scale, DROPOUT)
    dhidden = dhidden.to(tl.float32 if DOT_FP32 else dx_ptr.dtype.element_ty)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        weight = tl.load(down_weight_ptr + ranks[:, None] * dim + cols[None, :],
                         mask=(ranks[:, None] < rank) & (cols[None, :] < dim), other=0.0)
        dx = tl.dot(dhidden, weight.to(dhidden.dtype), input_precision=PRECISION)
        dx += _rows_tile(dout_ptr, batch, rows, cols, length, dim).to(tl.float32)
        tl.store(dx_ptr + (batch * length + rows[:, None]).to(tl.int64) * dim + cols[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=(rows[:, None] < length) & (cols[None, :] < dim))


@triton.jit
def routed_adapter_bwd_columns_kernel(
    x_ptr, dout_ptr, hidden_ptr, dhidden_ptr, ddown_weight_ptr, dmixed_up_ptr, dmixed_bias_ptr,
    batches, length, dim, rank, scale,
    BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per block of D columns, reducing over all rows: dW_d = sum dh^T x (R, D), and per sample the
    gradients of the mixed up projection, scale * dout^T h (D, R), and of its bias, scale * sum dout."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    ranks = tl.arange(0, BLOCK_R)
    ddown = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for batch in range(0, batches):
        dmixed = tl.zeros((BLOCK_D, BLOCK_R), tl.float32)
        dbias = tl.zeros((BLOCK_D,), tl.float32)
        for l0 in range(0, length, BLOCK_L):
            rows = l0 + tl.arange(0, BLOCK_L)
            act_offsets = (batch * length + rows[:, None]).to(tl.int64) * rank + ranks[None, :]
            act_mask = (rows[:, None] < length) & (ranks[None, :] < rank)
            hidden = tl.load(hidden_ptr + act_offsets, mask=act_mask, other=0.0)
            dhidden = tl.load(dhidden_ptr + act_offsets, mask=act_mask, other=0.0)
            x = _rows_tile(x_ptr, batch, rows, cols, length, dim)
            dout = _rows_tile(dout_ptr, batch, rows, cols, length, dim)
            dbias += tl.sum(dout.to(tl.float32), axis=0)
            if DOT_FP32:
                x = x.to(tl.float32)
                dout = dout.to(tl.float32)
            else:
                hidden = hidden.to(x.dtype)
                dhidden = dhidden.to(x.dtype)
            ddown += tl.dot(tl.trans(dhidden), x, input_precision=PRECISION)
            dmixed += tl.dot(tl.trans(dout), hidden, input_precision=PRECISION)
        tile = (cols[:, None] < dim) & (ranks[None, :] < rank)
        tl.store(dmixed_up_ptr + (batch * dim + cols[:, None]) * rank + ranks[None, :], dmixed * scale, mask=tile)
        tl.store(dmixed_bias_ptr + batch * dim + cols, dbias * scale, mask=cols < dim)
    tl.store(ddown_weight_ptr + ranks[:, None] * dim + cols[None, :], ddown.to(ddown_weight_ptr.dtype.element_ty),
             mask=(ranks[:, None] < rank) & (cols[None, :] < dim))


def _tiles(x: torch.Tensor, rank: int) -> dict:
    """The rank padded to a tensor-core tile; D chunks of 64 columns on 4 warps, or 32 on 8 warps
    when the rank tile is wide (>= 32 fp16 or 16 fp32 elements) - no spills on sm_80 / sm_90."""
    block_r = max(16, triton.next_power_of_2(rank))
    wide = block_r * x.element_size() >= 64
    return {"BLOCK_R": block_r, "BLOCK_D": 32 if wide else 64, "num_warps": 8 if wide else 4}


ROWS_PER_BLOCK = 16  # with 2 programs per SM, an H100 holds 264 x 16 x D x 2 bytes (35 MB at D = 4096) in L2


def launch_config(x: torch.Tensor, rank: int, experts: int, interpret: bool | None = None) -> dict:
    """Launch options of the row kernels."""
    return {"BLOCK_L": ROWS_PER_BLOCK, "BLOCK_E": max(2, triton.next_power_of_2(experts)), **_tiles(x, rank),
            **dot_options(x, interpret)}


def forward_stages(x: torch.Tensor) -> int:
    """Pipeline stages of the forward, whose loop steps wait on their loads: Triton's default three
    spill a few bytes on sm_90; four (three steps' loads in flight) do not in 16-bit, two in fp32."""
    return 4 if x.element_size() == 2 else 2


def columns_config(x: torch.Tensor, rank: int, interpret: bool | None = None) -> dict:
    """The column kernel keeps three accumulators: wide rank tiles get 16 rows a step on 4 warps, and
    fp32 16 columns (no spills on sm_80 / sm_90)."""
    tiles = _tiles(x, rank)
    if tiles["num_warps"] == 8:
        tiles.update(BLOCK_L=16, BLOCK_D=32 if x.element_size() == 2 else 16, num_warps=4)
    else:
        tiles.update(BLOCK_L=32)
    return {**tiles, **dot_options(x, interpret)}


PROGRAMS_PER_SM = 2


def resident_programs(device: torch.device) -> int:
    """Programs of the persistent forward: PROGRAMS_PER_SM per SM on a GPU; 3 under the
    interpreter, so tests exercise programs that walk several row blocks."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def routed_adapter_forward(x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight,
                           up_bias, temperature: float, scale: float, dropout_p: float, seed: int) -> torch.Tensor:
    batch, length, dim = x.shape
    experts, rank = up_weight.shape[0], down_weight.shape[0]
    out = new_output(x.shape, storage_dtype(x.dtype), x.device)
    cfg = launch_config(x, rank, experts)
    blocks = batch * triton.cdiv(length, cfg["BLOCK_L"])
    routed_adapter_fwd_kernel[(min(blocks, resident_programs(x.device)),)](
        x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight, up_bias, out,
        batch, length, dim, rank, experts, temperature, scale, **dropout_args(dropout_p, seed),
        DROPOUT=dropout_p > 0, num_stages=forward_stages(x), **cfg,
    )
    return out.to(x.dtype)


def routed_adapter_backward_rows(dout, x, weights, down_weight, down_bias, up_weight, up_bias, scale: float,
                                 dropout_p: float, seed: int):
    """(dx, ddown_weight, ddown_bias, dmixed_up (B, D, R) fp32, dmixed_bias (B, D) fp32) for routing
    weights `weights` (B, E) fp32; the caller turns the last two into expert and router gradients."""
    batch, length, dim = x.shape
    experts, rank = up_weight.shape[0], down_weight.shape[0]
    hidden = new_output((batch, length, rank), torch.float32, x.device)
    dhidden = new_output((batch, length, rank), torch.float32, x.device)
    dx = new_output(x.shape, storage_dtype(x.dtype), x.device)
    cfg = launch_config(x, rank, experts)
    routed_adapter_bwd_rows_kernel[(triton.cdiv(length, cfg["BLOCK_L"]), batch)](
        x, dout, weights, down_weight, down_bias, up_weight, up_bias, hidden, dhidden, dx,
        length, dim, rank, experts, scale, **dropout_args(dropout_p, seed), DROPOUT=dropout_p > 0, **cfg,
    )
    ddown_weight = new_output(down_weight.shape, storage_dtype(down_weight.dtype), x.device)
    dmixed_up = new_output((batch, dim, rank), torch.float32, x.device)
    dmixed_bias = new_output((batch, dim), torch.float32, x.device)
    ccfg = columns_config(x, rank)
    routed_adapter_bwd_columns_kernel[(triton.cdiv(dim, ccfg["BLOCK_D"]),)](
        x, dout, hidden, dhidden, ddown_weight, dmixed_up, dmixed_bias, batch, length, dim, rank, scale, **ccfg,
    )
    ddown_bias = dhidden.sum((0, 1)).to(down_bias.dtype)
    return dx.to(x.dtype), ddown_weight.to(down_weight.dtype), ddown_bias, dmixed_up, dmixed_bias


def report_specs() -> list[KernelSpec]:
    """LLaMA-7B's adapter (D = 4096, R = 8, E = 2) in fp16, bf16, fp32, and the largest rank (64)."""
    specs = []
    for rank, dtype in ((8, torch.float16), (8, torch.bfloat16), (8, torch.float32), (64, torch.bfloat16)):
        x = torch.empty(1, 512, 4096, dtype=dtype, device="meta")
        t = pointer_type(dtype)
        label = f"D=4096 R={rank} E=2 {str(dtype).removeprefix('torch.')}"
        cfg = launch_config(x, rank, 2, interpret=False)
        warps = cfg.pop("num_warps")
        ccfg = columns_config(x, rank, interpret=False)
        cwarps = ccfg.pop("num_warps")
        dropout = {"keep_scale": "fp32", "seed": "i32", "threshold": "i32"}
        sizes = {"length": "i32", "dim": "i32", "rank": "i32", "experts": "i32"}
        values = {"length": 512, "dim": 4096, "rank": rank, "experts": 2}
        params = {"down_weight_ptr": t, "down_bias_ptr": t, "up_weight_ptr": t, "up_bias_ptr": t}
        specs += [
            KernelSpec(routed_adapter_fwd_kernel, {
                "x_ptr": t, "router_input_ptr": t, "router_weight_ptr": t, "router_bias_ptr": t, **params,
                "out_ptr": t, "batches": "i32", **sizes, "temperature": "fp32", "scale": "fp32", **dropout},
                {"DROPOUT": True, **cfg}, warps, label, forward_stages(x), values),
            KernelSpec(routed_adapter_bwd_rows_kernel, {
                "x_ptr": t, "dout_ptr": t, "weights_ptr": "*fp32", **params, "hidden_ptr": "*fp32",
                "dhidden_ptr": "*fp32", "dx_ptr": t, **sizes, "scale": "fp32", **dropout},
                {"DROPOUT": True, **cfg}, warps, label, sizes=values),
            KernelSpec(routed_adapter_bwd_columns_kernel, {
                "x_ptr": t, "dout_ptr": t, "hidden_ptr": "*fp32", "dhidden_ptr": "*fp32", "ddown_weight_ptr": t,
                "dmixed_up_ptr": "*fp32", "dmixed_bias_ptr": "*fp32", "batches": "i32", "length": "i32",
                "dim": "i32", "rank": "i32", "scale": "fp32"}, ccfg, cwarps, label, sizes=values),
        ]
    return specs

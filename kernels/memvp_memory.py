"""MemVP's FFN memory on GPUs: out = scale * dropout(silu(x K^T)) V, K = z + key_pos, V = z + value_pos.

With M (hundreds of memory rows) far below D, each of the op's matrix products is a thin,
memory-bound GEMM, which cuBLAS runs with 256-wide tiles that read each operand through L2 fewer
times than any Triton tile that fits in registers. (Two earlier versions fused the products in
Triton, forming K and V tile by tile: they re-read z and the position rows per tile, and projected
1.3x slower than plain PyTorch over forward + backward at LLaMA-7B's shape.) So the products are
cuBLAS's (`torch.bmm`, accumulating in fp32), and Triton fuses the passes between them that the
unfused op runs separately:
- `memvp_keys_values_kernel`: K and V from one read of z (two additions in plain PyTorch);
- `memvp_activation_kernel`: forward, from the fp32 pre-activation x K^T (written by cuBLAS in fp32
  and kept for the backward), act = dropout(silu(pre)); backward, from pre and dL/dhidden = dout V^T,
  the dropped activation and the pre-activation gradient (scale included) in one pass. The scale of
  act V and of dV = act^T dout rides on cuBLAS's alpha (plain PyTorch scales the (B, L, D) output);
- `memvp_memory_gradient_kernel`: dz = dK + dV, dkey_pos = sum_b dK, dvalue_pos = sum_b dV in one
  pass (three in plain PyTorch).
K and V are formed again in the backward rather than kept (2 B M D elements of memory; the unfused
op keeps them).

The (B, L, M) activation and its gradient are in the input dtype for bf16 and fp32, in fp32 for
fp16 (pre and dL/dhidden are fp32 always): there they can pass 65504 where the fp32 reference and
the op's results do not (x K^T of 2e5 with small V). Before a product with an fp16 operand such an
intermediate is multiplied by a power of 2 that brings it below 2^15 (`_fit_fp16`; 1 for ordinary
values, so they round to fp16 as in the unfused op) and the fp32 result by its inverse. fp32
products are plain fp32 GEMMs (tf32 where PyTorch allows it).

Dropout is counter-based (`kernels/utils.py: dropout_factor`, hashing an element's row-major index in
(B, L, M)), so the mask is regenerated from the seed in backward and equal on all backends. Offsets
are 64-bit: B x M x D and B x L x M can pass 2^31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from vlfast.kernels.utils import (
    KernelSpec,
    drop_and_save,
    dropout_args,
    dropout_factor,
    new_output,
    pointer_type,
    storage_dtype,
)


@triton.jit
def memvp_keys_values_kernel(z_ptr, key_pos_ptr, value_pos_ptr, keys_ptr, values_ptr, batches, size,
                             BLOCK: tl.constexpr):
    """K = z + key_pos and V = z + value_pos on BLOCK of the (M x D) = size elements of every sample:
    z read once, each position row once (held across the samples). Added in fp32 and rounded once,
    as a GPU adds two 16-bit tensors."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < size
    key_pos = tl.load(key_pos_ptr + offsets, mask=inside).to(tl.float32)
    value_pos = tl.load(value_pos_ptr + offsets, mask=inside).to(tl.float32)
    # Pointers advanced by one sample per step: batch * size can pass 2^31 in 32-bit arithmetic.
    z_ptr, keys_ptr, values_ptr = z_ptr + offsets, keys_ptr + offsets, values_ptr + offsets
    for _ in range(batches):
        z = tl.load(z_ptr, mask=inside).to(tl.float32)
        tl.store(keys_ptr, (z + key_pos).to(keys_ptr.dtype.element_ty), mask=inside)
        tl.store(values_ptr, (z + value_pos).to(values_ptr.dtype.element_ty), mask=inside)
        z_ptr, keys_ptr, values_ptr = z_ptr + size, keys_ptr + size, values_ptr + size


@triton.jit
def memvp_activation_kernel(pre_ptr, dhidden_ptr, act_ptr, dpre_ptr, size, scale, keep_scale, seed, threshold,
                            BACKWARD: tl.constexpr, DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK of the (B, L, M) = size elements. Forward: act = dropout(silu(pre)). Backward (dhidden =
    dout V^T): act as in the forward and dpre = dropout(scale dhidden) silu'(pre)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < size
    pre = tl.load(pre_ptr + offsets, mask=inside, other=0.0)
    sig = tl.sigmoid(pre)
    hidden = pre * sig
    if BACKWARD:
        dhidden = tl.load(dhidden_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        dpre = dhidden * scale * sig * (1.0 + pre * (1.0 - sig))  # silu'(a) = s (1 + a (1 - s))
        drop_and_save(hidden, dpre, act_ptr, dpre_ptr, offsets, inside, seed, threshold, keep_scale, DROPOUT)
    else:
        if DROPOUT:
            hidden = hidden * dropout_factor(seed, offsets, threshold, keep_scale)
        tl.store(act_ptr + offsets, hidden.to(act_ptr.dtype.element_ty), mask=inside)


@triton.jit
def memvp_memory_gradient_kernel(dkeys_ptr, dvalues_ptr, dz_ptr, dkey_pos_ptr, dvalue_pos_ptr, batches, size,
                                 BLOCK: tl.constexpr):
    """BLOCK of the (M x D) = size elements of every sample: dz = dK + dV (rounded once), and
    dkey_pos, dvalue_pos: dK and dV summed over the samples in fp32, deterministically."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < size
    dkey_pos = tl.zeros((BLOCK,), tl.float32)
    dvalue_pos = tl.zeros((BLOCK,), tl.float32)
    dkeys_ptr, dvalues_ptr, dz_ptr = dkeys_ptr + offsets, dvalues_ptr + offsets, dz_ptr + offsets
    for _ in range(batches):  # pointers advanced per sample, as in memvp_keys_values_kernel
        dkeys = tl.load(dkeys_ptr, mask=inside, other=0.0).to(tl.float32)
        dvalues = tl.load(dvalues_ptr, mask=inside, other=0.0).to(tl.float32)
        tl.store(dz_ptr, (dkeys + dvalues).to(dz_ptr.dtype.element_ty), mask=inside)
        dkey_pos += dkeys
        dvalue_pos += dvalues
        dkeys_ptr, dvalues_ptr, dz_ptr = dkeys_ptr + size, dvalues_ptr + size, dz_ptr + size
    tl.store(dkey_pos_ptr + offsets, dkey_pos.to(dkey_pos_ptr.dtype.element_ty), mask=inside)
    tl.store(dvalue_pos_ptr + offsets, dvalue_pos.to(dvalue_pos_ptr.dtype.element_ty), mask=inside)


def launch_config() -> dict:
    """Elements per program and warps of each kernel (the cost model reads them): 8 elements per
    thread, so 16-bit data moves in 16-byte loads; the (M x D) kernels' 1024-wide blocks give
    LLaMA-7B's M = 320, D = 4096 1,280 programs (about 10 per SM), each walking the samples."""
    return {kernel: {"BLOCK": 1024, "num_warps": 4} for kernel in ("keys_values", "activation", "memory_gradient")}


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the (B, L, M) activation and pre-activation gradient: the input's for bf16 and fp32
    (as the unfused op holds them), fp32 for fp16 (which they can pass 65504 in)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _bmm(a: Tensor, b: Tensor, dtype: torch.dtype, alpha: float = 1.0) -> Tensor:
    """alpha * a @ b per sample, accumulated and scaled in fp32 (cuBLAS's alpha), written in `dtype`:
    a's, or fp32 from 16-bit operands (then alpha = 1). On CPU tensors (the interpreter's tests) the
    same in fp32 with torch."""
    if a.device.type == "cpu":
        return (torch.bmm(a.float(), b.float()) * alpha).to(dtype)
    if dtype != a.dtype:
        assert alpha == 1.0, "fp32 products of 16-bit operands take no alpha"
        return torch.bmm(a, b, out_dtype=dtype)
    if alpha == 1.0:
        return torch.bmm(a, b)
    # beta = 0: the uninitialised input is ignored (NaN in it included).
    return torch.baddbmm(a.new_empty((a.shape[0], a.shape[1], b.shape[2])), a, b, beta=0.0, alpha=alpha)


def _fit_fp16(t: Tensor) -> tuple[Tensor, Tensor]:
    """(t / unscale in fp16, unscale): unscale, a power of 2 >= 1, brings t's largest finite magnitude
    below 2^15 (fp16's max is 65504); 1 for ordinary values. A 0-d tensor: the host never waits."""
    top = t.abs().nan_to_num(0.0, posinf=0.0).amax().clamp(min=1.0)
    unscale = torch.exp2((torch.floor(torch.log2(top)) - 14.0).clamp(min=0.0))
    return (t / unscale).half(), unscale


def _product(a: Tensor, b: Tensor, dtype: torch.dtype, alpha: float = 1.0) -> Tensor:
    """alpha * a @ b in `dtype`; an fp32 intermediate against an fp16 operand is fitted to fp16 first
    and the fp32 result scaled back (exact: powers of 2)."""
    if a.dtype == torch.float32 and b.dtype == torch.float16:
        fitted, unscale = _fit_fp16(a)
        return (_bmm(fitted, b, torch.float32) * (unscale * alpha)).to(dtype)
    return _bmm(a, b, dtype, alpha)


def _launch(kernel, cfg: dict, size: int, *args, **constexprs) -> None:
    kernel[(triton.cdiv(size, cfg["BLOCK"]),)](*args, **constexprs, **cfg)


def _keys_values(z: Tensor, key_pos: Tensor, value_pos: Tensor, cfg: dict) -> tuple[Tensor, Tensor]:
    stored = storage_dtype(z.dtype)
    keys, values = new_output(z.shape, stored, z.device), new_output(z.shape, stored, z.device)
    size = key_pos.numel()
    _launch(memvp_keys_values_kernel, cfg["keys_values"], size, z, key_pos, value_pos, keys, values, z.shape[0], size)
    return keys.to(z.dtype), values.to(z.dtype)


def memvp_memory_forward(x: Tensor, z: Tensor, key_pos: Tensor, value_pos: Tensor, scale: float, dropout_p: float,
                         seed: int) -> tuple[Tensor, Tensor]:
    """(out, pre): pre = x (z + key_pos)^T in fp32, kept for the backward."""
    cfg = launch_config()
    keys, values = _keys_values(z, key_pos, value_pos, cfg)
    pre = _bmm(x, keys.transpose(1, 2), torch.float32)
    kept = intermediate_dtype(x.dtype)
    act = new_output(pre.shape, storage_dtype(kept), x.device)
    _launch(memvp_activation_kernel, cfg["activation"], pre.numel(), pre, pre, act, act, pre.numel(), scale,
            **dropout_args(dropout_p, seed), BACKWARD=False, DROPOUT=dropout_p > 0)
    return _product(act.to(kept), values, x.dtype, scale), pre


def memvp_memory_backward(dout: Tensor, x: Tensor, z: Tensor, key_pos: Tensor, value_pos: Tensor, pre: Tensor,
                          scale: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cfg = launch_config()
    keys, values = _keys_values(z, key_pos, value_pos, cfg)
    dhidden = _bmm(dout, values.transpose(1, 2), torch.float32)
    kept = intermediate_dtype(x.dtype)
    hidden = new_output(pre.shape, storage_dtype(kept), x.device)  # dropout(silu(pre))
    dpre = new_output(pre.shape, storage_dtype(kept), x.device)
    _launch(memvp_activation_kernel, cfg["activation"], pre.numel(), pre, dhidden, hidden, dpre, pre.numel(), scale,
            **dropout_args(dropout_p, seed), BACKWARD=True, DROPOUT=dropout_p > 0)
    hidden, dpre = hidden.to(kept), dpre.to(kept)
    dx = _product(dpre, keys, x.dtype)
    # dK and dV in fp32 for fp16 inputs (from fitted products), else in the input dtype, as the unfused op.
    dkeys = _product(dpre.transpose(1, 2), x, kept)
    dvalues = _product(hidden.transpose(1, 2), dout, kept, scale)
    stored = storage_dtype(z.dtype)
    dz = new_output(z.shape, stored, z.device)
    dkey_pos, dvalue_pos = new_output(key_pos.shape, stored, z.device), new_output(key_pos.shape, stored, z.device)
    size = key_pos.numel()
    _launch(memvp_memory_gradient_kernel, cfg["memory_gradient"], size, dkeys, dvalues, dz, dkey_pos, dvalue_pos,
            z.shape[0], size)
    return dx, dz.to(z.dtype), dkey_pos.to(z.dtype), dvalue_pos.to(z.dtype)


def report_specs() -> list[KernelSpec]:
    """LLaMA-7B's MemVP shape (B = 8, L = 512, M = 320, D = 4096) in fp16, bf16 and fp32."""
    specs = []
    cfg = launch_config()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t, kept = pointer_type(dtype), pointer_type(intermediate_dtype(dtype))
        label = f"B=8 L=512 M=320 D=4096 {str(dtype).removeprefix('torch.')}"
        rows, batch = {"size": 320 * 4096}, {"batches": 8}
        dropout = {"scale": "fp32", "keep_scale": "fp32", "seed": "i32", "threshold": "i32"}
        specs += [
            KernelSpec(memvp_keys_values_kernel, {**{f"{n}_ptr": t for n in ("z", "key_pos", "value_pos", "keys",
                                                                            "values")}, "batches": "i32",
                                                   "size": "i32"},
                       {"BLOCK": cfg["keys_values"]["BLOCK"]}, cfg["keys_values"]["num_warps"], label,
                       sizes={**batch, **rows}, matrix=False),
            *[KernelSpec(memvp_activation_kernel, {"pre_ptr": "*fp32", "dhidden_ptr": "*fp32", "act_ptr": kept,
                                                   "dpre_ptr": kept, "size": "i32", **dropout},
                         {"BACKWARD": backward, "DROPOUT": True, "BLOCK": cfg["activation"]["BLOCK"]},
                         cfg["activation"]["num_warps"], label + (" backward" if backward else " forward"),
                         sizes={"size": 8 * 512 * 320}, matrix=False)
              for backward in (False, True)],
            KernelSpec(memvp_memory_gradient_kernel, {"dkeys_ptr": kept, "dvalues_ptr": kept, "dz_ptr": t,
                                                      "dkey_pos_ptr": t, "dvalue_pos_ptr": t, "batches": "i32",
                                                      "size": "i32"},
                       {"BLOCK": cfg["memory_gradient"]["BLOCK"]}, cfg["memory_gradient"]["num_warps"], label,
                       sizes={**batch, **rows}, matrix=False),
        ]
    return specs

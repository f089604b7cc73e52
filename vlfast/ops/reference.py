"""Plain PyTorch versions of every op: the `torch` backend and the tests' oracles (`*_autograd`).

routed_adapter's forward and backward are written from the same formulas the kernels use, so its
`torch` backend sits behind the same custom op as the others. cross_attention's is PyTorch's own
fused attention (SDPA) and memvp_memory's the plain formula, both differentiated by autograd: on CPU
faster than a custom op around a hand-written backward (benchmarks/test_cross_attention.py,
benchmarks/test_memvp_memory.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlfast.kernels.utils import dropout_threshold


def cross_attention_torch(q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, scale: float) -> Tensor:
    """The `torch` backend: PyTorch's scaled_dot_product_attention, differentiated by autograd. On CPU,
    16-bit inputs that need gradients take the textbook chain instead: SDPA's CPU backward is 1.5x
    (bf16) to 2.6x (fp16) slower than autograd through the chain's 16-bit matmuls at the Q-Former's
    shape (its forward is faster: kept without gradients; benchmarks/test_cross_attention.py)."""
    if (q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return cross_attention_autograd(q, k, v, kv_mask, scale)
    if kv_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if q.device.type == "cpu":  # torch >= 2.5 gives a query with no visible key zeros and zero gradients here
        return F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :], scale=scale)
    # CUDA's memory-efficient kernel gives such rows NaN: their sample attends to every key, then is zeroed
    # (masked_fill zeroes its gradients too).
    empty = ~kv_mask.any(dim=-1)[:, None]  # (B, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(kv_mask | empty)[:, None, None, :], scale=scale)
    return out.masked_fill(empty[:, :, None, None], 0.0)


def cross_attention_autograd(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """The textbook formula in the inputs' dtype, differentiated by autograd: the tests' oracle (in
    float64), and the torch backend for 16-bit training on CPU. Rows with no visible key get zeros
    and zero gradients."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if kv_mask is None:
        return torch.matmul(torch.softmax(logits, dim=-1), v)
    logits = logits.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    has_keys = kv_mask.any(dim=-1)[:, None, None, None]
    # Finite logits on empty rows keep softmax and its gradient free of NaN; the product zeroes them.
    probs = torch.softmax(torch.where(has_keys, logits, 0.0), dim=-1) * has_keys
    return torch.matmul(probs, v)


# --- dropout shared by the ops ----------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def dropout_keep_mask(seed: int, shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> Tensor:
    """The dropout mask every backend draws: element i (row-major in `shape`) is kept unless the
    top 24 bits of murmur3's finaliser applied to (i * 0x9E3779B1 + seed) mod 2^32 fall below
    p * 2^24. Counter-based, so backward regenerates it from the seed and all backends agree."""
    x = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64, device=device) & _MASK32
    x = (x * 0x9E3779B1 + seed) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    x = x ^ (x >> 16)
    return ((x >> 8) >= dropout_threshold(p)).view(shape)


# --- memvp_memory ------------------------------------------------------------------------------


def memvp_memory_autograd(
    x: Tensor, z: Tensor, key_pos: Tensor, value_pos: Tensor, scale: float = 1.0,
    keep_mask: Tensor | None = None, dropout_p: float = 0.0,
) -> Tensor:
    """The oracle: the textbook formula in the inputs' dtype, differentiated by autograd, with an
    explicit dropout keep mask (B, L, M)."""
    hidden = torch.nn.functional.silu(torch.matmul(x, (z + key_pos).transpose(-1, -2)))
    if keep_mask is not None:
        hidden = hidden * keep_mask / (1.0 - dropout_p)
    return scale * torch.matmul(hidden, z + value_pos)


def memvp_memory_torch(
    x: Tensor, z: Tensor, key_pos: Tensor, value_pos: Tensor, scale: float, dropout_p: float, seed: int
) -> Tensor:
    """The `torch` backend: the unfused formula with the dropout mask every backend draws,
    differentiated by autograd, which keeps several (B, L, M) activations where the kernels keep
    only the pre-activation. In the input dtype (on GPUs, tensor cores), except fp16, computed in
    fp32 so that x K^T and its gradient may pass 65504 where the result does not (on GPUs its
    products then run on CUDA cores: slower). (bf16 in fp32 was 1.3-2.9x slower than the plain op
    on CPU.) The scale (and dropout's 1 / (1 - p)) multiplies the (B, L, M) activation rather than
    the (B, L, D) output: fewer elements whenever M < D."""
    dtype = x.dtype
    if dtype == torch.float16:
        x, z, key_pos, value_pos = (t.float() for t in (x, z, key_pos, value_pos))
    hidden = F.silu(torch.matmul(x, (z + key_pos).transpose(-1, -2)))
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, (x.shape[0], x.shape[1], z.shape[1]), dropout_p, x.device)
        hidden = hidden * keep * (scale / (1.0 - dropout_p))  # bool and Python scalar keep hidden's dtype
    else:
        hidden = hidden * scale
    out = torch.matmul(hidden, z + value_pos)
    return out if out.dtype == dtype else out.to(dtype)


# --- routed_adapter ----------------------------------------------------------------------------


def _routing(router_input, router_weight, router_bias, temperature, compute):
    logits = router_input.to(compute) @ router_weight.to(compute).T + router_bias.to(compute)
    return torch.softmax(logits / temperature, dim=-1)  # (B, E)


def _adapter_parts(x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight, up_bias,
                   temperature, dropout_p, seed):
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weights = _routing(router_input, router_weight, router_bias, temperature, compute)
    mixed_up = torch.einsum("be,edr->bdr", weights, up_weight.to(compute))  # (B, D, R)
    mixed_bias = weights @ up_bias.to(compute)  # (B, D)
    hidden = x.to(compute) @ down_weight.to(compute).T + down_bias.to(compute)  # (B, L, R)
    keep = None
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, tuple(hidden.shape), dropout_p, x.device).to(compute) / (1.0 - dropout_p)
        hidden = hidden * keep
    return compute, weights, mixed_up, mixed_bias, hidden, keep


def routed_adapter_forward(
    x: Tensor, router_input: Tensor, router_weight: Tensor, router_bias: Tensor, down_weight: Tensor,
    down_bias: Tensor, up_weight: Tensor, up_bias: Tensor, temperature: float, scale: float, dropout_p: float,
    seed: int,
) -> Tensor:
    """x + scale * sum_e w_e (h W_u[e]^T + b_u[e]) = x + scale * (h W_mix^T + b_mix), with the
    experts' up-projections mixed per sample by the routing weights."""
    compute, _, mixed_up, mixed_bias, hidden, _ = _adapter_parts(
        x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight, up_bias, temperature,
        dropout_p, seed)
    up = torch.matmul(hidden, mixed_up.transpose(1, 2)) + mixed_bias[:, None, :]
    return (x.to(compute) + scale * up).to(x.dtype)


def routed_adapter_backward(
    dout: Tensor, x: Tensor, router_input: Tensor, router_weight: Tensor, router_bias: Tensor,
    down_weight: Tensor, down_bias: Tensor, up_weight: Tensor, up_bias: Tensor, temperature: float, scale: float,
    dropout_p: float, seed: int,
) -> tuple[Tensor, ...]:
    compute, weights, mixed_up, mixed_bias, hidden, keep = _adapter_parts(
        x, router_input, router_weight, router_bias, down_weight, down_bias, up_weight, up_bias, temperature,
        dropout_p, seed)
    grad_up = scale * dout.to(compute)  # (B, L, D)
    dhidden = torch.matmul(grad_up, mixed_up)  # (B, L, R), through the dropped hidden
    dmixed_up = torch.matmul(grad_up.transpose(1, 2), hidden)  # (B, D, R)
    dmixed_bias = grad_up.sum(1)  # (B, D)
    if keep is not None:
        dhidden = dhidden * keep
    dx = dout.to(compute) + torch.matmul(dhidden, down_weight.to(compute))
    ddown_weight = torch.einsum("blr,bld->rd", dhidden, x.to(compute))
    router_grads = routing_and_expert_grads(weights, dmixed_up, dmixed_bias, router_input, router_weight,
                                            up_weight, up_bias, temperature)
    return (dx.to(x.dtype), *router_grads[:3], ddown_weight.to(down_weight.dtype),
            dhidden.sum((0, 1)).to(down_bias.dtype), *router_grads[3:])


def routing_weights(router_input: Tensor, router_weight: Tensor, router_bias: Tensor, temperature: float) -> Tensor:
    """softmax((router_input W_r^T + b_r) / temperature), (B, E) in fp32 (fp64 for fp64 inputs)."""
    compute = torch.float64 if router_input.dtype == torch.float64 else torch.float32
    return _routing(router_input, router_weight, router_bias, temperature, compute)


def routing_and_expert_grads(
    weights: Tensor, dmixed_up: Tensor, dmixed_bias: Tensor, router_input: Tensor, router_weight: Tensor,
    up_weight: Tensor, up_bias: Tensor, temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """From the gradients of the per-sample mixed up projection, W_mix = sum_e w_e W_u[e] (B, D, R)
    and b_mix (B, D): the gradients of router_input, router_weight, router_bias, up_weight and
    up_bias. (B, E, D, R)-sized work, shared by every backend."""
    compute = weights.dtype
    dup_weight = torch.einsum("be,bdr->edr", weights, dmixed_up)
    dup_bias = weights.T @ dmixed_bias
    dweights = torch.einsum("bdr,edr->be", dmixed_up, up_weight.to(compute)) + dmixed_bias @ up_bias.to(compute).T
    dlogits = weights * (dweights - (weights * dweights).sum(-1, keepdim=True)) / temperature
    router_bias_dtype = router_weight.dtype
    return (
        (dlogits @ router_weight.to(compute)).to(router_input.dtype),
        (dlogits.T @ router_input.to(compute)).to(router_weight.dtype),
        dlogits.sum(0).to(router_bias_dtype),
        dup_weight.to(up_weight.dtype),
        dup_bias.to(up_bias.dtype),
    )


def routed_adapter_autograd(
    x: Tensor, router_input: Tensor, router_weight: Tensor, router_bias: Tensor, down_weight: Tensor,
    down_bias: Tensor, up_weight: Tensor, up_bias: Tensor, temperature: float = 10.0, scale: float = 1.0,
    keep_mask: Tensor | None = None, dropout_p: float = 0.0,
) -> Tensor:
    """The oracle: the contract's formula expert by expert in the inputs' dtype, autograd for the
    gradients, an explicit dropout keep mask (B, L, R)."""
    weights = torch.softmax((router_input @ router_weight.T + router_bias) / temperature, dim=-1)
    hidden = x @ down_weight.T + down_bias
    if keep_mask is not None:
        hidden = hidden * keep_mask / (1.0 - dropout_p)
    experts = torch.stack([hidden @ up_weight[e].T + up_bias[e] for e in range(up_weight.shape[0])], dim=1)
    return x + scale * (weights[:, :, None, None] * experts).sum(1)

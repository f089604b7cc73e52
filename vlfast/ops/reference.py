"""Plain PyTorch versions of every op: the `torch` backend and the tests' oracle.

Each forward returns what the fused kernels save for their backward (here: the row log-sum-exp), and
each backward is written from the same formulas the kernels use, so the `torch` backend can sit
behind the same custom op as the others.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _masked_logits(q: Tensor, k: Tensor, kv_mask: Tensor | None, scale: float) -> Tensor:
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if kv_mask is not None:
        logits = logits.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    return logits


def cross_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """softmax(scale q k^T, masked) v in fp32 (fp64 for fp64 inputs); also returns the row
    log-sum-exp, +inf for rows whose keys are all masked (their output is 0)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = _masked_logits(q.to(compute), k.to(compute), kv_mask, scale)
    lse = torch.logsumexp(logits, dim=-1)
    empty = torch.isneginf(lse)
    lse = lse.masked_fill(empty, float("inf"))
    probs = torch.exp(logits - lse[..., None])
    out = torch.matmul(probs, v.to(compute))
    return out.to(q.dtype), lse.float()


def cross_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None,
    out: Tensor, lse: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_, k_, v_, do_ = (t.to(compute) for t in (q, k, v, dout))
    probs = torch.exp(_masked_logits(q_, k_, kv_mask, scale) - lse.to(compute)[..., None])
    delta = (do_ * out.to(compute)).sum(-1, keepdim=True)
    dv = torch.matmul(probs.transpose(-1, -2), do_)
    dscores = probs * (torch.matmul(do_, v_.transpose(-1, -2)) - delta) * scale
    dq = torch.matmul(dscores, k_)
    dk = torch.matmul(dscores.transpose(-1, -2), q_)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def cross_attention_autograd(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """The oracle for tests: the textbook formula in the inputs' dtype, differentiated by autograd.
    Rows with no visible key get zeros and zero gradients."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    if kv_mask is None:
        return torch.matmul(torch.softmax(logits, dim=-1), v)
    logits = logits.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
    has_keys = kv_mask.any(dim=-1)[:, None, None, None]
    # Finite logits on empty rows keep softmax and its gradient free of NaN; the product zeroes them.
    probs = torch.softmax(torch.where(has_keys, logits, 0.0), dim=-1) * has_keys
    return torch.matmul(probs, v)

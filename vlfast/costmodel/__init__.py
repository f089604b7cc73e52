"""Projections of GPU cost from counted bytes and FLOPs (no GPU is measured here):
`kernels` for one op's fused kernel against its floor and the eager chain, `training` for the
GPU-hours of whole VPG training runs (`python -m vlfast.costmodel`)."""
from vlfast.costmodel.kernels import (
    A100,
    H100,
    H200,
    AdapterShape,
    AttentionShape,
    Cost,
    Hardware,
    Launch,
    MemVPShape,
    adapter_config,
    attention_config,
    chain_seconds,
    cross_attention_eager,
    cross_attention_floor,
    cross_attention_triton,
    flash_attention_forward,
    matmul,
    memvp_config,
    memvp_eager,
    memvp_floor,
    memvp_triton,
    routed_adapter_eager,
    routed_adapter_floor,
    routed_adapter_triton,
)
from vlfast.costmodel.training import LLMS, PAPER, UTILISATION, Setup, Stack, transfer_lines

__all__ = [
    "A100", "H100", "H200", "LLMS", "PAPER", "UTILISATION", "AdapterShape", "AttentionShape", "Cost", "Hardware",
    "Launch", "MemVPShape", "Setup", "Stack", "adapter_config", "attention_config", "chain_seconds",
    "cross_attention_eager", "cross_attention_floor", "cross_attention_triton", "flash_attention_forward",
    "matmul", "memvp_config", "memvp_eager", "memvp_floor", "memvp_triton", "routed_adapter_eager",
    "routed_adapter_floor", "routed_adapter_triton", "transfer_lines",
]

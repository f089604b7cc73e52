"""MemVP for Hugging Face causal LMs: visual prompts as extra key/value rows of every FFN.

    apply_memvp(model, num_memory_tokens)      # adds the branch to every layer, freezes the LLM
    with visual_memory(model, prompts):        # prompts: (B, <= M, D), e.g. a projector's output
        loss = model(input_ids, labels=labels).loss
    revert_memvp(model)                        # the original model, exactly

Every layer gets `out = h + FFN(norm(h)) + scale * memvp_memory(norm(h), z, key_pos, value_pos)`,
with z the prompts zero-padded to M rows (all zeros when none are set) and key_pos ~ N(0, 0.02),
value_pos = 0 learned once per model and shared by all layers (SPEC.md section 4). The branch is
attached with forward hooks, so the LLM's modules and weights are never replaced: a pre-hook on each
layer's FFN-input module reads the FFN input and a hook adds the branch to the FFN-output module's
output (the sites per family are in vlfast.patch.families).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast.ops import memvp_memory
from vlfast.patch.base import attach, detach, patch_module
from vlfast.patch.families import family


class VisualMemory(nn.Module):
    """The learned rows shared by all layers, and the visual prompts of the current batch."""

    def __init__(self, num_tokens: int, hidden_size: int, *, scale: float, dropout_p: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.key_pos = nn.Parameter(torch.randn(num_tokens, hidden_size, device=device) * 0.02)
        self.value_pos = nn.Parameter(torch.zeros(num_tokens, hidden_size, device=device))
        self.scale = scale
        self.dropout_p = dropout_p
        self.prompts: Tensor | None = None  # (B, <= M, D); None means z = 0

    @property
    def num_tokens(self) -> int:
        return self.key_pos.shape[0]

    def set_prompts(self, prompts: Tensor | None) -> None:
        if prompts is not None:
            if prompts.dim() != 3 or prompts.shape[2] != self.key_pos.shape[1]:
                raise ValueError(f"visual prompts must have shape (B, <= {self.num_tokens}, "
                                 f"{self.key_pos.shape[1]}), got {tuple(prompts.shape)}")
            if prompts.shape[1] > self.num_tokens:
                raise ValueError(f"visual prompts have {prompts.shape[1]} rows but the memory holds "
                                 f"num_memory_tokens={self.num_tokens}")
        self.prompts = prompts

    def forward(self, x: Tensor) -> Tensor:
        """The branch for FFN inputs x of shape (..., D); rows are grouped by sample in order."""
        dim, dtype = x.shape[-1], x.dtype
        if self.prompts is None:
            z = x.new_zeros(1, self.num_tokens, dim)
        else:
            z = F.pad(self.prompts.to(dtype), (0, 0, 0, self.num_tokens - self.prompts.shape[1]))
        # Generation may repeat each sample (beams): its rows stay contiguous, so grouping all rows
        # by prompt sample keeps each row with its own prompts.
        if x.numel() % (z.shape[0] * dim) != 0:
            raise ValueError(f"the batch of the visual prompts ({z.shape[0]}) does not divide the LLM's "
                             f"batch (FFN input of shape {tuple(x.shape)})")
        rows = x.reshape(z.shape[0], -1, dim)
        out = memvp_memory(rows, z, self.key_pos.to(dtype), self.value_pos.to(dtype), scale=self.scale,
                           dropout_p=self.dropout_p if self.training else 0.0)
        return out.reshape(x.shape)


def apply_memvp(model: nn.Module, num_memory_tokens: int, *, scale: float = 0.1,
                dropout_p: float = 0.1) -> VisualMemory:
    """Give every layer of `model` the MemVP branch; freezes the LLM's own parameters. Returns the
    new trainable module (also at `model.vlfast_memvp`)."""
    row = family(model)
    if num_memory_tokens < 1:
        raise ValueError(f"num_memory_tokens must be >= 1, got {num_memory_tokens}")
    memory, patch = attach(model, "memvp", lambda: VisualMemory(num_memory_tokens, model.config.hidden_size,
                                                                scale=scale, dropout_p=dropout_p))
    for reads, adds_to in zip(row.modules(model, row.ffn_input), row.modules(model, row.ffn_output), strict=True):
        captured: dict[str, Tensor] = {}

        def capture(module, args, captured=captured):
            captured["x"] = args[0]

        def add_branch(module, args, output, captured=captured):
            return output + memory(captured.pop("x"))

        patch.handles.append(reads.register_forward_pre_hook(capture))
        patch.handles.append(adds_to.register_forward_hook(add_branch))
    return memory


def revert_memvp(model: nn.Module) -> None:
    """Remove the branch and its parameters; restore the LLM's requires_grad flags."""
    detach(model, "memvp")


def set_visual_memory(model: nn.Module, prompts: Tensor | None) -> None:
    """Visual prompts (B, <= M, D) for the next forward passes; None clears them (z = 0)."""
    patch_module(model, "memvp").set_prompts(prompts)


@contextlib.contextmanager
def visual_memory(model: nn.Module, prompts: Tensor | None) -> Iterator[None]:
    memory = patch_module(model, "memvp")
    previous = memory.prompts
    memory.set_prompts(prompts)
    try:
        yield
    finally:
        memory.prompts = previous

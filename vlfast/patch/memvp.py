"""MemVP for Hugging Face causal LMs: visual prompts as extra key/value rows of every FFN.

    apply_memvp(model, num_memory_tokens)      # adds the branch to every layer, freezes the LLM
    with visual_memory(model, prompts):        # prompts: (B, <= M, D), e.g. a projector's output
        loss = model(input_ids, labels=labels).loss
    revert_memvp(model)                        # the original model, exactly

Every layer gets `out = h + FFN(norm(h)) + scale * memvp_memory(norm(h), z, key_pos, value_pos)`,
with z the prompts zero-padded to M rows (all zeros when none are set) and key_pos ~ N(0, 0.02),
value_pos = 0 learned once per model and shared by all layers (SPEC.md section 4). The branch is
attached with forward hooks, so the LLM's modules and weights are never replaced: on Llama the hook
sits on `mlp` (whose input is the FFN-normed hidden state), on OPT a pre-hook on `fc1` reads the
normed input and a hook on `fc2` adds the branch (inside OPT's residual dropout).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlfast.ops import memvp_memory

MEMORY_ATTRIBUTE = "vlfast_memvp"


@dataclass
class _Patch:
    handles: list[RemovableHandle] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)


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
        self.patch = _Patch()  # the hooks and flags revert_memvp undoes (not part of the state dict)

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


def _ffn_sites(model: nn.Module) -> tuple[list[tuple[nn.Module, nn.Module]], int]:
    """(module whose input is the FFN-normed state, module whose output the branch is added to)
    for every layer, and the hidden size."""
    from transformers import LlamaForCausalLM, OPTForCausalLM

    if isinstance(model, LlamaForCausalLM):
        return [(layer.mlp, layer.mlp) for layer in model.model.layers], model.config.hidden_size
    if isinstance(model, OPTForCausalLM):
        layers = model.model.decoder.layers
        return [(layer.fc1, layer.fc2) for layer in layers], model.config.hidden_size
    raise TypeError(f"apply_memvp supports LlamaForCausalLM and OPTForCausalLM, got {type(model).__name__}")


def apply_memvp(model: nn.Module, num_memory_tokens: int, *, scale: float = 0.1,
                dropout_p: float = 0.1) -> VisualMemory:
    """Give every layer of `model` the MemVP branch; freezes the LLM's own parameters. Returns the
    new trainable module (also at `model.vlfast_memvp`)."""
    if hasattr(model, MEMORY_ATTRIBUTE):
        raise ValueError("apply_memvp: this model already has MemVP; call revert_memvp first")
    if num_memory_tokens < 1:
        raise ValueError(f"num_memory_tokens must be >= 1, got {num_memory_tokens}")
    sites, hidden = _ffn_sites(model)
    patch = _Patch(requires_grad={name: p.requires_grad for name, p in model.named_parameters()})
    model.requires_grad_(False)
    device = next(model.parameters()).device
    memory = VisualMemory(num_memory_tokens, hidden, scale=scale, dropout_p=dropout_p, device=device)
    memory.train(model.training)
    memory.patch = patch
    model.add_module(MEMORY_ATTRIBUTE, memory)
    for reads, adds_to in sites:
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
    memory = getattr(model, MEMORY_ATTRIBUTE, None)
    if memory is None:
        raise ValueError("revert_memvp: this model has no MemVP patch")
    patch = memory.patch
    for handle in patch.handles:
        handle.remove()
    delattr(model, MEMORY_ATTRIBUTE)
    for name, param in model.named_parameters():
        param.requires_grad_(patch.requires_grad[name])


def _memory(model: nn.Module) -> VisualMemory:
    memory = getattr(model, MEMORY_ATTRIBUTE, None)
    if memory is None:
        raise ValueError("this model has no MemVP branch: call vlfast.patch.apply_memvp first")
    return memory


def set_visual_memory(model: nn.Module, prompts: Tensor | None) -> None:
    """Visual prompts (B, <= M, D) for the next forward passes; None clears them (z = 0)."""
    _memory(model).set_prompts(prompts)


@contextlib.contextmanager
def visual_memory(model: nn.Module, prompts: Tensor | None) -> Iterator[None]:
    memory = _memory(model)
    previous = memory.prompts
    memory.set_prompts(prompts)
    try:
        yield
    finally:
        memory.prompts = previous

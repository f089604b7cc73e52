"""Parts of the P-Former's text-only training loss (SPEC.md section 7): the masking of its two input
views, their contrastive loss, and the pull of its prompts toward word embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, rate: float, mask_id: int,
                generator: torch.Generator | None = None) -> Tensor:
    """input_ids with each real (unpadded) token replaced by mask_id with probability `rate`."""
    draw = torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < rate
    return torch.where(draw & attention_mask.bool(), torch.full_like(input_ids, mask_id), input_ids)


def contrastive_loss(a: Tensor, b: Tensor, temperature: float = 0.07) -> Tensor:
    """InfoNCE between two views' sentence embeddings (B, H): row i of `a` should pick row i of
    `b` among all rows, and the other way round; cosine similarities over `temperature`."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    targets = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def nearest_word_loss(prompts: Tensor, word_embeddings: Tensor) -> Tensor:
    """Mean squared distance (per element) of each prompt vector to its nearest word embedding:
    pulls the prompts toward the region of input space the LLM was trained on."""
    flat = prompts.reshape(-1, prompts.shape[-1])
    distances = torch.cdist(flat.float(), word_embeddings.float()).square()
    return distances.min(dim=1).values.mean() / prompts.shape[-1]

"""VPGTrans's word converter and projector merge (SPEC.md section 6).

The converter is one Linear(d_src, d_tgt) trained so that it maps the source LLM's input word
embeddings onto the target's (loss 1 - cos averaged over the tokens of caption text, SGD lr 5, a
few epochs of that text). The target VPG's projector
then starts as the converter applied after the source projector:
W_t = W_conv W_src, b_t = W_conv b_src + b_conv.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm


def token_pairs(source_tokenizer, target_tokenizer, captions: Iterable[str]) -> Tensor:
    """(P, 2) source and target token ids that stand for the same text, one row per occurrence in
    the captions (the converter's loss is a mean over the caption text's tokens, so frequent words
    weigh more and an epoch is a pass over the text). A caption counts only when both tokenisations
    have the same length (always, with one tokenizer); its tokens pair by position."""
    pairs = []
    for caption in captions:
        src = source_tokenizer(caption, add_special_tokens=False)["input_ids"]
        tgt = target_tokenizer(caption, add_special_tokens=False)["input_ids"]
        if len(src) == len(tgt):
            pairs += zip(src, tgt, strict=True)
    if not pairs:
        raise ValueError("no caption tokenises to the same length under both tokenizers: no token pairs")
    return torch.tensor(pairs)


def train_word_converter(source_embeddings: Tensor, target_embeddings: Tensor, pairs: Tensor, *,
                         epochs: int = 8, lr: float = 5.0, batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """Linear(d_src, d_tgt) minimising 1 - cos(converter(e_src), e_tgt) over the token pairs, in
    `epochs` passes over them."""
    generator = torch.Generator().manual_seed(seed)
    source = source_embeddings.detach().float()[pairs[:, 0]]
    target = target_embeddings.detach().float()[pairs[:, 1]]
    converter = nn.Linear(source.shape[1], target.shape[1])
    optimizer = torch.optim.SGD(converter.parameters(), lr=lr)
    for _ in tqdm(range(epochs), desc="word converter", leave=False):
        for batch in torch.randperm(len(pairs), generator=generator).split(batch_size):
            loss = (1 - nn.functional.cosine_similarity(converter(source[batch]), target[batch], dim=-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return converter


def cosine_loss(converter: nn.Linear, source_embeddings: Tensor, target_embeddings: Tensor, pairs: Tensor) -> float:
    """The converter's mean 1 - cos over the token pairs."""
    with torch.no_grad():
        mapped = converter(source_embeddings.float()[pairs[:, 0]])
        cosine = nn.functional.cosine_similarity(mapped, target_embeddings.float()[pairs[:, 1]], dim=-1)
        return (1 - cosine).mean().item()


@torch.no_grad()
def merge_projector(converter: nn.Linear, source_projector: nn.Linear) -> nn.Linear:
    """A projector to the target width equal to converter(source_projector(x))."""
    merged = nn.Linear(source_projector.in_features, converter.out_features)
    merged.weight.copy_(converter.weight @ source_projector.weight)
    merged.bias.copy_(converter.weight @ source_projector.bias + converter.bias)
    return merged


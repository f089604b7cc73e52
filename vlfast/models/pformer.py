"""The P-Former (SPEC.md section 7): a small BERT-style encoder that reads a caption and emits K
prompt vectors in a frozen LLM's input space (trained on text alone by `python -m vlfast.pformer
train`), and the alignment loss that pulls a VPG's prompts toward them. It reads the LLM tokenizer's
ids, plus two ids of its own: [CLS] and [MASK]."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, BertConfig, BertModel

from vlfast.models.pretrained import read_pretrained, save_pretrained

CONFIG_NAME, WEIGHTS_NAME = "pformer.json", "model.safetensors"
MODEL_DIR = "pformer"  # the model and its tokenizer, in the output directory of `python -m vlfast.pformer train`


@dataclass
class PFormerConfig:
    vocab_size: int  # the LLM tokenizer's
    num_prompts: int  # K: must equal the VPG's query tokens it is aligned with
    llm_hidden_size: int
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 64
    dropout: float = 0.1

    @property
    def cls_id(self) -> int:
        return self.vocab_size

    @property
    def mask_id(self) -> int:
        return self.vocab_size + 1


class PFormer(nn.Module):
    """Caption ids (B, T) -> prompts (B, K, LLM width): a linear head on [CLS] to K x hidden, then a
    projection to the LLM's width."""

    def __init__(self, config: PFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = BertModel(BertConfig(
            vocab_size=config.vocab_size + 2, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
            max_position_embeddings=config.max_length + 1, hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout), add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, config.num_prompts * config.hidden_size)
        self.projection = nn.Linear(config.hidden_size, config.llm_hidden_size)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(sentence embedding: the [CLS] state (B, hidden), prompts (B, K, LLM width))."""
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this P-Former reads at most "
                             f"{self.config.max_length}")
        cls = torch.full_like(input_ids[:, :1], self.config.cls_id)
        ids = torch.cat([cls, input_ids], dim=1)
        mask = F.pad(attention_mask, (1, 0), value=1)
        sentence = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        prompts = self.head(sentence).view(-1, self.config.num_prompts, self.config.hidden_size)
        return sentence, self.projection(prompts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encode(input_ids, attention_mask)[1]

    def save_pretrained(self, directory: str | Path) -> None:
        save_pretrained(self, directory, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PFormer:
        values, weights = read_pretrained(directory, CONFIG_NAME, WEIGHTS_NAME,
                                          "not a P-Former written by python -m vlfast.pformer train")
        model = cls(PFormerConfig(**values))
        model.load_state_dict(weights)
        return model


def alignment_loss(vpg_prompts: Tensor, pformer_prompts: Tensor, elements: int | Tensor | None = None) -> Tensor:
    """MSE between a VPG's prompts and the P-Former's for the same captions (SPEC.md section 7):
    the squared error summed, over `elements` (by default the prompts' own count; data-parallel
    shards pass the global count, so that the shards' losses add up to the whole batch's)."""
    squared = F.mse_loss(vpg_prompts.float(), pformer_prompts.float(), reduction="sum")
    return squared / (vpg_prompts.numel() if elements is None else elements)


@dataclass(frozen=True)
class Alignment:
    """The alignment as an extra loss of a VPG's training: `weight` x the MSE between the VPG's
    prompts for captions and this P-Former's (frozen) for the same captions."""
    pformer: PFormer
    tokenizer: object  # the target LLM's, whose ids the P-Former reads
    weight: float
    name: str = "align"

    def __call__(self, prompts: Tensor, captions: list[str], count: float) -> Tensor:
        """The loss of these captions' prompts as their part of the loss over `count` captions."""
        ids, mask = caption_ids(self.tokenizer, captions, self.pformer.config.max_length)
        with torch.no_grad():
            reference = self.pformer.to(prompts.device)(ids.to(prompts.device), mask.to(prompts.device))
        return alignment_loss(prompts, reference, count * reference[0].numel())


def caption_ids(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The P-Former's input: the captions' token ids without special tokens, padded on the right."""
    encoded = tokenizer(captions, add_special_tokens=False, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def load(directory: str | Path) -> tuple[PFormer, object]:
    """A trained P-Former and its tokenizer, from `python -m vlfast.pformer train`'s output
    directory or its `pformer` subdirectory; frozen, in eval mode."""
    directory = Path(directory)
    if (directory / MODEL_DIR).is_dir():
        directory = directory / MODEL_DIR
    pformer = PFormer.from_pretrained(directory)
    return pformer.eval().requires_grad_(False), AutoTokenizer.from_pretrained(directory)


"""Batching captions for a causal LM: tokenise `prompt + caption + eos`, pad on the right, and
label only the caption (-100 on prompt and pad positions; the model adds -100 for its query
positions)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


class CaptionCollator:
    def __init__(self, tokenizer, *, prompt: str = "", max_length: int = 64) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (set tokenizer.pad_token)")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer needs an eos token: captions must end")
        self.tokenizer, self.prompt, self.max_length = tokenizer, prompt, max_length

    def prefix_ids(self, prompt: str | None = None) -> list[int]:
        """bos + the prompt's tokens (the collator's prompt when None): what precedes the caption,
        and what generation starts from."""
        prompt = self.prompt if prompt is None else prompt
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + (self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [])

    def tokenize(self, captions: Sequence[str], prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """prompts: one per caption, replacing the collator's prompt (a question before its answer)."""
        if prompts is not None and len(prompts) != len(captions):
            raise ValueError(f"{len(prompts)} prompts for {len(captions)} captions")
        rows, labels = [], []
        for i, caption in enumerate(captions):
            prefix = self.prefix_ids(None if prompts is None else prompts[i])
            text_ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append((prefix + text_ids)[: self.max_length])
            labels.append(([IGNORE_INDEX] * len(prefix) + text_ids)[: self.max_length])
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
        }

    def __call__(self, batch: Sequence[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        images, captions = zip(*batch, strict=True)
        return {"pixel_values": torch.stack(images), **self.tokenize(captions)}

"""Batching captions for an LLM.

Causal LM: tokenise `bos + prompt + caption + eos`, pad on the right, and label only the caption
(-100 on prompt and pad positions; the model adds -100 for its query positions).
Encoder-decoder LM (T5): the encoder reads `prompt + eos` (after the visual prompts), the decoder
is scored on `caption + eos` (labels of their own length), as BLIP-2's FlanT5 models are trained.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


class CaptionCollator:
    def __init__(self, tokenizer, *, prompt: str = "", max_length: int = 64, encoder_decoder: bool = False) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (set tokenizer.pad_token)")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer needs an eos token: captions must end")
        self.tokenizer, self.prompt, self.max_length = tokenizer, prompt, max_length
        self.encoder_decoder = encoder_decoder

    @classmethod
    def for_llm(cls, tokenizer, llm, **kwargs) -> CaptionCollator:
        """The collator of `llm`'s kind (causal or encoder-decoder)."""
        return cls(tokenizer, encoder_decoder=bool(llm.config.is_encoder_decoder), **kwargs)

    def prefix_ids(self, prompt: str | None = None) -> list[int]:
        """What the LM reads before the caption, and what generation starts from: bos + the
        prompt's tokens for a causal LM, the prompt's tokens + eos (the encoder's input) for an
        encoder-decoder LM. The collator's prompt when None."""
        prompt = self.prompt if prompt is None else prompt
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        if self.encoder_decoder:
            return ids + [self.tokenizer.eos_token_id]
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + ids

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids as text, up to the first eos."""
        eos = self.tokenizer.eos_token_id
        ids = list(ids)
        return self.tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids, skip_special_tokens=True).strip()

    def tokenize(self, captions: Sequence[str], prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """prompts: one per caption, replacing the collator's prompt (a question before its answer)."""
        if prompts is not None and len(prompts) != len(captions):
            raise ValueError(f"{len(prompts)} prompts for {len(captions)} captions")
        rows, labels = [], []
        for i, caption in enumerate(captions):
            prefix = self.prefix_ids(None if prompts is None else prompts[i])
            text_ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            if self.encoder_decoder:
                rows.append(prefix[: self.max_length])
                labels.append(text_ids[: self.max_length])
            else:
                rows.append((prefix + text_ids)[: self.max_length])
                labels.append(([IGNORE_INDEX] * len(prefix) + text_ids)[: self.max_length])
        return {
            "input_ids": _pad(rows, self.tokenizer.pad_token_id),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0),
            "labels": _pad(labels, IGNORE_INDEX),
        }

    def __call__(self, batch: Sequence[tuple[torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        images, captions = zip(*batch, strict=True)
        return {"pixel_values": torch.stack(images), **self.tokenize(captions)}

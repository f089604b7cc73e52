"""A frozen vision tower, a trainable VPG and a frozen causal LLM, joined by one of two connectors:

- `input`: BLIP-2's soft prompts, the VPG's output placed before the text embeddings;
- `memory`: MemVP, the VPG's output as extra key/value rows of every FFN (vlfast.patch.apply_memvp);

optionally with LaVIN's mixture-of-modality adapters in the LLM (vlfast.patch.apply_mma).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from vlfast.data.collate import IGNORE_INDEX
from vlfast.models.vision import tower_features, tower_width
from vlfast.models.vpg import VPG
from vlfast.patch import apply_memvp, apply_mma, modality, revert_memvp, revert_mma, visual_memory

CONNECTORS = ("input", "memory")


def check_tokenizer(tokenizer, llm: nn.Module) -> None:
    """ValueError unless every token of `tokenizer` has a row in the LLM's input embeddings."""
    rows = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM embeds only {rows}")


def prepend_prompts(llm: nn.Module, prompts: Tensor, input_ids: Tensor,
                    attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Input embeddings and attention mask of soft prompts (B, K, D) followed by the text."""
    text = llm.get_input_embeddings()(input_ids)
    embeds = torch.cat([prompts.to(text.dtype), text], dim=1)
    return embeds, nn.functional.pad(attention_mask, (prompts.shape[1], 0), value=1)


def prompted_lm_loss(llm: nn.Module, prompts: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     **loss_kwargs) -> Tensor:
    """The LM loss on `labels` of the text read after the soft `prompts`. Logits are computed only
    where a label is predicted (the last prompt position and the text): the LM head and its softmax
    over the other prompt positions would be thrown away."""
    embeds, mask = prepend_prompts(llm, prompts, input_ids, attention_mask)
    labels = nn.functional.pad(labels, (1, 0), value=IGNORE_INDEX)
    return llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, logits_to_keep=labels.shape[1],
               **loss_kwargs).loss


class VisionLanguageModel(nn.Module):
    def __init__(self, vision_tower: nn.Module | None, vpg: VPG, llm: nn.Module, *, connector: str = "input",
                 mma: dict | None = None, tokenizer=None) -> None:
        """vision_tower may be None when the caller always passes cached image features. mma:
        keyword arguments of apply_mma, or None for no adapters."""
        super().__init__()
        if connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {connector!r}")
        llm_width = llm.get_input_embeddings().embedding_dim
        if vpg.config.llm_hidden_size != llm_width:
            raise ValueError(f"the VPG projects to {vpg.config.llm_hidden_size} but the LLM's hidden size is "
                             f"{llm_width}: build the VPG with llm_hidden_size={llm_width}")
        if vision_tower is not None and tower_width(vision_tower) != vpg.config.vision_width:
            raise ValueError(f"the vision tower emits {tower_width(vision_tower)}-wide features but the VPG reads "
                             f"{vpg.config.vision_width}")
        if tokenizer is not None:
            check_tokenizer(tokenizer, llm)
        self.vision_tower = vision_tower.eval().requires_grad_(False) if vision_tower is not None else None
        self.vpg, self.llm, self.connector, self.tokenizer = vpg, llm, connector, tokenizer
        llm.requires_grad_(False)
        if connector == "memory":
            apply_memvp(llm, vpg.config.num_query_tokens)
        if mma is not None:
            apply_mma(llm, **mma)

    def llm_patches(self) -> list[nn.Module]:
        """The trainable modules the connector and the adapters added to the LLM."""
        patches = (getattr(self.llm, "vlfast_memvp", None), getattr(self.llm, "vlfast_mma", None))
        return [m for m in patches if m is not None]

    def release_llm(self) -> nn.Module:
        """Undo this model's patches on the LLM (last applied first), so that it can join another
        model; returns it."""
        if hasattr(self.llm, "vlfast_mma"):
            revert_mma(self.llm)
        if hasattr(self.llm, "vlfast_memvp"):
            revert_memvp(self.llm)
        return self.llm.requires_grad_(False)

    def visual_prompts(self, pixel_values: Tensor | None = None, image_features: Tensor | None = None) -> Tensor:
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values and image_features")
        if image_features is None:
            if self.vision_tower is None:
                raise ValueError("this model has no vision tower: pass cached image_features")
            image_features = tower_features(self.vision_tower, pixel_values)
        return self.vpg(image_features)

    def _run(self, fn, prompts: Tensor, modalities):
        """fn(prompts) inside the connector's and the adapters' context."""
        adapters = modality(self.llm, modalities) if hasattr(self.llm, "vlfast_mma") else contextlib.nullcontext()
        memory = visual_memory(self.llm, prompts) if self.connector == "memory" else contextlib.nullcontext()
        with adapters, memory:
            return fn(prompts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None, *,
                pixel_values: Tensor | None = None, image_features: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None,
                return_prompts: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The LM loss on `labels` (-100 ignored), or the logits when labels is None. The loss is the
        mean over labelled tokens, or their sum over `num_items_in_batch` when given (what keeps
        data-parallel shards of one batch equal to the whole batch). With return_prompts, also the
        visual prompts (B, Q, D) (for a loss on them, such as P-Former alignment)."""
        prompts = self.visual_prompts(pixel_values, image_features)
        modalities = ["image"] * input_ids.shape[0]
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

        def run(prompts):
            if self.connector == "memory":
                out = self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **loss_kwargs)
                return out.loss if labels is not None else out.logits
            if labels is not None:
                return prompted_lm_loss(self.llm, prompts, input_ids, attention_mask, labels, **loss_kwargs)
            embeds, mask = prepend_prompts(self.llm, prompts, input_ids, attention_mask)
            return self.llm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=input_ids.shape[1]).logits

        out = self._run(run, prompts, modalities)
        return (out, prompts) if return_prompts else out

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, pixel_values: Tensor | None = None,
                 image_features: Tensor | None = None, **generate_kwargs) -> Tensor:
        """Continuations of the prompts `input_ids` (new tokens only) given the images."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = self.visual_prompts(pixel_values, image_features)
        modalities = ["image"] * input_ids.shape[0]

        def run(prompts):
            if self.connector == "memory":
                out = self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
                return out[:, input_ids.shape[1]:]
            embeds, mask = prepend_prompts(self.llm, prompts, input_ids, attention_mask)
            return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

        return self._run(run, prompts, modalities)

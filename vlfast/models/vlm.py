"""A frozen vision tower, a trainable VPG and a frozen LLM, joined by one of two connectors:

- `input`: BLIP-2's soft prompts, the VPG's output placed before the text embeddings (of a causal
  LM, or of an encoder-decoder LM's encoder, as BLIP-2 feeds FlanT5);
- `memory`: MemVP, the VPG's output as extra key/value rows of every FFN (vlfast.patch.apply_memvp);

optionally with LaVIN's mixture-of-modality adapters in the LLM (vlfast.patch.apply_mma). The LLM
may be held in half precision (`llm_dtype`) while the VPG trains in float32.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from functools import partial

import torch
from torch import Tensor, nn

from vlfast.data.collate import IGNORE_INDEX
from vlfast.models.vision import tower_features, tower_width
from vlfast.models.vpg import VPG
from vlfast.patch import apply_memvp, apply_mma, modality, revert_memvp, revert_mma, visual_memory
from vlfast.patch.base import is_patched, patch_module
from vlfast.patch.families import family

CONNECTORS = ("input", "memory")
LLM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def last_positions(count: int, embeds: Tensor) -> Tensor:
    """`logits_to_keep` for the last `count` positions of `embeds` (B, T, D), as indices: they gather
    the hidden states into a contiguous copy, where a slice would leave them strided and the LM head's
    matmul would then broadcast its weight over the batch (a bmm several times slower on CPU than the
    one matrix product the copy gets)."""
    return torch.arange(embeds.shape[1] - count, embeds.shape[1], device=embeds.device)


def prompted_lm_loss(llm: nn.Module, prompts: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                     **loss_kwargs) -> Tensor:
    """The LM loss on `labels` of the text read after the soft `prompts`. A causal LM computes
    logits only where a label is predicted (the last prompt position and the text): the LM head and
    its softmax over the other prompt positions would be thrown away. An encoder-decoder LM reads
    the prompts and `input_ids` in its encoder and is scored on `labels` in its decoder."""
    embeds, mask = prepend_prompts(llm, prompts, input_ids, attention_mask)
    if llm.config.is_encoder_decoder:  # its own loss is a mean: sum here, over num_items_in_batch when given
        logits = llm(inputs_embeds=embeds, attention_mask=mask,
                     decoder_input_ids=llm.prepare_decoder_input_ids_from_labels(labels=labels)).logits
        total = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                            reduction="sum")
        return total / loss_kwargs.get("num_items_in_batch", (labels != IGNORE_INDEX).sum())
    labels = nn.functional.pad(labels, (1, 0), value=IGNORE_INDEX)
    return llm(inputs_embeds=embeds, attention_mask=mask, labels=labels,
               logits_to_keep=last_positions(labels.shape[1], embeds), **loss_kwargs).loss


def length_groups(attention_mask: Tensor, most: int = 4) -> list[Tensor]:
    """The rows of a right-padded batch cut into at most `most` groups of similar length, chosen to
    leave the fewest padded positions when each group is cut to its longest row: short rows
    (captions) then do not pay for long ones (questions). Row indices, shortest group first."""
    lengths = attention_mask.sum(dim=1)
    values, counts = (t.tolist() for t in torch.unique(lengths, return_counts=True))  # ascending
    rows_below = [0, *itertools.accumulate(counts)]  # rows_below[i]: the rows shorter than values[i]
    # fewest[g][i]: the fewest positions the rows of the i shortest lengths take in g groups; start[g][i]: where
    # the last of those groups starts (it holds lengths start..i-1, all cut to values[i - 1])
    fewest = [[0] + [math.inf] * len(values) for _ in range(most + 1)]
    start = [[0] * (len(values) + 1) for _ in range(most + 1)]
    for g in range(1, most + 1):
        for i in range(1, len(values) + 1):
            for j in range(i):
                total = fewest[g - 1][j] + (rows_below[i] - rows_below[j]) * values[i - 1]
                if total < fewest[g][i]:
                    fewest[g][i], start[g][i] = total, j
    bounds, i = [], len(values)
    for g in range(most, 0, -1):
        if i == 0:
            break
        bounds.append((values[start[g][i]], values[i - 1]))
        i = start[g][i]
    return [torch.nonzero((lengths >= low) & (lengths <= high)).flatten() for low, high in reversed(bounds)]


def _set_checkpointing(llm: nn.Module, enabled: bool) -> None:
    """Switch transformers' recomputation of the LLM's layers, by the newer names where transformers has them
    (transformers 5 deprecates gradient_checkpointing_* and is_gradient_checkpointing)."""
    if not enabled and not any(getattr(module, "gradient_checkpointing", False) for module in llm.modules()):
        return  # nothing to switch off (and a model that cannot checkpoint would raise)
    if hasattr(llm, "activation_checkpointing_enable"):
        if enabled:
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.activation_checkpointing_disable()
    elif enabled:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_disable()


class VisionLanguageModel(nn.Module):
    def __init__(self, vision_tower: nn.Module | None, vpg: VPG, llm: nn.Module, *, connector: str = "input",
                 mma: dict | None = None, tokenizer=None, llm_dtype: str | None = None) -> None:
        """vision_tower may be None when the caller always passes cached image features. mma:
        keyword arguments of apply_mma, or None for no adapters. llm_dtype: fp32, bf16 or fp16 to
        cast the frozen LLM to (None keeps its dtype); the VPG stays in its own dtype."""
        super().__init__()
        if connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {connector!r}")
        if llm_dtype is not None and llm_dtype not in LLM_DTYPES:
            raise ValueError(f"llm_dtype must be one of {tuple(LLM_DTYPES)}, got {llm_dtype!r}")
        if connector == "memory" or mma is not None:  # they patch the LLM's layers: refused before any change
            family(llm)
        if connector == "memory" and llm.config.hidden_size != llm.get_input_embeddings().embedding_dim:
            raise ValueError(f"the memory connector adds the prompts to the FFN inputs ({llm.config.hidden_size} "
                             f"wide), but this LLM embeds tokens {llm.get_input_embeddings().embedding_dim} wide "
                             f"(OPT's word_embed_proj_dim): use connector='input'")
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
        # The loss runs the LLM once per group of rows of similar length (`length_groups`); off, once per batch.
        self.length_grouping = True
        llm.requires_grad_(False)
        if llm_dtype is not None and llm.dtype != LLM_DTYPES[llm_dtype]:  # as loaded: keeps fp32 islands
            llm.to(LLM_DTYPES[llm_dtype])
        if connector == "memory":
            apply_memvp(llm, vpg.config.num_query_tokens)
        if mma is not None:
            apply_mma(llm, **mma)

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.llm.config.is_encoder_decoder)

    def labelled_tokens(self, labels: Tensor) -> int:
        """How many tokens of `labels` the loss scores: all of them after soft prompts or in a decoder;
        with the memory connector the causal LM's own shift drops the first."""
        scored = labels[:, 1:] if self.connector == "memory" else labels
        return int((scored != IGNORE_INDEX).sum())

    def llm_patches(self) -> list[nn.Module]:
        """The trainable modules the connector and the adapters added to the LLM."""
        return [patch_module(self.llm, kind) for kind in ("memvp", "mma") if is_patched(self.llm, kind)]

    def gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the Q-Former's and the frozen LLM's layer activations in the backward pass instead
        of keeping them (the LLM's through transformers). Input connector without MMA adapters only:
        MemVP's prompts and the adapters' routing are set around the forward pass and would be gone
        when the backward pass recomputes it."""
        if enabled and (self.connector == "memory" or is_patched(self.llm, "mma")):
            raise ValueError("gradient checkpointing needs the input connector and no MMA adapters: MemVP's prompts "
                             "and the adapters' routing are gone when the backward pass recomputes the LLM's layers")
        self.vpg.qformer.gradient_checkpointing = enabled
        _set_checkpointing(self.llm, enabled)

    def release_llm(self) -> nn.Module:
        """Undo this model's patches on the LLM (last applied first), so that it can join another
        model; returns it."""
        if is_patched(self.llm, "mma"):
            revert_mma(self.llm)
        if is_patched(self.llm, "memvp"):
            revert_memvp(self.llm)
        _set_checkpointing(self.llm, False)
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
        adapters = modality(self.llm, modalities) if is_patched(self.llm, "mma") else contextlib.nullcontext()
        memory = visual_memory(self.llm, prompts) if self.connector == "memory" else contextlib.nullcontext()
        with adapters, memory:
            return fn(prompts)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None, *,
                pixel_values: Tensor | None = None, image_features: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None, decoder_input_ids: Tensor | None = None,
                return_prompts: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The LM loss on `labels` (-100 ignored), or the logits when labels is None (the text's
        logits; an encoder-decoder LLM's decoder logits over `decoder_input_ids`). The loss is the
        mean over labelled tokens, or their sum over `num_items_in_batch` when given (what keeps
        data-parallel shards of one batch equal to the whole batch). With an encoder-decoder LLM,
        input_ids is the encoder's text and labels the decoder's. With return_prompts, also the
        visual prompts (B, Q, D) (for a loss on them, such as P-Former alignment)."""
        if self.is_encoder_decoder and labels is None and decoder_input_ids is None:
            raise ValueError("an encoder-decoder LLM needs labels or decoder_input_ids")
        prompts = self.visual_prompts(pixel_values, image_features)
        modalities = ["image"] * input_ids.shape[0]
        # Cutting a group to its longest row keeps every token only when padding is on the right.
        if (labels is not None and not self.is_encoder_decoder and self.length_grouping
                and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
            groups = length_groups(attention_mask)
            if len(groups) > 1:  # each group's loss as its part of the whole batch's
                count = self.labelled_tokens(labels) if num_items_in_batch is None else num_items_in_batch
                loss = 0
                for rows in groups:
                    width = int(attention_mask[rows].sum(dim=1).max())
                    group_loss = partial(self._loss, input_ids[rows, :width], attention_mask[rows, :width],
                                         labels[rows, :width], num_items_in_batch=count)
                    loss = loss + self._run(group_loss, prompts[rows], [modalities[i] for i in rows.tolist()])
                return (loss, prompts) if return_prompts else loss
        loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}

        def run(prompts):
            if labels is not None:
                return self._loss(input_ids, attention_mask, labels, prompts, **loss_kwargs)
            if self.connector == "memory":
                return self.llm(input_ids=input_ids, attention_mask=attention_mask).logits
            embeds, mask = prepend_prompts(self.llm, prompts, input_ids, attention_mask)
            if self.is_encoder_decoder:
                return self.llm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
            return self.llm(inputs_embeds=embeds, attention_mask=mask,
                            logits_to_keep=last_positions(input_ids.shape[1], embeds)).logits

        out = self._run(run, prompts, modalities)
        return (out, prompts) if return_prompts else out

    def _loss(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, prompts: Tensor,
              **loss_kwargs) -> Tensor:
        """The LM loss of these rows after their prompts (inside the connector's context)."""
        if self.connector == "memory":
            return self.llm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **loss_kwargs).loss
        return prompted_lm_loss(self.llm, prompts, input_ids, attention_mask, labels, **loss_kwargs)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, pixel_values: Tensor | None = None,
                 image_features: Tensor | None = None, **generate_kwargs) -> Tensor:
        """Continuations of the prompts `input_ids` (new tokens only) given the images; for an
        encoder-decoder LLM, the decoder's output for the encoder text `input_ids`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = self.visual_prompts(pixel_values, image_features)
        modalities = ["image"] * input_ids.shape[0]

        def run(prompts):
            if self.connector == "memory":
                out = self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
                return out[:, input_ids.shape[1]:]
            embeds, mask = prepend_prompts(self.llm, prompts, input_ids, attention_mask)
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
            return out[:, 1:] if self.is_encoder_decoder else out  # a decoder starts from its start token

        return self._run(run, prompts, modalities)

    def save_pretrained(self, directory: str, *, copy_frozen: bool = False, state: dict[str, Tensor] | None = None):
        """A self-contained model directory (vlfast.models.saving): the trained weights, the settings,
        the tokenizer, and the frozen LLM and tower by reference, or copied when they have no
        directory to refer to or `copy_frozen` is set. `state`: the model's state dict, given whole
        when its own is sharded (FSDP)."""
        from vlfast.models.saving import save

        save(self, directory, copy_frozen=copy_frozen, state=state)

    @classmethod
    def from_pretrained(cls, directory: str, *, vision_tower: nn.Module | None = None) -> VisionLanguageModel:
        """The model save_pretrained wrote, in eval mode; `vision_tower` serves when it saved none."""
        from vlfast.models.saving import load

        return load(directory, vision_tower=vision_tower)

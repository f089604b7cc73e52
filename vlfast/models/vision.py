"""Frozen vision towers: building, loading and running them, and the fingerprint that keys the
feature cache (vlfast.data.feature_shards) to a tower's config and weights.

Any Hugging Face vision model whose output has `last_hidden_state` (B, N, C) works as a tower
(CLIPVisionModel, Blip2VisionModel, ...). A BLIP-2 vision model's `post_layernorm` is BLIP-2's
ln_vision, which the VPG owns, so its features are taken before that norm. `tiny_vision_tower`
builds the embedded default: a small randomly initialised, frozen BLIP-2 ViT (so that a model
trained on it exports as a Hugging Face BLIP-2); random frozen features still carry the scene
content.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

# Vision models whose last_hidden_state has been through BLIP-2's ln_vision (their post_layernorm).
POST_NORMED_TOWERS = ("blip_2_vision_model",)


def tiny_vision_tower(image_size: int = 48, patch_size: int = 6, width: int = 96, layers: int = 2,
                      seed: int = 0) -> nn.Module:
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(seed)
    # BLIP-2's vision default initializer_range is 1e-10 (its weights are always loaded): random weights
    # that small would make the features blind to the image.
    config = Blip2VisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                               num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                               initializer_range=0.02)
    return Blip2VisionModel(config).eval().requires_grad_(False)


def load_tower(directory: str | Path) -> nn.Module:
    """A frozen vision tower saved with save_pretrained, by its config's architecture (AutoModel
    does not map Blip2VisionModel); a whole BLIP-2 directory gives its vision model."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if config.model_type == "blip-2":
        return transformers.Blip2VisionModel.from_pretrained(directory).eval().requires_grad_(False)
    architecture = (config.architectures or [None])[0]
    if not hasattr(transformers, str(architecture)):
        raise ValueError(f"{directory}: its config.json names no transformers vision model class "
                         f"(architectures: {config.architectures})")
    return getattr(transformers, architecture).from_pretrained(directory).eval().requires_grad_(False)


def tower_width(tower: nn.Module) -> int:
    return tower.config.hidden_size


@torch.no_grad()
def tower_features(tower: nn.Module, pixel_values: Tensor) -> Tensor:
    """(B, N, C) features of a frozen tower (before a BLIP-2 tower's post_layernorm)."""
    dtype = next(tower.parameters()).dtype
    if tower.config.model_type in POST_NORMED_TOWERS:  # its encoder's output, without keeping every layer's
        return tower.encoder(inputs_embeds=tower.embeddings(pixel_values.to(dtype))).last_hidden_state
    return tower(pixel_values=pixel_values.to(dtype)).last_hidden_state


def fingerprint(tower: nn.Module, preprocessing: dict) -> str:
    """Changes whenever the tower's config or weights or the preprocessing change."""
    digest = hashlib.sha256(json.dumps(tower.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]

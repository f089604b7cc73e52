"""Frozen vision towers and the on-disk cache of their features.

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

import numpy as np
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


class FeatureCache:
    """Features of a frozen tower, computed once per (image, augmentation view) and read back
    memory-mapped (fp16 .npy files under root/<fingerprint>/). A new tower or preprocessing gives
    a new fingerprint, so stale features are never read."""

    def __init__(self, root: str | Path, tower: nn.Module, preprocessing: dict) -> None:
        self.tower = tower
        self.directory = Path(root) / fingerprint(tower, preprocessing)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha1(key.encode()).hexdigest() + ".npy")

    def features(self, keys: list[str], pixel_values: Tensor) -> Tensor:
        """(B, N, C) float32 features of images `pixel_values` identified by `keys` (image id and
        augmentation view); only the missing ones run through the tower."""
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} keys for {pixel_values.shape[0]} images")
        missing = [i for i, key in enumerate(keys) if not self._path(key).is_file()]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            computed = tower_features(self.tower, pixel_values[missing]).to(torch.float16).cpu().numpy()
            for row, i in enumerate(missing):
                temporary = self._path(keys[i]).with_suffix(".tmp.npy")
                np.save(temporary, computed[row])
                temporary.replace(self._path(keys[i]))  # atomic: a reader never sees half a file
        return torch.stack([torch.from_numpy(np.load(self._path(k), mmap_mode="r").astype(np.float32)) for k in keys])

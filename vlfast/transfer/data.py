"""The image-text data of a transfer run: frozen vision features of every image (computed once into
the feature cache), the examples the LM loss is taken on, and what caption and question-answering
evaluation compare against."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from vlfast.data.coco import CocoCaptions, normalise
from vlfast.data.shapes import ShapesDataset
from vlfast.models.vision import FeatureCache

SPLIT_FILES = {"train": "train2017", "val": "val2017"}  # coco:DIR follows COCO 2017's layout


@dataclass(frozen=True)
class Example:
    image: int  # row of the split's features
    prompt: str  # text before the target ('' for a caption, the question for an answer)
    target: str  # what the LM is scored on


@dataclass
class Split:
    features: Tensor  # (images, tokens, vision width), float32
    examples: list[Example]  # what the LM loss is taken on
    references: list[list[str]]  # every caption of each image (CIDEr)

    @property
    def questions(self) -> list[Example]:
        """The examples with a prompt: question-answer pairs (accuracy); none for COCO."""
        return [e for e in self.examples if e.prompt]


def pixels(images: Tensor, size: int) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, size, size) in CLIP's normalisation, as COCO images get."""
    scaled = images.float() / 255
    if scaled.shape[-1] != size:
        scaled = nn.functional.interpolate(scaled, size=(size, size), mode="bicubic", align_corners=False)
    return normalise(scaled)


def _cache(tower: nn.Module, cache_dir: Path) -> FeatureCache:
    return FeatureCache(cache_dir, tower, {"resize": "bicubic", "normalise": "clip"})


def shapes_split(split: str, size: int, seed: int, tower: nn.Module, cache_dir: Path, chunk: int = 256) -> Split:
    """Image i contributes caption phrasing i % 4 and question i % (its number of questions); the
    references are all four phrasings."""
    data = ShapesDataset(split, size, seed=seed)
    cache, image_size = _cache(tower, cache_dir), tower.config.image_size
    features, examples, references = [], [], []
    for start in tqdm(range(0, size, chunk), desc=f"{split} features", leave=False):
        scenes = [data[i] for i in range(start, min(size, start + chunk))]
        keys = [f"shapes/{split}/{seed}/{start + i}" for i in range(len(scenes))]
        features.append(cache.features(keys, pixels(torch.stack([s.image for s in scenes]), image_size)))
        for i, scene in enumerate(scenes, start):
            question, answer = scene.questions[i % len(scene.questions)]
            examples += [Example(i, "", scene.captions[i % len(scene.captions)]), Example(i, question, answer)]
            references.append(list(scene.captions))
    return Split(torch.cat(features), examples, references)


def coco_split(root: Path, split: str, size: int, tower: nn.Module, cache_dir: Path, chunk: int = 64) -> Split:
    """The first `size` readable images of COCO's split; each caption is an example."""
    captions = CocoCaptions(root / "annotations" / f"captions_{SPLIT_FILES[split]}.json", root / SPLIT_FILES[split],
                            image_size=tower.config.image_size, skip_missing=True)
    grouped = list(captions.captions_by_image().items())[:size]
    if not grouped:
        raise ValueError(f"--data coco:{root}: no readable image in the {split} split")
    cache = _cache(tower, cache_dir)
    features, examples = [], []
    for start in tqdm(range(0, len(grouped), chunk), desc=f"{split} features", leave=False):
        part = grouped[start:start + chunk]
        keys = [f"coco/{path.resolve()}" for path, _ in part]
        features.append(cache.features(keys, torch.stack([captions.load(path) for path, _ in part])))
    for i, (_, texts) in enumerate(grouped):
        examples += [Example(i, "", text) for text in texts]
    return Split(torch.cat(features), examples, [texts for _, texts in grouped])


def load_splits(data: str, train_images: int, val_images: int, seed: int, tower: nn.Module,
                cache_dir: Path) -> tuple[Split, Split]:
    if data == "shapes":
        return (shapes_split("train", train_images, seed, tower, cache_dir),
                shapes_split("val", val_images, seed, tower, cache_dir))
    root = Path(data.removeprefix("coco:"))
    return (coco_split(root, "train", train_images, tower, cache_dir),
            coco_split(root, "val", val_images, tower, cache_dir))

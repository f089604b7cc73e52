"""A COCO-format caption data set from a local folder: a captions JSON (`images` with `id` and
`file_name`, `annotations` with `image_id` and `caption`) and an image folder. One item per
caption; images are resized and normalised."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# CLIP's normalisation, what BLIP-2's EVA tower and most vision towers expect.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def normalise(pixels: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> per-channel (x - mean) / std."""
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def image_to_tensor(image: Image.Image, size: int, mean=MEAN, std=STD) -> torch.Tensor:
    """RGB, bicubic resize to size x size, [0, 1], normalised: (3, size, size) float32."""
    array = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return normalise(torch.from_numpy(array).permute(2, 0, 1), mean, std)


class CocoCaptions(torch.utils.data.Dataset):
    """(image (3, size, size), caption) pairs. With skip_missing, images that are missing or
    unreadable are dropped up front and counted in `skipped`; otherwise the first one raises an
    error naming the file."""

    def __init__(self, captions_file: str | Path, image_dir: str | Path, *, image_size: int = 224,
                 skip_missing: bool = False) -> None:
        captions_file, self.image_dir, self.image_size = Path(captions_file), Path(image_dir), image_size
        if not captions_file.is_file():
            raise FileNotFoundError(f"captions file {captions_file} not found")
        data = json.loads(captions_file.read_text())
        files = {image["id"]: image["file_name"] for image in data["images"]}
        self.items: list[tuple[Path, str]] = []
        self.skipped = 0
        for annotation in data["annotations"]:
            path = self.image_dir / files[annotation["image_id"]]
            problem = self._problem(path)
            if problem and not skip_missing:
                raise FileNotFoundError(f"image {path}: {problem} (pass skip_missing=True to skip such images)")
            if problem:
                self.skipped += 1
            else:
                self.items.append((path, annotation["caption"].strip()))

    @staticmethod
    def _problem(path: Path) -> str | None:
        if not path.is_file():
            return "missing"
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            return f"unreadable ({error})"
        return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.items[index]
        return self.load(path), caption

    def load(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            return image_to_tensor(image, self.image_size)

    def captions_by_image(self) -> dict[Path, list[str]]:
        """Every readable image with all of its captions, in file order of first appearance."""
        grouped: dict[Path, list[str]] = {}
        for path, caption in self.items:
            grouped.setdefault(path, []).append(caption)
        return grouped

"""`shapes`: a procedural image-text data set made locally, deterministic by seed, of any size.

Each scene has one to three shapes (circle, square, triangle) with a colour, a size and a position
(one of four quadrants, at most one shape per quadrant), rendered on a 48 x 48 canvas, with
several caption phrasings and question-answer pairs, all in space-separated words of
`vocabulary()`. Sample i of a split is drawn from its own
random stream seeded by (seed, split, i): splits never overlap and any sample can be made alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "white": (240, 240, 240)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("one", "two", "three")
SPLITS = {"train": 0, "val": 1, "test": 2}
IMAGE_SIZE = 48


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeSpec, ...]
    image: torch.Tensor  # (3, 48, 48) uint8
    captions: tuple[str, ...]
    questions: tuple[tuple[str, str], ...]  # (question, answer)


def _render(objects: tuple[ShapeSpec, ...]) -> torch.Tensor:
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    half = IMAGE_SIZE // 2
    for obj in objects:
        index = POSITIONS.index(obj.position)
        cy, cx = half // 2 + half * (index // 2), half // 2 + half * (index % 2)
        r = 10 if obj.size == "large" else 5
        if obj.shape == "circle":
            inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        elif obj.shape == "square":
            inside = (np.abs(ys - cy) <= r) & (np.abs(xs - cx) <= r)
        else:  # triangle pointing up
            inside = (ys >= cy - r) & (ys <= cy + r) & (np.abs(xs - cx) <= (ys - (cy - r)) / 2)
        image[inside] = COLOURS[obj.colour]
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def _captions(objects: tuple[ShapeSpec, ...]) -> tuple[str, ...]:
    listed = " and ".join(obj.phrase() for obj in objects)
    placed = " and ".join(f"{obj.phrase()} in the {obj.position}" for obj in objects)
    count = NUMBERS[len(objects) - 1]
    noun = "shape" if len(objects) == 1 else "shapes"
    return (listed, f"there is {placed}", f"{count} {noun} : {listed}", f"an image of {listed}")


def _questions(objects: tuple[ShapeSpec, ...]) -> tuple[tuple[str, str], ...]:
    qa = [("how many shapes are there ?", NUMBERS[len(objects) - 1])]
    for obj in objects:
        qa.append((f"what colour is the shape in the {obj.position} ?", obj.colour))
        qa.append((f"what shape is in the {obj.position} ?", obj.shape))
        qa.append((f"how big is the {obj.colour} {obj.shape} ?", obj.size))
    return tuple(qa)


def make_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, 4))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = tuple(
        ShapeSpec(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                  SIZES[rng.integers(len(SIZES))], POSITIONS[p])
        for p in sorted(positions)
    )
    return Scene(objects, _render(objects), _captions(objects), _questions(objects))


class ShapesDataset(torch.utils.data.Dataset):
    """`size` scenes of one split; item i is the same for the same (seed, split, i)."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.split, self.size, self.seed = split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} scenes")
        return make_scene(np.random.default_rng([self.seed, SPLITS[self.split], index]))


def vocabulary() -> list[str]:
    """Every word a caption, question or answer can use."""
    words = {"a", "and", "there", "is", "in", "the", "an", "image", "of", "shape", "shapes", "how", "many", "are",
             "what", "colour", "big", "top", "bottom", "left", "right", ":", "?"}
    words |= set(SHAPES) | set(COLOURS) | set(SIZES) | set(NUMBERS)
    return sorted(words)


def render(directory: str, count: int, split: str = "test", seed: int = 0) -> list[tuple[str, Scene]]:
    """Writes the first `count` scenes of a split as PNG files; returns (path, scene) pairs."""
    from pathlib import Path

    from PIL import Image

    Path(directory).mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(split, count, seed)
    written = []
    for i in range(count):
        path = str(Path(directory) / f"{split}-{i}.png")
        Image.fromarray(data[i].image.permute(1, 2, 0).numpy().astype(np.uint8)).save(path)
        written.append((path, data[i]))
    return written


def write_shards(directory: str, count: int, per_shard: int, image_size: int = 256) -> str:
    """`count` shapes scenes as JPEG + txt webdataset shards (img2dataset's layout), for trying the
    stream without a download; returns their brace pattern."""
    from pathlib import Path

    import webdataset as wds
    from PIL import Image

    Path(directory).mkdir(parents=True, exist_ok=True)
    scenes = ShapesDataset("train", count)
    with wds.ShardWriter(f"{directory}/%05d.tar", maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            scene = scenes[i]
            image = Image.fromarray(scene.image.permute(1, 2, 0).numpy()).resize((image_size, image_size))
            sink.write({"__key__": f"{i // per_shard:05d}{i % per_shard:04d}", "jpg": image,
                        "txt": scene.captions[0]})
    return f"{directory}/{{00000..{(count - 1) // per_shard:05d}}}.tar"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlfast.data.shapes", description="the shapes data set")
    commands = parser.add_subparsers(dest="command", required=True)
    render_parser = commands.add_parser("render", help="scenes as PNG files, with a caption and a question each")
    render_parser.add_argument("directory")
    render_parser.add_argument("--count", type=int, default=2)
    render_parser.add_argument("--split", choices=tuple(SPLITS), default="test")
    render_parser.add_argument("--seed", type=int, default=0)
    export_parser = commands.add_parser(
        "export", help="scenes in the official formats of the benchmarks python -m vlfast.evaluate reads, "
                       "one folder per task")
    export_parser.add_argument("directory")
    export_parser.add_argument("--count", type=int, default=200, help="scenes (default: 200)")
    export_parser.add_argument("--split", choices=tuple(SPLITS), default="test")
    export_parser.add_argument("--seed", type=int, default=0)
    export_parser.add_argument("--tasks", nargs="+", help="default: all six")
    shards_parser = commands.add_parser("shards", help="training scenes as webdataset shards (JPEG + txt), for "
                                                       "trying --data wds:... without a download")
    shards_parser.add_argument("directory")
    shards_parser.add_argument("--count", type=int, default=2048)
    shards_parser.add_argument("--per-shard", type=int, default=256)
    shards_parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.command == "shards":
        print(write_shards(args.directory, args.count, args.per_shard, args.image_size))
        return
    if args.command == "export":
        from vlfast.data.shapes_benchmarks import WRITERS, export

        try:
            folders = export(args.directory, args.count, args.split, args.seed, tuple(args.tasks or WRITERS))
        except ValueError as error:
            parser.error(str(error))
        for task, folder in folders.items():
            print(f"{task}: {folder}  (python -m vlfast.evaluate --task {task} --data {folder} --model ...)")
        return
    for path, scene in render(args.directory, args.count, args.split, args.seed):
        question, answer = scene.questions[0]
        print(f"{path}: {scene.captions[0]} | {question} {answer}")


if __name__ == "__main__":
    main()

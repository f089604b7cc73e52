"""Data sources for streamed training, and the `--data` spec that names them.

`--data` is a comma-separated list of `shapes`, `coco:DIR` and `wds:PATTERN` (webdataset tar shards,
brace patterns like `cc3m/{00000..00331}.tar`), each with an optional sampling ratio after its last
`=`: `wds:laion/{0..99}.tar=0.7,coco:/data/coco=0.3`. Commas inside braces belong to the pattern.

Every source is read as one of `slots` disjoint parts (one per rank and DataLoader worker), in
passes: pass p of a slot is a seeded permutation of its shards (or items), so a part is a pure
function of (seed, slot, slots, pass). A position `[pass, item, offset]` (a shard and its number of
tar samples read, or an item of a map-style set) is what resumes a part exactly: whole shards before
it are never opened, and the samples of its shard before `offset` are read but not decoded.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlfast.data.coco import CocoCaptions, image_to_tensor
from vlfast.data.shapes import ShapesDataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
ON_ERROR = ("skip", "raise")
Position = list[int]  # [pass, shard or item ordinal in the pass, tar samples read of that shard]


class Sample(NamedTuple):
    image: torch.Tensor  # (3, size, size) normalised pixels, or (tokens, width) float32 features
    caption: str  # the text the LM is scored on (a caption, or the answer to `prompt`)
    key: str  # the image's, unique within its source (examples of one image share it)
    prompt: str = ""  # text before the caption: a question, or '' for a caption
    references: tuple[str, ...] = ()  # every caption of the image (CIDEr); () when only `caption` is known


class SampleError(ValueError):
    """A sample that cannot be used: its shard and key are in the message."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # 'shapes' | 'coco' | 'wds'
    location: str  # '' for shapes
    ratio: float  # normalised over the spec


def _split_top_level(text: str) -> list[str]:
    """Splits on commas outside braces (brace patterns list alternatives with commas)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(pattern: str) -> list[str]:
    """The shard paths of a brace pattern; ValueError naming the pattern when a local one is missing."""
    urls = expand_urls(pattern)
    missing = [url for url in urls if not _is_remote(url) and not os.path.isfile(url)]
    if len(missing) == len(urls):
        raise ValueError(f"--data wds:{pattern}: no shard matches the pattern")
    if missing:
        raise ValueError(f"--data wds:{pattern}: {len(missing)} of its {len(urls)} shards are missing "
                         f"(the first: {missing[0]})")
    return urls


def parse_data(spec: str) -> list[SourceSpec]:
    """`--data` as sources with ratios summing to 1 (all equal when none is given); ValueError naming
    `--data` and what was expected."""
    expected = "expected a comma-separated list of shapes, coco:DIR or wds:PATTERN, each optionally =RATIO"
    entries, ratios = [], []
    for part in _split_top_level(spec.strip()):
        name, ratio = part.strip(), None
        head, equals, tail = name.rpartition("=")
        if equals and "}" not in tail and "/" not in tail:
            try:
                ratio = float(tail)
            except ValueError:
                raise ValueError(f"--data {spec!r}: bad ratio {tail!r} in {name!r} (a positive number)") from None
            if not (math.isfinite(ratio) and ratio > 0):
                raise ValueError(f"--data {spec!r}: bad ratio {tail!r} in {name!r} (a positive number)")
            name = head
        kind, _, location = name.partition(":")
        if kind not in ("shapes", "coco", "wds") or (kind == "shapes" and location):
            raise ValueError(f"--data {spec!r}: {name!r} is not a source; {expected}")
        if kind in ("coco", "wds") and not location:
            raise ValueError(f"--data {spec!r}: {kind}: needs a path ({kind}:{'DIR' if kind == 'coco' else 'PATTERN'})")
        if kind == "coco" and not Path(location).is_dir():
            raise ValueError(f"--data {spec!r}: coco:{location}: no such directory")
        if kind == "wds":
            expand_shards(location)
        entries.append((kind, location))
        ratios.append(ratio)
    if len(set(entries)) != len(entries):
        raise ValueError(f"--data {spec!r}: a source is listed twice")
    given = [r for r in ratios if r is not None]
    if given and len(given) != len(ratios):
        raise ValueError(f"--data {spec!r}: give a ratio to every source or to none")
    total = sum(given) if given else len(ratios)
    return [SourceSpec(kind, location, (r if r is not None else 1.0) / total)
            for (kind, location), r in zip(entries, ratios, strict=True)]


def _permutation(n: int, *seed: int) -> np.ndarray:
    return np.random.default_rng(list(seed)).permutation(n)


class ErrorCounter:
    """on_error='skip': counts unusable samples per shard (a broken tar stream ends its shard and
    counts once); 'raise': raises SampleError naming the shard and key."""

    def __init__(self, on_error: str, counts: dict[str, int]) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error, self.counts = on_error, counts

    def __call__(self, shard: str, key: str, problem: str) -> None:
        if self.on_error == "raise":
            raise SampleError(f"shard {shard}, sample {key!r}: {problem} (on_error='skip' skips such samples)")
        self.counts[shard] = self.counts.get(shard, 0) + 1


class Source:
    """A data set read as disjoint parts; `part` yields (sample, position after it)."""

    name: str

    def part(self, slot: int, slots: int, seed: int, position: Position, cycle: bool,
             errors: ErrorCounter) -> Iterator[tuple[Sample, Position]]:
        raise NotImplementedError


class ShardSource(Source):
    """webdataset tar shards: samples with an image (jpg, jpeg, png or webp) and a caption (`txt`,
    or `json` as LAVIS writes it: a dict with "caption" or VPGTrans's "all_captions" and
    "all_similarities", or a list, whose first caption is taken), or with `npy` features and a
    `txt` caption, and optionally `prompt.txt` and `refs.json` (the feature cache; image_size is then
    unused). With fewer shards than slots every slot reads every shard and keeps every slots-th
    sample. `shuffle`: each pass reads a shard's samples in a seeded order, seeking in the tar file
    (local shards only: the feature cache, whose shards would otherwise be read in one fixed order)."""

    def __init__(self, pattern: str, image_size: int, *, shuffle: bool = False) -> None:
        self.name, self.shards, self.image_size = f"wds:{pattern}", expand_shards(pattern), image_size
        self.shuffle = shuffle

    def part(self, slot: int, slots: int, seed: int, position: Position, cycle: bool,
             errors: ErrorCounter) -> Iterator[tuple[Sample, Position]]:
        spread = len(self.shards) >= slots
        owned = ([self.shards[i] for i in _permutation(len(self.shards), seed, 0)[slot::slots]] if spread
                 else self.shards)
        pass_, first, offset = position
        while True:
            order = [owned[i] for i in _permutation(len(owned), seed, 1, slot, pass_)]
            yielded = first > 0 or offset > 0  # a resumed pass has yielded before
            for item in range(first, len(order)):
                for index, raw in enumerate(self._raw_samples(order[item], errors, seed, pass_)):
                    if index < offset or (not spread and index % slots != slot):
                        continue
                    offset = index + 1
                    sample = self._decode(raw, order[item], errors)
                    if sample is not None:
                        yielded = True
                        yield sample, [pass_, item, offset]
                offset = 0
            if not (cycle and yielded):  # a pass with no usable sample: the caller says so
                return
            pass_, first = pass_ + 1, 0

    def _raw_samples(self, shard: str, errors: ErrorCounter, seed: int, pass_: int) -> Iterator[dict]:
        if self.shuffle:
            yield from _shuffled_samples(shard, errors, seed, 3, pass_, self.shards.index(shard))
            return

        def handler(error: Exception) -> bool:
            errors(shard, "(tar stream)", f"unreadable tar data, the rest of the shard is lost: {error.args[0]!r}")
            return False  # webdataset stops reading this shard

        with gopen(shard, "rb") as stream:
            yield from group_by_keys(tar_file_expander([{"url": shard, "stream": stream}], handler=handler),
                                     handler=handler)

    def _decode(self, raw: dict, shard: str, errors: ErrorCounter) -> Sample | None:
        key = raw["__key__"]
        try:
            caption = _caption(raw)
        except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError) as error:
            errors(shard, key, f"unreadable caption ({error})")
            return None
        if not caption:
            errors(shard, key, "no caption (txt, or json with a caption)")
            return None
        if "npy" in raw:
            features = torch.from_numpy(np.load(io.BytesIO(raw["npy"])).astype(np.float32))
            references = tuple(json.loads(raw["refs.json"])) if "refs.json" in raw else ()
            return Sample(features, caption, raw.get("key.txt", key.encode()).decode(),
                          raw.get("prompt.txt", b"").decode(), references)
        data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            errors(shard, key, f"no image ({', '.join(IMAGE_EXTENSIONS)})")
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                return Sample(image_to_tensor(image, self.image_size), caption, f"{shard}/{key}")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            errors(shard, key, f"undecodable image ({error})")
            return None


def _shuffled_samples(shard: str, errors: ErrorCounter, *seed: int) -> Iterator[dict]:
    """A local tar shard's samples in a seeded order: each sample's files are read by seeking to
    them (the shard's table of contents is read once and kept, see `_table_of_contents`), so that
    no more than one sample is in memory."""
    try:
        contents = _table_of_contents(shard, os.stat(shard).st_mtime_ns)
        with open(shard, "rb") as stream:
            for i in _permutation(len(contents), *seed):
                key, files = contents[i]
                sample = {"__key__": key}
                for extension, offset, size in files:
                    stream.seek(offset)
                    sample[extension] = stream.read(size)
                yield sample
    except (tarfile.TarError, OSError) as error:
        errors(shard, "(tar stream)", f"unreadable tar data, the rest of the shard is lost: {error!r}")


@functools.lru_cache(maxsize=256)
def _table_of_contents(shard: str, mtime_ns: int) -> tuple[tuple[str, tuple[tuple[str, int, int], ...]], ...]:
    """(key, ((extension, offset, size), ...)) of each sample of a tar shard, grouped as webdataset
    groups files (the key ends at the base name's first dot). Parsing the tar headers costs more
    than reading the small samples of the feature cache, so the last 256 shards' tables are kept
    (a few hundred KB each; `mtime_ns` retires a rewritten shard's)."""
    grouped: dict[str, list[tuple[str, int, int]]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.isfile():
                folder, _, base = member.name.rpartition("/")
                key, _, extension = base.partition(".")
                grouped.setdefault(f"{folder}/{key}" if folder else key, []).append(
                    (extension, member.offset_data, member.size))
    return tuple((key, tuple(files)) for key, files in grouped.items())


def _caption(raw: dict) -> str:
    if "txt" in raw:
        return raw["txt"].decode("utf-8").strip()
    if "json" not in raw:
        return ""
    meta = json.loads(raw["json"])
    if isinstance(meta, list):
        return str(meta[0]).strip()
    if "all_captions" in meta:  # VPGTrans's LAION-COCO: the caption most similar to the image
        return meta["all_captions"][int(np.argmax(meta["all_similarities"]))].strip()
    return str(meta.get("caption") or "").strip()


class IndexedSource(Source):
    """A map-style set (`get(i)` -> Sample) read in passes: each pass a seeded permutation of its
    items, every slots-th one to a slot."""

    def __init__(self, name: str, size: int, get: Callable[[int], Sample]) -> None:
        if size <= 0:
            raise ValueError(f"{name}: no items")
        self.name, self.size, self.get = name, size, get

    def part(self, slot: int, slots: int, seed: int, position: Position, cycle: bool,
             errors: ErrorCounter) -> Iterator[tuple[Sample, Position]]:
        pass_, first, _ = position
        while True:
            order = _permutation(self.size, seed, 1, pass_)[slot::slots]
            for item in range(first, len(order)):
                yield self.get(int(order[item])), [pass_, item + 1, 0]
            if not (cycle and len(order)):
                return
            pass_, first = pass_ + 1, 0


class _Shapes:  # picklable for DataLoader workers (a closure would not be)
    """Two examples per scene: item 2n is scene n's caption (phrasing n % 4), item 2n + 1 its question
    n % (its number of questions) with the answer; the references are all four phrasings."""

    def __init__(self, split: str, size: int, seed: int, image_size: int) -> None:
        self.data, self.image_size = ShapesDataset(split, size, seed), image_size

    def __call__(self, i: int) -> Sample:
        n = i // 2
        scene = self.data[n]
        image = Image.fromarray(scene.image.permute(1, 2, 0).numpy())
        prompt, target = scene.questions[n % len(scene.questions)] if i % 2 else ("", scene.captions[n % 4])
        return Sample(image_to_tensor(image, self.image_size), target,
                      f"shapes/{self.data.split}/{self.data.seed}/{n}", prompt, tuple(scene.captions))


class _Coco:
    """Each caption of the first `images` readable images of a split is an example."""

    def __init__(self, root: str, split: str, images: int | None, image_size: int, on_error: str) -> None:
        self.data = CocoCaptions(Path(root) / "annotations" / f"captions_{split}2017.json", Path(root) / f"{split}2017",
                                 image_size=image_size, skip_missing=on_error == "skip")
        grouped = list(self.data.captions_by_image().items())[:images]
        self.items = [(path, caption, tuple(captions)) for path, captions in grouped for caption in captions]

    def __call__(self, i: int) -> Sample:
        path, caption, references = self.items[i]
        return Sample(self.data.load(path), caption, f"coco/{path.resolve()}", "", references)


def make_source(spec: SourceSpec, image_size: int, *, split: str = "train", images: int | None = None,
                seed: int = 0, on_error: str = "skip") -> Source:
    """The source of a parsed spec. shapes: the first `images` (default 1000) scenes of the split of
    `seed`; coco: the captions of the first `images` (default all) images of DIR/{split}2017 (COCO
    drops missing or unreadable images up front with on_error='skip'); wds: the shards (no split)."""
    if spec.kind == "wds":
        return ShardSource(spec.location, image_size)
    if spec.kind == "shapes":
        images = 1000 if images is None else images
        return IndexedSource(f"shapes:{split}:{seed}:{images}", 2 * images, _Shapes(split, images, seed, image_size))
    coco = _Coco(spec.location, split, images, image_size, on_error)
    return IndexedSource(f"coco:{spec.location}:{split}:{images}", len(coco.items), coco)

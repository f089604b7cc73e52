"""The image-text data of a transfer run, streamed (vlfast.data.stream): examples of an image (its
frozen vision features, or its pixels when the tower runs on the fly), an optional prompt (a
question), the text the LM is scored on and the image's references (CIDEr), read by DataLoader
workers from the sources of --data and --val-data. Unless --feature-cache none, each source's
features are computed once into the feature cache (shards on disk, vlfast.data.feature_shards) and
streamed from there; nothing holds a split's features in memory."""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlfast import defaults
from vlfast.data.feature_shards import feature_shards
from vlfast.data.sources import IndexedSource, Source, make_source, parse_data
from vlfast.data.stream import Stream, StreamLoader
from vlfast.training.distributed import Processes
from vlfast.transfer.config import TransferConfig


def cache_root(feature_cache: str) -> Path | None:
    """--feature-cache as a directory (None: features computed on the fly)."""
    if feature_cache == "none":
        return None
    return defaults.cache_home() / "feature-shards" if feature_cache == "default" else Path(feature_cache)


@dataclass
class TransferData:
    train: list[Source]
    ratios: list[float]
    val: Source
    samples_per_epoch: int  # training examples an epoch (all processes)
    config: TransferConfig
    processes: Processes

    @classmethod
    def load(cls, config: TransferConfig, tower: nn.Module, processes: Processes) -> TransferData:
        """The sources of --data (train split) and --val-data (val split), through the feature cache."""
        size, seed, on_error = tower.config.image_size, config.seed, config.on_error
        specs = parse_data(config.data)
        train = [make_source(spec, size, images=config.train_images, seed=seed, on_error=on_error) for spec in specs]
        val_spec = parse_data(config.val_data)[0] if config.val_data else next(s for s in specs if s.kind != "wds")
        val = make_source(val_spec, size, split="val", images=config.val_images, seed=seed, on_error=on_error)
        # shapes or coco alone: an epoch is a pass over its examples (the config checks the others give one)
        samples = config.samples_per_epoch or next(s.size for s in train if isinstance(s, IndexedSource))
        root = cache_root(config.feature_cache)
        if root is not None:
            train, val = [_cached(s, tower, root, config, processes) for s in train], _cached(val, tower, root,
                                                                                                config, processes)
        return cls(train, [s.ratio for s in specs], val, samples, config, processes)

    def train_loader(self, seed: int, whole: bool = False) -> StreamLoader:
        """This process's stream of training batches (its share of each global batch), one run's;
        `whole`: the whole global batches, as one process reads them (the same on every process)."""
        world, rank = (1, 0) if whole else (self.processes.world, self.processes.rank)
        stream = Stream(self.train, self.ratios, batch_size=self.config.batch_size // world,
                        samples_per_epoch=self.samples_per_epoch, seed=seed, on_error=self.config.on_error,
                        rank=rank, world_size=world)
        return StreamLoader(stream, self.config.workers, pin_memory=self.processes.device.type == "cuda")

    def val_batches(self) -> StreamLoader:
        """One pass over the validation examples, in the same order at every validation (main process)."""
        stream = Stream([self.val], batch_size=self.config.batch_size, seed=self.config.seed,
                        on_error=self.config.on_error, rank=0, world_size=1)
        return StreamLoader(stream, self.config.workers, pin_memory=self.processes.device.type == "cuda")


def model_images(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's images as the model takes them: cached features, or pixels for its tower."""
    if "features" in batch:
        return {"image_features": batch["features"].to(device, non_blocking=True)}
    return {"pixel_values": batch["pixel_values"].to(device, non_blocking=True)}


def steps_per_epoch(loader: StreamLoader, grad_accum: int) -> int:
    return math.ceil(len(loader) / grad_accum)


def optimizer_steps(loader: StreamLoader, grad_accum: int) -> Callable[[int, int], Iterator[list[dict]]]:
    """Run.order of a stream: an epoch's optimizer steps, each `grad_accum` consecutive batches (the
    last may have fewer). The loader knows where it stands (a resumed one continues mid-epoch)."""
    def order(epoch: int, first: int) -> Iterator[list[dict]]:
        at = (loader.epoch + 1, 0) if loader.batches == len(loader) else (loader.epoch, loader.batches)
        if at != (epoch, first * grad_accum):  # the run and its checkpointed stream disagree: a bug
            raise RuntimeError(f"the data stream is at epoch {loader.epoch} batch {loader.batches}, the run at "
                               f"epoch {epoch} step {first}")
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == grad_accum:
                yield group
                group = []
        if group:
            yield group
    return order


def _cached(source: Source, tower: nn.Module, root: Path, config: TransferConfig, processes: Processes) -> Source:
    """The feature-cache source of `source`: the main process writes it (bf16 autocast on a GPU), the
    others wait and read it."""
    device = processes.device
    if processes.main:
        tower.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feature_shards(source, tower, root, num_workers=config.workers, on_error=config.on_error)
    processes.barrier()
    cached = feature_shards(source, tower, root, on_error=config.on_error)
    skipped = json.loads((Path(cached.shards[0]).parent / "index.json").read_text())["skipped"]
    if skipped and processes.main:
        print(f"{source.name}: {sum(skipped.values())} unusable samples left out of the feature cache (per shard: "
              f"{skipped})", file=sys.stderr)
    return cached

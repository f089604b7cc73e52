"""A frozen tower's features of a whole source, written once as webdataset shards and read back as
a source like any other (streamed, split, mixed, resumed), never held whole in memory.

Each cached sample is `NNNNNNNNN.npy` (fp16 (tokens, width)), `.txt` (its caption), `.key.txt`
(the source sample's key) and, when the source gives them, `.prompt.txt` and `.refs.json` (its
prompt and its image's references). Read back, each pass takes a shard's samples in a seeded
order. The shards live under root/<fingerprint>/, the fingerprint covering the tower's config and
weights, the preprocessing and the source, so a changed tower or source never
reads stale features; `index.json` is written last and the folder renamed into place, so a
half-written cache is never read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import webdataset as wds
from torch import nn

from vlfast.data.sources import ShardSource, Source
from vlfast.data.stream import Stream, StreamLoader
from vlfast.models.vision import fingerprint, tower_features


def feature_shards(source: Source, tower: nn.Module, root: str | Path, *, batch_size: int = 64,
                   samples_per_shard: int = 1024, num_workers: int = 0, on_error: str = "skip") -> ShardSource:
    """The feature-cache source of one pass over `source` (its images at the tower's input size),
    computed now when not cached yet, in the tower's dtype on its device (bf16 on a GPU is the
    caller's choice). One process writes it: with several ranks, call it on rank 0 before the others."""
    directory = Path(root) / fingerprint(tower, {"resize": "bicubic", "normalise": "clip", "source": source.name,
                                                  "on_error": on_error})
    if not (directory / "index.json").is_file():
        _write(source, tower, directory, batch_size, samples_per_shard, num_workers, on_error)
    index = json.loads((directory / "index.json").read_text())
    return ShardSource(f"{directory}/{{{0:06d}..{index['shards'] - 1:06d}}}.tar", 0, shuffle=True)


def _write(source: Source, tower: nn.Module, directory: Path, batch_size: int, samples_per_shard: int,
           num_workers: int, on_error: str) -> None:
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    device = next(tower.parameters()).device
    loader = StreamLoader(Stream([source], batch_size=batch_size, on_error=on_error, rank=0, world_size=1),
                          num_workers, pin_memory=device.type == "cuda")
    written = 0
    with wds.ShardWriter(f"{partial}/%06d.tar", maxcount=samples_per_shard, verbose=0) as sink:
        for batch in loader:
            features = tower_features(tower, batch["pixel_values"].to(device, non_blocking=True))
            for row, caption, key, prompt, references in zip(
                    features.to(torch.float16).cpu().numpy(), batch["captions"], batch["keys"], batch["prompts"],
                    batch["references"], strict=True):
                sample = {"__key__": f"{written:09d}", "npy": row, "txt": caption, "key.txt": key}
                sample |= ({"prompt.txt": prompt} if prompt else {}) | ({"refs.json": list(references)}
                                                                       if references else {})
                sink.write(sample)
                written += 1
    if not written:
        raise ValueError(f"{source.name}: no usable sample to compute features of")
    shards = sorted(partial.glob("*.tar"))
    (partial / "index.json").write_text(json.dumps({"source": source.name, "samples": written, "shards": len(shards),
                                                    "skipped": loader.skipped}, indent=1))
    try:
        partial.rename(directory)
    except OSError:  # another process finished first: its cache is as good
        shutil.rmtree(partial)

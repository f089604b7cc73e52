"""A streamed, resumable mixture of sources, read by DataLoader worker processes.

Each (rank, worker) pair is a *slot* that reads its own part of every source (sources.py). A slot
picks the source of its n-th sample from a seeded generator (block n // 4096 of its choices is
seeded by (seed, slot, block), so that resuming does not replay it), and collates batches in the
worker. The DataLoader hands out the workers' batches round-robin; `StreamLoader` records, per
batch consumed, its worker's state after it (sources' positions, choices made, samples skipped), and
the worker next in turn. Resuming from `state_dict()` restarts every worker at its recorded state
and rotates the workers' roles so the round-robin continues where it stopped: the resumed stream is
exactly the rest of the uninterrupted one.

Epochs: with `samples_per_epoch` the sources cycle endlessly and each rank reads
`samples_per_epoch // world_size` samples per epoch, batch b from worker b % workers; the next epoch
continues where this one stopped. Without it, a single source is read once per epoch (pass = epoch),
and ranks and workers read what their shards hold: unequal counts across ranks are the caller's
concern (DDP needs equal step counts; use samples_per_epoch).

Limits: a state resumes only with the same sources, seed, world size, workers and batch size
(load_state_dict checks); samples keep their order within a shard (shards are shuffled per pass,
sources interleave, but there is no sample shuffle buffer, whose contents would have to be saved);
persistent workers are not used, since workers take their start state when an epoch's iterator starts.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from vlfast.data.sources import ErrorCounter, Sample, Source

CHOICE_BLOCK = 4096


def collate_samples(samples: Sequence[Sample]) -> dict:
    """pixel_values (or features, from a feature cache) stacked; the other fields as lists."""
    images = torch.stack([s.image for s in samples])
    return {"pixel_values" if images.dim() == 4 else "features": images, "captions": [s.caption for s in samples],
            "keys": [s.key for s in samples], "prompts": [s.prompt for s in samples],
            "references": [s.references for s in samples]}


def _keep(item):
    return item


class Stream(torch.utils.data.IterableDataset):
    """Batches of a mixture of `sources` drawn with probabilities `ratios`. Iterate it through
    StreamLoader, which tells each worker where to start."""

    def __init__(self, sources: Sequence[Source], ratios: Sequence[float] | None = None, *, batch_size: int,
                 samples_per_epoch: int | None = None, seed: int = 0, on_error: str = "skip",
                 rank: int | None = None, world_size: int | None = None,
                 collate: Callable[[Sequence[Sample]], object] = collate_samples) -> None:
        ratios = list(ratios) if ratios is not None else [1.0] * len(sources)
        if not sources or len(ratios) != len(sources) or min(ratios) <= 0:
            raise ValueError(f"{len(sources)} sources with ratios {ratios}: one positive ratio per source")
        if samples_per_epoch is None and len(sources) > 1:
            raise ValueError("a mixture has no natural end: give samples_per_epoch")
        if batch_size <= 0 or (samples_per_epoch is not None and samples_per_epoch <= 0):
            raise ValueError(f"batch_size and samples_per_epoch must be positive, got {batch_size}, "
                             f"{samples_per_epoch}")
        ErrorCounter(on_error, {})  # checks on_error
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else dist.get_rank() if distributed else 0
        self.world_size = world_size if world_size is not None else dist.get_world_size() if distributed else 1
        self.sources, self.batch_size, self.seed, self.on_error = list(sources), batch_size, seed, on_error
        self.probabilities = np.array(ratios, dtype=np.float64) / sum(ratios)
        self.samples_per_epoch, self.collate = samples_per_epoch, collate
        # Where each worker starts; StreamLoader sets it before each epoch's workers start.
        self.plan: dict = {"epoch": 0, "batches": 0, "rotation": 0, "workers": {}}

    @property
    def rank_samples(self) -> int | None:
        """Samples this rank reads per epoch (None: one pass)."""
        return None if self.samples_per_epoch is None else self.samples_per_epoch // self.world_size

    def initial_state(self, epoch: int) -> dict:
        start = epoch if self.samples_per_epoch is None else 0  # one pass per epoch, or endless from pass 0
        return {"draws": 0, "positions": [[start, 0, 0] for _ in self.sources], "skipped": {}}

    def __iter__(self) -> Iterator[tuple[object, dict]]:
        info = torch.utils.data.get_worker_info()
        workers, plan = info.num_workers if info else 1, self.plan
        worker = ((info.id if info else 0) + plan["rotation"]) % workers
        state = copy.deepcopy(plan["workers"].get(worker) or self.initial_state(plan["epoch"]))
        yield from self._batches(worker, workers, plan["batches"], state)

    def _batch_sizes(self, worker: int, workers: int, consumed: int) -> Iterator[int]:
        if self.rank_samples is None:
            while True:
                yield self.batch_size
        total = math.ceil(self.rank_samples / self.batch_size)
        first = consumed + (worker - consumed) % workers  # the first batch left that is this worker's
        for batch in range(first, total, workers):
            yield min(self.batch_size, self.rank_samples - batch * self.batch_size)

    def _batches(self, worker: int, workers: int, consumed: int, state: dict) -> Iterator[tuple[object, dict]]:
        slot, slots = self.rank * workers + worker, self.world_size * workers
        errors = ErrorCounter(self.on_error, state["skipped"])
        cycle = self.samples_per_epoch is not None
        parts = [source.part(slot, slots, self.seed, position, cycle, errors)
                 for source, position in zip(self.sources, state["positions"], strict=True)]
        choices, block = None, -1
        for size in self._batch_sizes(worker, workers, consumed):
            samples = []
            while len(samples) < size:
                if len(parts) == 1:
                    choice = 0
                else:
                    if state["draws"] // CHOICE_BLOCK != block:
                        block = state["draws"] // CHOICE_BLOCK
                        rng = np.random.default_rng([self.seed, 2, slot, block])
                        choices = rng.choice(len(parts), size=CHOICE_BLOCK, p=self.probabilities)
                    choice = int(choices[state["draws"] % CHOICE_BLOCK])
                try:
                    sample, state["positions"][choice] = next(parts[choice])
                except StopIteration:
                    if cycle:
                        raise ValueError(f"{self.sources[choice].name}: slot {slot} of {slots} has no samples "
                                         f"(fewer usable samples than ranks x workers?)") from None
                    break
                state["draws"] += 1
                samples.append(sample)
            if samples:
                yield self.collate(samples), {"worker": worker, "state": copy.deepcopy(state)}
            if len(samples) < size:
                return


class StreamLoader:
    """Iterating gives one epoch of batches (DataLoader with `num_workers` decoding processes); an
    iteration left early continues where it stopped at the next `iter()`. `state_dict()` after any
    batch, saved with a checkpoint, resumes the stream exactly (`load_state_dict`)."""

    def __init__(self, stream: Stream, num_workers: int = 0, *, pin_memory: bool = False,
                 prefetch_factor: int | None = None) -> None:
        self.stream, self.num_workers = stream, num_workers
        self.options = {"pin_memory": pin_memory} | ({"prefetch_factor": prefetch_factor} if num_workers else {})
        self.epoch, self.batches, self.next_worker, self.workers = 0, 0, 0, {}

    def __len__(self) -> int:
        """Batches per epoch (only with samples_per_epoch)."""
        if self.stream.rank_samples is None:
            raise TypeError("a one-pass stream has no length known in advance")
        return math.ceil(self.stream.rank_samples / self.stream.batch_size)

    @property
    def skipped(self) -> dict[str, int]:
        """Unusable samples per shard in what this rank has consumed so far (all its workers; a sample
        read in several passes counts in each)."""
        total: dict[str, int] = {}
        for state in self.workers.values():
            for shard, count in state["skipped"].items():
                total[shard] = total.get(shard, 0) + count
        return total

    def __iter__(self) -> Iterator[object]:
        if self.stream.rank_samples is not None and self.batches == len(self):
            self._next_epoch()  # its last batch was consumed but the iteration not run to its end
        workers = max(1, self.num_workers)
        self.stream.plan = {"epoch": self.epoch, "batches": self.batches, "rotation": self.next_worker,
                            "workers": self.workers}
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                             collate_fn=_keep, **self.options)
        for batch, meta in loader:
            self.workers[meta["worker"]] = meta["state"]
            self.batches += 1
            self.next_worker = (meta["worker"] + 1) % workers
            yield batch
        self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch, self.batches, self.next_worker = self.epoch + 1, 0, 0
        if self.stream.samples_per_epoch is None:  # the next epoch is the next pass, from its start
            self.workers = {worker: self.stream.initial_state(self.epoch) | {"skipped": state["skipped"]}
                            for worker, state in self.workers.items()}

    def _layout(self) -> dict:
        s = self.stream
        return {"sources": [source.name for source in s.sources], "probabilities": s.probabilities.tolist(),
                "seed": s.seed, "world_size": s.world_size, "num_workers": self.num_workers,
                "batch_size": s.batch_size, "samples_per_epoch": s.samples_per_epoch}

    def state_dict(self) -> dict:
        return {"layout": self._layout(), "epoch": self.epoch, "batches": self.batches,
                "next_worker": self.next_worker, "workers": copy.deepcopy(self.workers)}

    def load_state_dict(self, state: dict) -> None:
        changed = [f"{name} {state['layout'].get(name)!r} -> {value!r}" for name, value in self._layout().items()
                   if state["layout"].get(name) != value]
        if changed:
            raise ValueError(f"the data stream cannot resume: {'; '.join(changed)}")
        self.epoch, self.batches, self.next_worker = state["epoch"], state["batches"], state["next_worker"]
        self.workers = {int(worker): copy.deepcopy(s) for worker, s in state["workers"].items()}


def bench(pattern: str, workers: Sequence[int], *, image_size: int = 224, batch_size: int = 32,
          samples: int = 2048) -> dict[int, float]:
    """Images per second of the loader alone (tar reading, decoding, resizing, collation), per
    number of workers, over `samples` samples after a first batch (worker start-up excluded)."""
    from vlfast.data.sources import ShardSource

    rates = {}
    for count in workers:
        stream = Stream([ShardSource(pattern, image_size)], batch_size=batch_size,
                        samples_per_epoch=samples + batch_size)
        batches = iter(StreamLoader(stream, count))
        next(batches)
        start, seen = time.perf_counter(), 0
        for batch in batches:
            seen += len(batch["captions"])
        rates[count] = seen / (time.perf_counter() - start)
    return rates


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlfast.data.stream", description="streamed data: tools")
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("bench", help="images per second of the loader alone")
    measure.add_argument("pattern", help="shards, e.g. 'DIR/{00000..00007}.tar'")
    measure.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    measure.add_argument("--image-size", type=int, default=224)
    measure.add_argument("--batch-size", type=int, default=32)
    measure.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args(argv)
    rates = bench(args.pattern, args.workers, image_size=args.image_size, batch_size=args.batch_size,
                  samples=args.samples)
    for count, rate in rates.items():
        print(f"workers {count}: {rate:.0f} images/s  (image size {args.image_size}, batch {args.batch_size})")


if __name__ == "__main__":
    main()

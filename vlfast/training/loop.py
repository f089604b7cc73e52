"""One training run, step by step: stages, each with its own optimizer and lr schedule, over a seeded
data order, for the stages' epochs or for a number of optimizer steps; validation at every epoch
end, every `eval_every` steps and at the last step; a checkpoint every `checkpoint_every` steps,
after every validation and when SIGINT or SIGTERM arrives; resumable to the same numbers."""
from __future__ import annotations

import bisect
import itertools
import math
import signal
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from vlfast.training import checkpoint, fsdp
from vlfast.training.distributed import Processes
from vlfast.training.signals import Interrupted, StopSignals

CHECKPOINTS = "checkpoints"
Batches = list[Tensor]  # one optimizer step's global batches of example indices (several with accumulation)


def seed_for(*parts: object) -> int:
    """A seed fixed by its parts, the same in every process and every resumed run."""
    return zlib.crc32(repr(parts).encode())


def epoch_steps(examples: int, batch_size: int, grad_accum: int, world: int, seed: int = 0) -> list[Batches]:
    """One epoch's optimizer steps, each `grad_accum` consecutive global batches of a seeded order
    (the last step may have fewer); a last batch too small to give every process a share is dropped.
    The steps of (batch_size b, grad_accum n) hold the examples of (b * n, 1) in the same order, except
    that with several processes a last batch too small to share can drop a few more examples."""
    order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed)).split(batch_size)
    batches = [rows for rows in order if len(rows) >= world]
    return [batches[start:start + grad_accum] for start in range(0, len(batches), grad_accum)]


@dataclass(frozen=True)
class Stage:
    """A part of a run with its own optimizer: `epochs` passes over the data, or under a step budget
    its share of the budget in proportion to `epochs`."""
    name: str
    epochs: int


def stage_ends(epochs: Sequence[int], steps_per_epoch: int, max_steps: int | None = None) -> list[int]:
    """The step at which each stage ends: after its epochs, or with `max_steps` at
    floor(max_steps x (its epochs and those before it) / all epochs), each stage at least one step."""
    cumulative = list(itertools.accumulate(epochs))
    if max_steps is None:
        return [c * steps_per_epoch for c in cumulative]
    if max_steps < len(epochs):
        raise ValueError(f"max_steps {max_steps}: fewer steps than the run's {len(epochs)} stages")
    ends: list[int] = []
    for i, c in enumerate(cumulative):
        end = max(max_steps * c // cumulative[-1], (ends[-1] if ends else 0) + 1)
        ends.append(min(end, max_steps - (len(epochs) - 1 - i)))
    return ends


def epoch_at(step: int, steps_per_epoch: int) -> int | float:
    """The epochs `step` steps make: a whole number at an epoch's end, else rounded to 3 places."""
    whole, rest = divmod(step, steps_per_epoch)
    return whole if rest == 0 else round(step / steps_per_epoch, 3)


class Stateful(Protocol):
    """A data stream whose position a checkpoint keeps (vlfast.data.stream.StreamLoader)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _gathered(processes: Processes, value: object) -> list:
    """Every process's `value`, in rank order, in every process."""
    if processes.world == 1:
        return [value]
    values = [None] * processes.world
    dist.all_gather_object(values, value)
    return values


@dataclass
class Run:
    """A run's schedule and bookkeeping; what a step and a validation compute is the caller's."""
    name: str
    directory: Path  # checkpoints go to directory/checkpoints
    stages: Sequence[Stage]
    steps_per_epoch: int
    # (epoch, first step) -> that epoch's optimizer steps from `first` on, as each process reads them;
    # a resumed run gets the rest of the epoch it stopped in (from a seeded order, or from `data`).
    order: Callable[[int, int], Iterator]
    weights: dict[str, Tensor]  # what a checkpoint holds and a resume restores: the trained parameters
    # A stage's (optimizer, lr scheduler) over that many steps; it also sets what trains.
    start: Callable[[Stage, int], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]]
    # Forward and backward of one optimizer step: this process's part of each loss term (summed over
    # processes before logging), with "loss" their weighted total.
    step: Callable[[Stage, Batches], dict[str, float]]
    evaluate: Callable[[int, int | float], dict]  # validation scores after (step, epoch), of the main process
    processes: Processes
    signals: StopSignals
    checkpoint_every: int
    eval_every: int | None = None  # validation every N steps too
    max_steps: int | None = None  # the budget in optimizer steps instead of the stages' epochs
    max_grad_norm: float = 0.0  # clip the gradients' norm to this before each step; 0: no clipping
    tensorboard: Path | None = None  # train/<term>, train/lr and val/<score> are logged here
    # Every process calls `evaluate` (else the main one alone): weights sharded over the processes (FSDP)
    # take all of them to gather, and a benchmark's questions are split among them.
    every_process_validates: bool = False
    data: Stateful | None = None  # this process's data stream: each process's position is checkpointed

    def train(self) -> dict:
        """Trains from the start or from the last checkpoint. Returns the history of validations
        (epoch, step, stage, training seconds up to it (wall_s, validation excluded), scores), the
        training seconds and the number of steps."""
        processes = self.processes
        steps_per_epoch = self.steps_per_epoch
        ends = stage_ends([stage.epochs for stage in self.stages], steps_per_epoch, self.max_steps)
        epochs = math.ceil(ends[-1] / steps_per_epoch)
        progress = {"step": 0, "history": [], "wall_s": 0.0}  # a checkpoint adds the RNG and its stage's optimizer
        resumed = {}
        saved = checkpoint.load(self.directory / CHECKPOINTS)
        if saved is not None:
            weights, progress = saved
            with torch.no_grad():
                for name, tensor in self.weights.items():
                    fsdp.load_full(tensor, weights[name])
            checkpoint.set_rng_state(progress.pop("rng"))
            resumed = {k: progress.pop(k) for k in ("stage", "optimizer", "scheduler")}
            positions = progress.pop("data", None)
            if self.data is not None:
                self.data.load_state_dict(positions[processes.rank])
        writer = self._writer(progress["step"] if saved else None)
        stage_index = optimizer = scheduler = order = order_epoch = label = None

        def save() -> None:
            # Sharded tensors are gathered whole (by every process), so that any number of processes resumes.
            weights = {name: fsdp.full(tensor) for name, tensor in self.weights.items()}
            # Before its stage restarts, a resumed run saves the optimizer state it resumed from.
            current = resumed if optimizer is None else {
                "stage": stage_index, "optimizer": fsdp.full_optimizer_state(optimizer.state_dict()),
                "scheduler": scheduler.state_dict()}
            positions = _gathered(processes, self.data.state_dict()) if self.data is not None else None
            if processes.main:
                checkpoint.save(self.directory / CHECKPOINTS, weights, {**progress, "rng": checkpoint.rng_state(),
                                                                         **current, "data": positions})
            processes.barrier()

        start = time.perf_counter()
        with tqdm(total=ends[-1], initial=progress["step"], leave=False, disable=not processes.main) as bar:
            while True:
                step = progress["step"]
                if self._evaluates(step, steps_per_epoch, ends[-1]) and (
                        not progress["history"] or progress["history"][-1]["step"] != step):
                    progress["wall_s"] += time.perf_counter() - start
                    self._validate(step, steps_per_epoch, self.stages[bisect.bisect_right(ends, step - 1)],
                                   progress, writer)
                    save()
                    start = time.perf_counter()
                if step == ends[-1]:
                    break
                epoch, index = divmod(step, steps_per_epoch)
                if bisect.bisect_right(ends, step) != stage_index:
                    stage_index = bisect.bisect_right(ends, step)
                    stage = self.stages[stage_index]
                    first = ends[stage_index - 1] if stage_index else 0
                    optimizer, scheduler = self.start(stage, ends[stage_index] - first)
                    if resumed.get("stage") == stage_index:
                        optimizer.load_state_dict(resumed["optimizer"])
                        fsdp.shard_optimizer_state(optimizer)
                        scheduler.load_state_dict(resumed["scheduler"])
                if epoch != order_epoch:
                    order, order_epoch = self.order(epoch, index), epoch
                description = f"{self.name} {stage.name} epoch {epoch + 1}/{epochs}"
                if description != label:
                    label = description
                    bar.set_description(label)
                terms = self.step(stage, next(order))
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   self.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                *values, stopping = processes.sum([*terms.values(), self.signals.received is not None])
                terms = dict(zip(terms, values, strict=True))
                progress["step"] = step = step + 1
                if writer:
                    for term, value in terms.items():
                        writer.add_scalar(f"train/{term}", value, step)
                    writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                scheduler.step()
                bar.update(1)
                bar.set_postfix({t.removesuffix("_loss"): f"{v:.3f}" for t, v in terms.items() if t != "loss"})
                # A validation point is checkpointed after its validation, at the top of the loop.
                if stopping or (step % self.checkpoint_every == 0
                                and not self._evaluates(step, steps_per_epoch, ends[-1])):
                    progress["wall_s"] += time.perf_counter() - start
                    start = time.perf_counter()
                    save()
                if stopping:
                    raise Interrupted(self.signals.received or signal.SIGTERM, self.name, self.directory / CHECKPOINTS)
        if writer:
            writer.close()
        return {"history": progress["history"], "wall_s": round(progress["wall_s"], 3), "steps": ends[-1]}

    def _evaluates(self, step: int, steps_per_epoch: int, last: int) -> bool:
        """Whether the run validates after `step` steps: at epoch ends, every eval_every, at the end."""
        every = (steps_per_epoch, *([self.eval_every] if self.eval_every else []))
        return step > 0 and (step == last or any(step % n == 0 for n in every))

    def _validate(self, step: int, steps_per_epoch: int, stage: Stage, progress: dict, writer) -> None:
        epoch = epoch_at(step, steps_per_epoch)
        scores = self.evaluate(step, epoch) if self.processes.main or self.every_process_validates else {}
        progress["history"].append({"epoch": epoch, "step": step, "stage": stage.name,
                                    "wall_s": round(progress["wall_s"], 3), **scores})
        if writer:
            for metric, value in scores.items():
                if value is not None:
                    writer.add_scalar(f"val/{metric}", value, step)
            writer.flush()

    def _writer(self, purge_step: int | None):
        """A TensorBoard writer (main process only); on resume, events after the checkpoint are
        purged so that the curves do not double back."""
        if self.tensorboard is None or not self.processes.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.tensorboard), purge_step=purge_step)

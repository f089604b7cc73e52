"""One run of the experiment (the source VPG, the transfer, or the scratch baseline) on the shared
run machinery (vlfast.training): its stages' trainable parameters and learning-rate schedules, its
step (LM loss plus the stage's extra losses on the captions' prompts, over processes and
accumulated batches) and its validation, and the weights it leaves behind."""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from vlfast import training
from vlfast.data.collate import CaptionCollator
from vlfast.models import VPG, VisionLanguageModel
from vlfast.training import StopSignals, fsdp, seed_for
from vlfast.training.distributed import Processes
from vlfast.transfer.config import TransferConfig
from vlfast.transfer.data import TransferData, model_images, optimizer_steps, steps_per_epoch
from vlfast.transfer.evaluate import BenchmarkEval, evaluate

RESULT = "result.json"


class ExtraLoss(Protocol):
    """A loss on the VPG's prompts for a step's captions, added to the LM loss with its weight and
    logged as train/<name>_loss (vlfast.models.pformer.Alignment is one)."""
    name: str
    weight: float

    def __call__(self, prompts: Tensor, captions: list[str], count: float) -> Tensor:
        """The loss of these captions' prompts as their part of the loss over `count` captions."""


@dataclass(frozen=True)
class Stage(training.Stage):
    lr: float
    schedule: str  # constant | cosine (to lr * min_lr_ratio)
    trainable: Callable[[VisionLanguageModel], Iterable[nn.Parameter]]
    losses: tuple[ExtraLoss, ...] = ()


@dataclass
class Context:
    config: TransferConfig
    processes: Processes
    data: TransferData
    collate: CaptionCollator
    output_dir: Path
    signals: StopSignals
    benchmark: BenchmarkEval | None = None  # scored at every validation too


def _optimizer(parameters: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999), weight decay 0.05 except on biases and norms (SPEC.md section 6)."""
    groups = [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def _schedule(stage: Stage, total: int, min_ratio: float) -> Callable[[int], float]:
    if stage.schedule == "constant":
        return lambda step: 1.0
    return lambda step: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * step / total))


def train_run(name: str, model: VisionLanguageModel, stages: list[Stage], context: Context,
              compared: bool = True) -> dict:
    """Trains (or resumes, or reads back) the run; returns its result: the history of validation
    scores with the training seconds (wall_s, evaluation excluded) up to each, the training seconds
    and the steps. A compared run (transfer, scratch) trains for --max-steps if given, else its
    stages' epochs, and validates every --eval-every steps (a quarter epoch by default) as well as
    at epoch ends; the source run trains its epochs and validates at their ends (all scores at its last
    only: its history is not compared)."""
    run_dir = context.output_dir / name
    if (run_dir / RESULT).is_file():  # finished before: the caller loads the weights it needs
        return json.loads((run_dir / RESULT).read_text())
    config, processes, device = context.config, context.processes, context.processes.device
    model.to(device)
    sharded = config.fsdp and processes.world > 1  # one process has nothing to shard: --fsdp does nothing then
    if sharded:  # before the parameters are listed: sharding replaces them
        fsdp.shard(model.llm, model.vpg, processes)
        # Sharded layers gather their weights in collectives that every process must join equally often,
        # while each process's rows fall into their own number of length groups: one LLM call per batch.
        model.length_grouping = False
    trained = {id(p) for stage in stages for p in stage.trainable(model)}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    network = model

    def start(stage: Stage, steps: int):
        nonlocal network
        optimizer, scheduler = _start_stage(model, stage, steps, config.min_lr_ratio)
        network = DistributedDataParallel(model) if processes.world > 1 and not sharded else model
        return optimizer, scheduler

    last_epoch = sum(stage.epochs for stage in stages)

    def scores(step: int, epoch: int | float) -> dict:
        # All scores at a compared run's epoch ends and at the source run's last; the metric alone otherwise.
        epoch_end = isinstance(epoch, int) and (compared or epoch == last_epoch)
        found = {}
        if processes.main or sharded:  # the validation split: on the main process (all gather sharded weights)
            found = evaluate(model, context.data.val_batches(), context.collate, device,
                             None if epoch_end else {config.metric})
        if context.benchmark and (epoch_end or config.metric.startswith(f"{context.benchmark.task.name}/")):
            label = f"epoch-{epoch}" if epoch_end else f"step-{step}"  # its questions split over the processes
            found |= context.benchmark.scores(model, config.batch_size, run_dir / "eval" / label, processes)
        if processes.main and found.get(config.metric) is None:
            raise ValueError(f"--metric {config.metric}: the evaluation gave no such score (it gave "
                             f"{', '.join(k for k, v in found.items() if v is not None)}); a score can be missing "
                             "when --eval-limit leaves out a whole group or Java is absent")
        fsdp.reshard(model)
        model.train()
        return found

    model.train()
    loader = context.data.train_loader(seed_for(config.seed, name))
    epoch_steps = steps_per_epoch(loader, config.grad_accum)
    eval_every = (config.eval_every or max(1, epoch_steps // 4)) if compared else None
    max_steps = config.max_steps if compared else None
    result = training.Run(
        name, run_dir, stages, epoch_steps, optimizer_steps(loader, config.grad_accum),
        {n: p for n, p in sorted(model.named_parameters()) if id(p) in trained}, start,
        lambda stage, batches: _step(model, network, batches, context, autocast, stage.losses), scores,
        processes, context.signals, config.checkpoint_every, eval_every, max_steps, config.max_grad_norm,
        context.output_dir / "tensorboard" / name, sharded or context.benchmark is not None, loader).train()
    skipped = processes.sum([sum(loader.skipped.values())])[0]
    if skipped:  # what the stream dropped (--on-error skip), over all processes
        print(f"{name}: {int(skipped)} unusable samples skipped (per shard, process {processes.rank}: "
              f"{loader.skipped})", file=sys.stderr)
    result["skipped_samples"] = int(skipped)
    model.requires_grad_(False)
    state = fsdp.full_state(model) if sharded else None  # every process gathers; the main one gets it whole
    if processes.main:
        vpg = model.vpg
        if state is not None:  # a whole copy of the sharded VPG
            vpg = VPG(vpg.config)
            vpg.load_state_dict({k.removeprefix("vpg."): v for k, v in state.items() if k.startswith("vpg.")})
        vpg.save_pretrained(run_dir / "vpg")  # what a later run transfers
        # Everything trained, MemVP / MMA included: vlfast.generate, export.
        model.save_pretrained(run_dir / "model", state=state)
        (run_dir / RESULT).write_text(json.dumps(result, indent=1))
    processes.barrier()
    return result


def _start_stage(model: VisionLanguageModel, stage: Stage, steps: int, min_lr_ratio: float):
    """Only the stage's parameters train: its optimizer and lr schedule over `steps`."""
    model.requires_grad_(False)
    parameters = list(stage.trainable(model))
    for p in parameters:
        p.requires_grad_(True)
    optimizer = _optimizer(parameters, stage.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(stage, steps, min_lr_ratio))


def _step(model: VisionLanguageModel, network: nn.Module, batches: list[dict], context: Context, autocast,
          losses: Sequence[ExtraLoss]) -> dict[str, float]:
    """Forward and backward of this process's share of one optimizer step's global batches (more
    than one with gradient accumulation; each process streams its own share). The loss is
    normalised by the labelled tokens of all of them over all processes, so any number of
    processes and any split into accumulated batches give the gradient of one batch (DDP and FSDP
    average over processes, hence the factor `world`; they synchronise after the last batch only).
    The extra losses on the captions (examples without a prompt) join it, normalised over all
    captions. Returns this process's parts of the step's LM loss, each extra loss and their weighted
    total (over processes they sum to the step's)."""
    processes = context.processes
    tokenized = [context.collate.tokenize(batch["captions"], batch["prompts"]) for batch in batches]
    captions = [[i for i, prompt in enumerate(batch["prompts"]) if not prompt] for batch in batches]
    tokens, caption_count = processes.sum([sum(model.labelled_tokens(t["labels"]) for t in tokenized),
                                           sum(len(c) for c in captions)])
    totals = dict.fromkeys(["lm_loss", *(f"{loss.name}_loss" for loss in losses)], 0.0)
    for k, (share, batch, mine) in enumerate(zip(batches, tokenized, captions, strict=True)):
        batch = {key: value.to(processes.device) for key, value in batch.items()}
        last = k == len(batches) - 1
        accumulating = network.no_sync if isinstance(network, DistributedDataParallel) else partial(fsdp.no_sync, model)
        with nullcontext() if last or processes.world == 1 else accumulating():
            with autocast:
                lm, prompts = network(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      **model_images(share, processes.device), num_items_in_batch=tokens,
                                      return_prompts=True)
            extra = [loss(prompts[mine], [share["captions"][i] for i in mine], caption_count) if mine
                     else torch.zeros((), device=processes.device) for loss in losses]
            total = lm
            for loss, value in zip(losses, extra, strict=True):
                total = total + loss.weight * value
            (total * processes.world).backward()
        totals["lm_loss"] += lm.item()
        for loss, value in zip(losses, extra, strict=True):
            totals[f"{loss.name}_loss"] += value.item()
    return totals | {"loss": totals["lm_loss"] + sum(loss.weight * totals[f"{loss.name}_loss"] for loss in losses)}

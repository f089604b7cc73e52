"""The training loop of one run (the source VPG, the transfer, or the scratch baseline): a list of
stages, each with its own trainable parameters and learning-rate schedule, evaluated after every
epoch, checkpointed every N steps, at every epoch end and when SIGINT or SIGTERM arrives, and
resumable to the same numbers."""
from __future__ import annotations

import json
import math
import signal
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vlfast.data.collate import CaptionCollator
from vlfast.models import VisionLanguageModel
from vlfast.pformer.model import PFormer, alignment_loss, caption_ids
from vlfast.transfer import checkpoint
from vlfast.transfer.config import TransferConfig
from vlfast.transfer.data import Split
from vlfast.transfer.distributed import Processes
from vlfast.transfer.evaluate import BenchmarkEval, evaluate

RESULT = "result.json"


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    lr: float
    schedule: str  # constant | cosine (to lr * min_lr_ratio)
    trainable: Callable[[VisionLanguageModel], Iterable[nn.Parameter]]
    align_weight: float = 0.0  # weight of the P-Former alignment loss (when the context has a P-Former)


class Interrupted(Exception):
    def __init__(self, signum: int, run: str, checkpoint_dir: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} during the {run} run: checkpoint written to {checkpoint_dir}")
        self.signum = signum


class StopSignals:
    """Turns SIGINT and SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __enter__(self) -> StopSignals:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@dataclass
class Context:
    config: TransferConfig
    processes: Processes
    train: Split
    val: Split
    collate: CaptionCollator
    output_dir: Path
    signals: StopSignals
    pformer: PFormer | None = None  # frozen; gives reference prompts for the captions
    benchmark: BenchmarkEval | None = None  # scored after every epoch too


def seed_for(*parts: object) -> int:
    """A seed fixed by its parts, the same in every process and every resumed run."""
    return zlib.crc32(repr(parts).encode())


def _optimizer(parameters: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999), weight decay 0.05 except on biases and norms (SPEC.md section 6)."""
    groups = [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def _schedule(stage: Stage, total: int, min_ratio: float) -> Callable[[int], float]:
    if stage.schedule == "constant":
        return lambda step: 1.0
    return lambda step: min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * step / total))


def train_run(name: str, model: VisionLanguageModel, stages: list[Stage], context: Context) -> dict:
    """Trains (or resumes, or reads back) the run; returns its result: per-epoch history of the
    validation scores with the training seconds (wall_s, evaluation excluded) up to each epoch."""
    run_dir = context.output_dir / name
    if (run_dir / RESULT).is_file():  # finished before: the caller loads the weights it needs
        return json.loads((run_dir / RESULT).read_text())
    config, processes, device = context.config, context.processes, context.processes.device
    model.to(device)
    by_name = dict(model.named_parameters())
    trained = {id(p) for stage in stages for p in stage.trainable(model)}
    trainable_names = sorted(n for n, p in by_name.items() if id(p) in trained)
    plan = [index for index, stage in enumerate(stages) for _ in range(stage.epochs)]  # each epoch's stage
    steps_per_epoch = len(_steps(len(context.train.examples), config.batch_size, config.grad_accum, processes.world))
    # Progress: epochs done and steps into the next; a checkpoint adds the RNG and its stage's optimizer.
    progress = {"epoch": 0, "step": 0, "history": [], "wall_s": 0.0}
    resumed = {}
    saved = checkpoint.load(run_dir / "checkpoints")
    if saved is not None:
        weights, progress = saved
        model.load_state_dict(weights, strict=False)
        checkpoint.set_rng_state(progress.pop("rng"))
        resumed = {k: progress.pop(k) for k in ("stage", "optimizer", "scheduler")}
    writer = _writer(context, name, progress["epoch"] * steps_per_epoch + progress["step"] if saved else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stage_index = optimizer = scheduler = network = None

    def save() -> None:
        if processes.main:
            state = {**progress, "rng": checkpoint.rng_state(), "stage": stage_index,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            checkpoint.save(run_dir / "checkpoints", {n: by_name[n] for n in trainable_names}, state)
        processes.barrier()

    while progress["epoch"] < len(plan):
        epoch = progress["epoch"]
        if plan[epoch] != stage_index:
            stage_index, stage = plan[epoch], stages[plan[epoch]]
            optimizer, scheduler = _start_stage(model, stage, stage.epochs * steps_per_epoch, config.min_lr_ratio)
            if resumed.get("stage") == stage_index:
                optimizer.load_state_dict(resumed["optimizer"])
                scheduler.load_state_dict(resumed["scheduler"])
            network = DistributedDataParallel(model) if processes.world > 1 else model
        model.train()
        order = _steps(len(context.train.examples), config.batch_size, config.grad_accum, processes.world,
                       seed_for(config.seed, name, epoch))
        bar = tqdm(total=steps_per_epoch, initial=progress["step"], leave=False, disable=not processes.main,
                   desc=f"{name} {stage.name} epoch {epoch + 1}/{len(plan)}")
        start = time.perf_counter()
        aligned = context.pformer is not None and stage.align_weight > 0
        for batches in order[progress["step"]:]:
            lm, align = _step(model, network, batches, context, processes, autocast,
                              stage.align_weight if aligned else 0.0)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lm, align, stopping = processes.sum([lm, align, context.signals.received is not None])
            progress["step"] += 1
            step = epoch * steps_per_epoch + progress["step"]
            terms = {"lm_loss": lm, "align_loss": align} if aligned else {"lm_loss": lm}
            if writer:
                for term, value in terms.items():
                    writer.add_scalar(f"train/{term}", value, step)
                writer.add_scalar("train/loss", lm + stage.align_weight * align, step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            scheduler.step()
            bar.update(1)
            bar.set_postfix({term.removesuffix("_loss"): f"{value:.3f}" for term, value in terms.items()})
            if stopping or step % config.checkpoint_every == 0:
                progress["wall_s"] += time.perf_counter() - start
                start = time.perf_counter()
                save()
            if stopping:
                raise Interrupted(context.signals.received or signal.SIGTERM, name, run_dir / "checkpoints")
        bar.close()
        progress["wall_s"] += time.perf_counter() - start
        scores = {}
        if processes.main:
            scores = evaluate(model, context.val, context.collate, config.batch_size, device)
            if context.benchmark:
                scores |= context.benchmark.scores(model, config.batch_size, run_dir / "eval" / f"epoch-{epoch + 1}")
            if scores.get(config.metric) is None:
                raise ValueError(f"--metric {config.metric}: the evaluation gave no such score (it gave "
                                 f"{', '.join(k for k, v in scores.items() if v is not None)}); a score can be missing "
                                 "when --eval-limit leaves out a whole group or Java is absent")
        progress["history"].append({"epoch": epoch + 1, "stage": stage.name, "wall_s": round(progress["wall_s"], 3),
                                    **scores})
        if writer:
            for metric, value in scores.items():
                if value is not None:
                    writer.add_scalar(f"val/{metric}", value, (epoch + 1) * steps_per_epoch)
            writer.flush()
        progress["epoch"], progress["step"] = epoch + 1, 0
        save()
    model.requires_grad_(False)
    result = {"history": progress["history"], "wall_s": round(progress["wall_s"], 3),
              "steps": len(plan) * steps_per_epoch}
    if processes.main:
        model.vpg.save_pretrained(run_dir / "vpg")  # what a later run transfers
        model.save_pretrained(run_dir / "model")  # everything trained, MemVP / MMA included: vlfast.generate, export
        (run_dir / RESULT).write_text(json.dumps(result, indent=1))
    processes.barrier()
    if writer:
        writer.close()
    return result


def _start_stage(model: VisionLanguageModel, stage: Stage, steps: int, min_lr_ratio: float):
    """Only the stage's parameters train: its optimizer and lr schedule over `steps`."""
    model.requires_grad_(False)
    parameters = list(stage.trainable(model))
    for p in parameters:
        p.requires_grad_(True)
    optimizer = _optimizer(parameters, stage.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(stage, steps, min_lr_ratio))


def _steps(examples: int, batch_size: int, grad_accum: int, world: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """One epoch's optimizer steps, each `grad_accum` consecutive global batches of a seeded order
    (the last step may have fewer); a last batch too small to give every process a share is dropped.
    The steps of (batch_size b, grad_accum n) hold the examples of (b * n, 1) in the same order, except
    that with several processes a last batch too small to share can drop a few more examples."""
    order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed)).split(batch_size)
    batches = [rows for rows in order if len(rows) >= world]
    return [batches[start:start + grad_accum] for start in range(0, len(batches), grad_accum)]


def _step(model: VisionLanguageModel, network: nn.Module, batches: list[torch.Tensor], context: Context,
          processes: Processes, autocast, align_weight: float) -> tuple[float, float]:
    """Forward and backward of this process's share of one optimizer step's global batches (more
    than one with gradient accumulation). The loss is normalised by the labelled tokens of all of
    them over all processes, so any number of processes and any split into accumulated batches give
    the gradient of one batch (DDP averages over processes, hence the factor `world`; it
    synchronises after the last batch only). With align_weight > 0, the P-Former alignment loss on
    the captions (examples without a prompt) joins it, normalised over all captions. Returns this
    process's parts of the step's LM loss and alignment loss (over processes they sum to the step's)."""
    shares = [[context.train.examples[i] for i in rows[processes.rank::processes.world].tolist()] for rows in batches]
    tokenized = [context.collate.tokenize([e.target for e in share], [e.prompt for e in share]) for share in shares]
    captions = [[i for i, e in enumerate(share) if not e.prompt] for share in shares]
    tokens, caption_count = processes.sum([sum(model.labelled_tokens(t["labels"]) for t in tokenized),
                                           sum(len(c) for c in captions)])
    lm_total = align_total = 0.0
    for k, (share, batch, mine) in enumerate(zip(shares, tokenized, captions, strict=True)):
        batch = {key: value.to(processes.device) for key, value in batch.items()}
        features = context.train.features[torch.tensor([e.image for e in share])].to(processes.device)
        last = k == len(shares) - 1
        with nullcontext() if last or processes.world == 1 else network.no_sync():
            with autocast:
                lm, prompts = network(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      image_features=features, num_items_in_batch=tokens, return_prompts=True)
            align = torch.zeros((), device=processes.device)
            if align_weight > 0 and mine:
                ids, mask = caption_ids(context.collate.tokenizer, [share[i].target for i in mine],
                                        context.pformer.config.max_length)
                with torch.no_grad():
                    reference = context.pformer(ids.to(processes.device), mask.to(processes.device))
                align = alignment_loss(prompts[mine], reference, caption_count * reference[0].numel())
            ((lm + align_weight * align) * processes.world).backward()
        lm_total += lm.item()
        align_total += align.item()
    return lm_total, align_total


def _writer(context: Context, name: str, purge_step: int | None):
    """A TensorBoard writer for the run (main process only); on resume, events after the checkpoint
    are purged so the curves do not double back."""
    if not context.processes.main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(context.output_dir / "tensorboard" / name), purge_step=purge_step)

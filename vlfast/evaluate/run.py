"""Generating a model's answers for a benchmark (batched, images decoded by DataLoader workers, one
shard per process under torchrun, gathered), and the scores and files of an evaluation."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vlfast.data.coco import image_to_tensor
from vlfast.data.collate import CaptionCollator
from vlfast.evaluate.common import Benchmark, Sample, check_coverage
from vlfast.evaluate.tasks import Task, numeric_scores
from vlfast.models import VisionLanguageModel


@dataclass(frozen=True)
class Generation:
    prompt: str
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    length_penalty: float | None  # None: -1 for an encoder-decoder LLM, 0 for a causal one (LAVIS's BLIP-2)
    repetition_penalty: float

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min-new-tokens must be 0 to max-new-tokens ({self.max_new_tokens}), got "
                             f"{self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition-penalty must be positive, got {self.repetition_penalty}")

    @classmethod
    def for_task(cls, task: Task, **overrides) -> Generation:
        """The task's settings, with the overrides that are not None."""
        return cls(**({"prompt": task.prompt, **task.generation}
                      | {k: v for k, v in overrides.items() if v is not None}))

    def generate_kwargs(self, encoder_decoder: bool) -> dict:
        penalty = self.length_penalty if self.length_penalty is not None else (-1.0 if encoder_decoder else 0.0)
        return {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                "min_new_tokens": self.min_new_tokens, "length_penalty": penalty,
                "repetition_penalty": self.repetition_penalty, "do_sample": False}


def prompt_text(template: str, sample: Sample) -> str:
    """The template filled with the sample's fields ('{}' is the question)."""
    positional = [sample.fields["question"]] if "question" in sample.fields else []
    try:
        return template.format(*positional, **sample.fields)
    except (KeyError, IndexError) as error:
        fields = ", ".join("{" + name + "}" for name in sample.fields) or "none"
        raise ValueError(f"--prompt {template!r}: this task's prompts can use {fields} ('{{}}' is the question), "
                         f"not {error}") from error


def check_prompt(template: str, samples: list[Sample]) -> None:
    """Every sample's prompt can be made (before any model loads)."""
    for sample in samples:
        prompt_text(template, sample)


class _Pixels(torch.utils.data.Dataset):
    """A sample's image, resized and normalised as the model trains on; a blank image (zeros, as
    LaVIN feeds text-only questions) where it has none."""

    def __init__(self, samples: list[Sample], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.samples[index].image
        if path is None:
            return torch.zeros(3, self.size, self.size)
        try:
            with Image.open(path) as image:
                return image_to_tensor(image, self.size)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path}: not an image PIL can read ({error})") from error


def same_length_batches(prefixes: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `prefixes` in batches of at most batch_size whose prefixes have one length, so that
    generation needs no padding."""
    order = sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    return [group[start:start + batch_size]
            for _, same in groupby(order, key=lambda i: len(prefixes[i])) for group in [list(same)]
            for start in range(0, len(group), batch_size)]


@torch.no_grad()
def predict(model: VisionLanguageModel, samples: list[Sample], generation: Generation, *, batch_size: int = 16,
            workers: int = 0, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Each sample's generated text (the prompt not part of it). Under torchrun every process takes
    every world-th sample and all get the gathered answers. Prompts of one length are batched
    together, so no batch needs padding."""
    if model.vision_tower is None:
        raise ValueError("this model has no vision tower: it cannot read images")
    collate = CaptionCollator.for_llm(model.tokenizer, model.llm)
    mine = samples[rank::world]
    prefixes = [collate.prefix_ids(prompt_text(generation.prompt, s)) for s in mine]
    if any(not prefix for prefix in prefixes):
        raise ValueError("an empty prompt and a tokenizer without a bos token: give the model a --prompt")
    batches = same_length_batches(prefixes, batch_size)
    loader = torch.utils.data.DataLoader(_Pixels(mine, model.vision_tower.config.image_size), batch_sampler=batches,
                                         num_workers=workers)
    device = next(model.vpg.parameters()).device
    kwargs = generation.generate_kwargs(collate.encoder_decoder)
    tokenizer = model.tokenizer
    answers = {}
    model.eval()
    with tqdm(total=len(mine), desc="generating", disable=not progress or rank != 0, leave=False) as bar:
        for batch, pixels in zip(batches, loader, strict=True):
            ids = torch.tensor([prefixes[i] for i in batch], device=device)
            out = model.generate(ids, pixel_values=pixels.to(device), eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **kwargs)
            for i, row in zip(batch, out.tolist(), strict=True):
                answers[mine[i].id] = collate.decode(row)
            bar.update(len(batch))
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, answers)
        answers = {k: v for shard in shards for k, v in shard.items()}
    return answers


def score(task: Task, benchmark: Benchmark, predictions: dict, source: str, rule: str | None = None) -> dict:
    """The task's scores of predictions that cover the benchmark's samples exactly."""
    check_coverage(predictions, [s.id for s in benchmark.samples], source)
    if benchmark.references is None:
        return {"unavailable": "this split has no answers here: its predictions file is for the benchmark's server"}
    if rule is not None and rule not in task.rules:
        raise ValueError(f"rule {rule!r} does not apply to {task.name} (it has {task.rules or 'one rule'})")
    return task.score(benchmark, predictions, **({"rule": rule} if rule else {}))


def write_results(output_dir: Path, task: Task, split: str, predictions: dict, scores: dict, details: dict) -> Path:
    """The predictions in the benchmark's format, scores.json (scores and how they were made) and
    scores.md; returns the predictions file."""
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions_file = output_dir / task.predictions_file.format(split=split)
    task.write(predictions, predictions_file)
    (output_dir / "scores.json").write_text(json.dumps({"task": task.name, "split": split, **details,
                                                        "predictions": predictions_file.name, "scores": scores},
                                                       indent=1, default=str))
    (output_dir / "scores.md").write_text(markdown(task, split, scores, details))
    return predictions_file


def markdown(task: Task, split: str, scores: dict, details: dict) -> str:
    numbers = numeric_scores(scores)
    lines = [f"# {task.title}, {split} split", "", *(f"- {k}: {v}" for k, v in details.items() if v is not None), "",
             "| score | value |", "| --- | --- |", *(f"| {k} | {v:.4f} |" for k, v in numbers.items())]
    notes = {k: v for k, v in scores.items() if isinstance(v, str)}
    notes |= {f"{k} unavailable": v for k, v in scores.get("unavailable", {}).items()} \
        if isinstance(scores.get("unavailable"), dict) else {}
    lines += ["", *(f"- {k}: {v}" for k, v in notes.items())]
    return "\n".join(lines) + "\n"


def evaluate_model(model: VisionLanguageModel, task: Task, benchmark: Benchmark, generation: Generation, *,
                   batch_size: int = 16, workers: int = 0, rule: str | None = None, rank: int = 0, world: int = 1,
                   progress: bool = True) -> tuple[dict, dict, float]:
    """(predictions, scores, generation seconds); every process gets the same."""
    start = time.perf_counter()
    predictions = predict(model, benchmark.samples, generation, batch_size=batch_size, workers=workers, rank=rank,
                          world=world, progress=progress)
    seconds = time.perf_counter() - start
    return predictions, score(task, benchmark, predictions, "the generated answers", rule), seconds


def generation_details(generation: Generation) -> dict:
    return {f"generation.{k}": v for k, v in asdict(generation).items()}

"""Validation scores of a vision-language model: LM loss, caption quality (CIDEr-D) and
question-answering accuracy on the run's own validation split, and optionally a benchmark's scores
(`--eval-task`) computed by `python -m vlfast.evaluate`'s code.

CIDEr-D comes from pycocoevalcap (the COCO caption evaluation code). Its PTB tokenizer needs Java,
so texts are tokenised here instead: lower case, punctuation split off, which is what the PTB
tokenizer does to plain English captions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

from vlfast.data.collate import CaptionCollator
from vlfast.evaluate.common import Benchmark
from vlfast.evaluate.run import Generation, check_prompt, evaluate_model, generation_details, write_results
from vlfast.evaluate.tasks import Task, get_task, load_benchmark, numeric_scores
from vlfast.models import VisionLanguageModel
from vlfast.transfer.data import Example, Split

MAX_CAPTION_TOKENS = 32
MAX_ANSWER_TOKENS = 3


def tokenize_for_cider(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))


def cider(references: list[list[str]], candidates: list[str]) -> float:
    """Corpus CIDEr-D (x10, as COCO reports it) of one candidate per image against its references."""
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference lists for {len(candidates)} candidates")
    gts = {i: [tokenize_for_cider(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_for_cider(c)] for i, c in enumerate(candidates)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def batches(examples: list[Example], batch_size: int):
    for start in range(0, len(examples), batch_size):
        yield examples[start:start + batch_size]


@torch.no_grad()
def lm_loss(model: VisionLanguageModel, split: Split, collate: CaptionCollator, batch_size: int,
            device: torch.device) -> float:
    """Mean LM loss per labelled token over the split's examples."""
    total = tokens = 0.0
    for part in batches(split.examples, batch_size):
        batch = collate.tokenize([e.target for e in part], [e.prompt for e in part])
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = torch.tensor([e.image for e in part])
        total += model(batch["input_ids"], batch["attention_mask"], batch["labels"], num_items_in_batch=1,
                       image_features=split.features[rows].to(device)).item()
        tokens += model.labelled_tokens(batch["labels"])
    return total / tokens


@torch.no_grad()
def generate(model: VisionLanguageModel, split: Split, prompts: list[Example], collate: CaptionCollator,
             max_new_tokens: int, batch_size: int, device: torch.device) -> list[str]:
    """Greedy continuations of each example's prompt given its image. Prompts of one length go
    together, so no batch needs padding."""
    tokenizer = collate.tokenizer
    encoded = [torch.tensor(collate.prefix_ids(e.prompt)) for e in prompts]
    texts: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for _, same_length in groupby(order, key=lambda i: len(encoded[i])):
        indices = list(same_length)
        for start in range(0, len(indices), batch_size):
            part = indices[start:start + batch_size]
            input_ids = torch.stack([encoded[i] for i in part]).to(device)
            rows = torch.tensor([prompts[i].image for i in part])
            new = model.generate(input_ids, image_features=split.features[rows].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for i, ids in zip(part, new.tolist(), strict=True):
                texts[i] = collate.decode(ids)
    return texts


def evaluate(model: VisionLanguageModel, split: Split, collate: CaptionCollator, batch_size: int,
             device: torch.device) -> dict[str, float | None]:
    """val_loss, cider (greedy captions) and qa_accuracy (the answer's first word, exact match;
    None without questions)."""
    model.eval()
    images = [Example(i, "", "") for i in range(len(split.references))]
    captions = generate(model, split, images, collate, MAX_CAPTION_TOKENS, batch_size, device)
    scores = {"val_loss": lm_loss(model, split, collate, batch_size, device),
              "cider": cider(split.references, captions), "qa_accuracy": None}
    questions = split.questions
    if questions:
        answers = generate(model, split, questions, collate, MAX_ANSWER_TOKENS, batch_size, device)
        hits = [(a.split() or [""])[0] == q.target for a, q in zip(answers, questions, strict=True)]
        scores["qa_accuracy"] = sum(hits) / len(hits)
    return scores


@dataclass(frozen=True)
class BenchmarkEval:
    """--eval-task on --eval-data: read (and checked) before training, scored after every epoch."""
    task: Task
    split: str
    benchmark: Benchmark
    generation: Generation

    @classmethod
    def load(cls, task: str, data: str, prompt: str | None, limit: int | None) -> BenchmarkEval:
        chosen = get_task(task)
        split, benchmark = load_benchmark(chosen, data, limit=limit)
        generation = Generation.for_task(chosen, prompt=prompt)
        check_prompt(generation.prompt, benchmark.samples)
        return cls(chosen, split, benchmark, generation)

    def scores(self, model: VisionLanguageModel, batch_size: int, output_dir: Path) -> dict[str, float]:
        """The task's scores as <task>/<score>; the predictions and scores are kept in output_dir."""
        predictions, scores, seconds = evaluate_model(model, self.task, self.benchmark, self.generation,
                                                      batch_size=batch_size, progress=False)
        write_results(output_dir, self.task, self.split, predictions, scores,
                      {"generation_s": round(seconds, 1), **generation_details(self.generation)})
        return {f"{self.task.name}/{name}": value for name, value in numeric_scores(scores).items()
                if name in self.task.metrics}

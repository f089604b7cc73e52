"""Validation scores of a vision-language model: LM loss, caption quality (CIDEr-D) and
question-answering accuracy on the run's own validation split, and optionally a benchmark's scores
(`--eval-task`) computed by `python -m vlfast.evaluate`'s code.

CIDEr-D comes from pycocoevalcap (the COCO caption evaluation code). Its PTB tokenizer needs Java,
so texts are tokenised here instead: lower case, punctuation split off, which is what the PTB
tokenizer does to plain English captions.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlfast.data.collate import CaptionCollator
from vlfast.evaluate.common import Benchmark
from vlfast.evaluate.run import (
    Generation,
    check_prompt,
    evaluate_model,
    generation_details,
    prompt_text,
    same_length_batches,
    write_results,
)
from vlfast.evaluate.tasks import Task, get_task, load_benchmark, numeric_scores
from vlfast.models import VisionLanguageModel
from vlfast.training.distributed import Processes
from vlfast.transfer.data import model_images

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


@torch.no_grad()
def generate(model: VisionLanguageModel, images: dict[str, torch.Tensor], prompts: list[str],
             collate: CaptionCollator, max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy continuations of each prompt given its image (row of `images`). Prompts of one length
    go together, so no batch needs padding."""
    tokenizer = collate.tokenizer
    encoded = [collate.prefix_ids(prompt) for prompt in prompts]
    texts: list[str] = [""] * len(prompts)
    for part in same_length_batches(encoded, len(prompts)):
        new = model.generate(torch.tensor([encoded[i] for i in part], device=device),
                             **{name: value[part] for name, value in images.items()},
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for i, ids in zip(part, new.tolist(), strict=True):
            texts[i] = collate.decode(ids)
    return texts


@torch.no_grad()
def evaluate(model: VisionLanguageModel, batches: Iterable[dict], collate: CaptionCollator,
             device: torch.device, only: set[str] | None = None) -> dict[str, float | None]:
    """val_loss (mean LM loss per labelled token over the examples), cider (a greedy caption of each
    image against its references: those its examples carry, else every caption of it seen) and
    qa_accuracy (the answer's first word, exact match; None without questions), in one pass; with
    `only`, the scores not named there are None and their generation is skipped."""
    captioning, answering = only is None or "cider" in only, only is None or "qa_accuracy" in only
    model.eval()
    total = tokens = 0.0
    references: dict[str, list[str]] = {}
    candidates: dict[str, str] = {}
    hits: list[bool] = []
    for batch in batches:
        pictures = model_images(batch, device)
        tokenized = {k: v.to(device) for k, v in collate.tokenize(batch["captions"], batch["prompts"]).items()}
        total += model(tokenized["input_ids"], tokenized["attention_mask"], tokenized["labels"], num_items_in_batch=1,
                       **pictures).item()
        tokens += model.labelled_tokens(tokenized["labels"])
        rows = zip(batch["keys"], batch["prompts"], batch["captions"], batch["references"], strict=True)
        first = {}  # the first caption example of each image not captioned yet
        for i, (key, prompt, caption, given) in enumerate(rows):
            if not prompt:
                references[key] = list(given) or [*references.get(key, []), caption]
                if key not in candidates and key not in first:
                    first[key] = i
        if first and captioning:
            chosen = list(first.values())
            texts = generate(model, {n: v[chosen] for n, v in pictures.items()}, [""] * len(chosen), collate,
                             MAX_CAPTION_TOKENS, device)
            candidates |= dict(zip(first, texts, strict=True))
        questions = [i for i, prompt in enumerate(batch["prompts"]) if prompt and answering]
        if questions:
            answers = generate(model, {n: v[questions] for n, v in pictures.items()},
                               [batch["prompts"][i] for i in questions], collate, MAX_ANSWER_TOKENS, device)
            hits += [(a.split() or [""])[0] == batch["captions"][i] for a, i in zip(answers, questions, strict=True)]
    keys = list(candidates)
    return {"val_loss": total / tokens,
            "cider": cider([references[k] for k in keys], [candidates[k] for k in keys]) if captioning else None,
            "qa_accuracy": sum(hits) / len(hits) if hits else None}


@dataclass(frozen=True)
class BenchmarkEval:
    """--eval-task on --eval-data: read (and checked) before training, scored after every epoch."""
    task: Task
    split: str
    benchmark: Benchmark
    generation: Generation

    @classmethod
    def load(cls, task: str, data: str, prompt: str | None, limit: int | None) -> BenchmarkEval:
        """Its errors name the transfer's options (--eval-data, --eval-prompt), not the evaluate CLI's."""
        chosen = get_task(task)
        try:
            split, benchmark = load_benchmark(chosen, data, limit=limit)
            generation = Generation.for_task(chosen, prompt=prompt)
            check_prompt(generation.prompt, benchmark.samples)
        except (ValueError, FileNotFoundError) as error:
            message = re.sub(r"(?<![\w-])--(data|prompt)\b", r"--eval-\1", str(error))
            raise type(error)(message.replace("(--image-dir says where they are)",
                                              "(read from --eval-data's layout)")) from None
        return cls(chosen, split, benchmark, generation)

    def check_llm(self, llm: torch.nn.Module, tokenizer, option: str) -> None:
        """The prompt gives this LLM a token to start generating from (checked before training; the
        benchmark's own check comes at its first scoring)."""
        collate = CaptionCollator.for_llm(tokenizer, llm)
        if not collate.prefix_ids(prompt_text(self.generation.prompt, self.benchmark.samples[0])):
            raise ValueError(f"--eval-prompt {self.generation.prompt!r}: an empty prompt, and the tokenizer of "
                             f"{option} has no bos token to start generating from: give a prompt")

    def scores(self, model: VisionLanguageModel, batch_size: int, output_dir: Path,
               processes: Processes) -> dict[str, float]:
        """The task's scores as <task>/<score>, every process answering its share of the questions;
        the main process keeps the predictions and scores in output_dir."""
        model.eval()
        predictions, scores, seconds = evaluate_model(model, self.task, self.benchmark, self.generation,
                                                      batch_size=batch_size, rank=processes.rank,
                                                      world=processes.world, progress=False)
        if processes.main:
            write_results(output_dir, self.task, self.split, predictions, scores,
                          {"processes": processes.world, "generation_s": round(seconds, 1),
                           **generation_details(self.generation)})
        return {f"{self.task.name}/{name}": value for name, value in numeric_scores(scores).items()
                if name in self.task.metrics}

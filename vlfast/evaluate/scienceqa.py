"""ScienceQA as LaVIN and MemVP evaluate it (REFERENCE.md 3.7): `problems.json`, `pid_splits.json`,
images at `images/{split}/{pid}/image.png`; the prompt in LaVIN's QCM format; multiple-choice
accuracy overall, on the image questions, and LaVIN's breakdown.

The answer is read from the generated text: the one option whose text it equals (after the VQA
normalisation: models that answer in words; "A square" is the option "square", not the letter A),
else "The answer is X" or a leading option letter (MemVP's and LaVIN's rule; a letter past the last
option counts wrong); anything else counts wrong (MemVP's rule; LaVIN guesses at random instead).
How many were read each way is reported.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from vlfast.evaluate.common import Benchmark, Sample, load_json, require
from vlfast.evaluate.vqa_metric import normalize_answer

LETTERS = "ABCDE"
PROMPT = "Question: {question}\nContext: {context}\nOptions: {options}\nResponse: The answer is"
GROUPS = {  # LaVIN's columns: name -> which problems
    "NAT": lambda p: p.get("subject") == "natural science",
    "SOC": lambda p: p.get("subject") == "social science",
    "LAN": lambda p: p.get("subject") == "language science",
    "TXT": lambda p: bool(p.get("hint")),
    "IMG": lambda p: bool(p.get("image")),
    "NO": lambda p: not p.get("hint") and not p.get("image"),
    "G1-6": lambda p: p.get("grade") in {f"grade{g}" for g in range(1, 7)},
    "G7-12": lambda p: p.get("grade") in {f"grade{g}" for g in range(7, 13)},
}


def _collapse(text: str) -> str:
    return text.replace("  ", " ").strip()  # LaVIN collapses double spaces in its input


def load_scienceqa(root: Path, split: str, image_dir: Path | None = None) -> Benchmark:
    problems_file, splits_file = root / "problems.json", root / "pid_splits.json"
    problems, splits = load_json(problems_file, dict), load_json(splits_file, dict)
    require(split in splits, str(splits_file), f"a list of problem ids under {split!r} (it has {sorted(splits)})")
    samples, references = [], {}
    for pid in splits[split]:
        where = f"{problems_file}: problem {pid}"
        problem = problems.get(pid)
        require(isinstance(problem, dict), f"{problems_file}", f"problem {pid} of {splits_file.name}'s {split} split")
        require(isinstance(problem.get("question"), str), where, "a string 'question'")
        choices = problem.get("choices")
        require(isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) for c in choices), where, f"'choices', 2 to {len(LETTERS)} strings")
        require(isinstance(problem.get("answer"), int) and 0 <= problem["answer"] < len(choices), where,
                "'answer', the index of the right choice")
        context = _collapse(problem.get("hint") or "") or "N/A"
        options = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices, strict=False))
        folder = problem.get("split", split)  # minival / minitest problems keep their images under val / test
        image = (image_dir or root / "images") / folder / str(pid) / problem["image"] if problem.get("image") else None
        samples.append(Sample(pid, image, {"question": _collapse(problem["question"]), "context": context,
                                           "options": options}))
        references[pid] = problem
    return Benchmark(samples, references)


def parse_choice(text: str, choices: list[str]) -> tuple[int | None, str]:
    """(chosen index or None, how it was read: letter | text | unparsable)."""
    said = normalize_answer(text)
    same = [i for i, choice in enumerate(choices) if normalize_answer(choice) == said]
    if len(same) == 1:  # first, so that "A square" is the option "square", not the letter A
        return same[0], "text"
    found = re.search(r"The answer is \(?([A-Z])\b", text) or re.match(r"\s*\(?([A-Z])(?:\)|\.|,|:|\s|$)", text)
    if found:
        index = LETTERS.find(found.group(1))
        return (index if 0 <= index < len(choices) else None), "letter"
    return None, "unparsable"


def score_scienceqa(benchmark: Benchmark, predictions: dict) -> dict:
    correct, read = {}, {"letter": 0, "text": 0, "unparsable": 0}
    for sample in benchmark.samples:
        problem = benchmark.references[sample.id]
        index, how = parse_choice(predictions[sample.id], problem["choices"])
        read[how] += 1
        correct[sample.id] = index == problem["answer"]

    def percent(ids: list) -> float | None:
        return round(100 * sum(correct[i] for i in ids) / len(ids), 2) if ids else None

    groups = {name: percent([s.id for s in benchmark.samples if rule(benchmark.references[s.id])])
              for name, rule in GROUPS.items()}
    return {"accuracy": percent(list(correct)), "image_accuracy": groups["IMG"], "per_group": groups,
            "questions": len(correct), "read_as": read,
            "rule": "an option's exact text, else 'The answer is X' or a leading letter; otherwise wrong"}


def write_outputs(predictions: dict, path: Path) -> None:
    """A JSON object problem id -> generated text (LaVIN's result file keeps the same under 'outputs')."""
    path.write_text(json.dumps(predictions, indent=0))


def read_outputs(path: Path) -> dict:
    value = load_json(path, dict)
    outputs = value.get("outputs", value) if isinstance(value.get("outputs"), dict) else value
    for pid, text in outputs.items():
        require(isinstance(text, str), f"{path}: problem {pid}", "the generated text, a string")
    return outputs

"""What every benchmark reader gives: samples to generate for, and what their predictions are scored against."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sample:
    id: Any  # the benchmark's key: question id, image id or problem id
    image: Path | None  # None: a text-only question (fed a blank image, as LaVIN does)
    fields: dict[str, str] = field(default_factory=dict)  # what the prompt template is filled with


@dataclass
class Benchmark:
    samples: list[Sample]
    references: Any  # the task's ground truth, keyed by sample id; None where the split has no answers
    groups: dict = field(default_factory=dict)  # id -> a group scored on its own (NoCaps domains)

    def limited(self, limit: int | None) -> Benchmark:
        """The first `limit` samples, with only their ground truth."""
        if limit is None or limit >= len(self.samples):
            return self
        samples = self.samples[:limit]
        ids = {s.id for s in samples}

        def keep(by_id: dict) -> dict:
            return {k: v for k, v in by_id.items() if k in ids}

        references = keep(self.references) if isinstance(self.references, dict) else self.references
        return Benchmark(samples, references, keep(self.groups))


def require(condition: bool, where: str, expected: str) -> None:
    """ValueError naming the file (and entry) and what it should have held."""
    if not condition:
        raise ValueError(f"{where}: expected {expected}")


def load_json(path: Path, kind: type) -> Any:
    """The JSON value of a file, which must be of `kind` (list or dict); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    require(isinstance(value, kind), str(path), f"a JSON {'list' if kind is list else 'object'} at the top level")
    return value


def check_coverage(predictions: dict, expected: list, source: str) -> None:
    """The predictions must cover exactly the samples (the official VQA and COCO tools refuse
    anything else): ValueError counting and showing the missing and the unexpected ids."""
    missing = [i for i in expected if i not in predictions]
    extra = sorted(set(predictions) - set(expected), key=str)
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} ids have no prediction (first: {missing[:5]})")
    if extra:
        problems.append(f"{len(extra)} predictions are for ids not in the benchmark (first: {extra[:5]})")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def write_records(predictions: dict, path: Path, id_key: str, text_key: str) -> None:
    """The list-of-records results format the VQA server, GQA and COCO use: [{id_key: id, text_key: text}]."""
    path.write_text(json.dumps([{id_key: i, text_key: t} for i, t in sorted(predictions.items())]))


def read_records(path: Path, id_key: str, id_type: type, text_key: str) -> dict:
    """Such a file as id -> text; the first record of an id is kept (LAVIS deduplicates the same way);
    errors name the file, the entry and the field."""
    predictions = {}
    for index, entry in enumerate(load_json(path, list)):
        where = f"{path}: entry {index}"
        kind = "an integer" if id_type is int else "a string"
        require(isinstance(entry, dict) and isinstance(entry.get(id_key), id_type), where, f"{kind} '{id_key}'")
        require(isinstance(entry.get(text_key), str), where, f"a string '{text_key}'")
        predictions.setdefault(entry[id_key], entry[text_key])
    return predictions

"""A model from a directory of one of three kinds: a vlfast model directory
(VisionLanguageModel.save_pretrained), a Hugging Face BLIP-2 directory, or a `python -m
vlfast.transfer` run directory (one of its runs: `<run>/model/`, a vlfast model directory)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlfast.models import VisionLanguageModel
from vlfast.models.saving import is_model_directory
from vlfast.settings import CONFIG_NAME as RUN_CONFIG
from vlfast.transfer.experiment import SCRATCH, SOURCE, TRANSFER

RUNS = (TRANSFER, SCRATCH, SOURCE)
KINDS = ("a vlfast model directory (config.json from VisionLanguageModel.save_pretrained), a Hugging Face BLIP-2 "
         "directory (config.json with model_type blip-2) or a python -m vlfast.transfer run directory (config.yaml)")


@dataclass(frozen=True)
class Found:
    kind: str  # vlfast | hf
    path: Path  # the model directory (a run directory's `<run>/model/`)


def _is_hf_blip2(directory: Path) -> bool:
    path = directory / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == "blip-2"


def find_model(directory: str | Path, run: str = TRANSFER) -> Found:
    """What `directory` holds, found from its files alone (nothing is loaded); FileNotFoundError or
    ValueError saying what was looked for."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    if is_model_directory(directory):
        return Found("vlfast", directory)
    if _is_hf_blip2(directory):
        return Found("hf", directory)
    if not (directory / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{directory} holds no model: expected {KINDS}")
    if run not in RUNS:
        raise ValueError(f"run must be one of {RUNS}, got {run!r}")
    if not is_model_directory(directory / run / "model"):
        raise FileNotFoundError(f"{directory / run / 'model'} holds no model: the {run} run of {directory} did not "
                                f"finish, was not part of it, or was written by a vlfast without <run>/model/")
    return Found("vlfast", directory / run / "model")


def load_model(directory: str | Path, run: str = TRANSFER) -> VisionLanguageModel:
    """The model in `directory` (a run directory's `run`), in eval mode."""
    from vlfast.export.blip2 import from_hf_blip2

    found = find_model(directory, run)
    if found.kind == "vlfast":
        return VisionLanguageModel.from_pretrained(found.path)
    return from_hf_blip2(found.path)

"""A model from a directory of one of three kinds: a vlfast model directory
(VisionLanguageModel.save_pretrained), a Hugging Face BLIP-2 directory, or a `python -m
vlfast.transfer` run directory (one of its runs: `<run>/model/` when the run saved it, else its
settings in config.yaml and `<run>/vpg/`, which is the whole trained model of an input-connector
run without adapters)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vlfast import defaults
from vlfast.models import VPG, VisionLanguageModel
from vlfast.models.saving import is_model_directory
from vlfast.models.vision import load_tower
from vlfast.settings import CONFIG_NAME as RUN_CONFIG
from vlfast.settings import read_yaml
from vlfast.transfer.config import DEFAULT, TransferConfig
from vlfast.transfer.experiment import SCRATCH, SOURCE, TRANSFER, load_llm

RUNS = (TRANSFER, SCRATCH, SOURCE)
KINDS = ("a vlfast model directory (config.json from VisionLanguageModel.save_pretrained), a Hugging Face BLIP-2 "
         "directory (config.json with model_type blip-2) or a python -m vlfast.transfer run directory (config.yaml)")


@dataclass(frozen=True)
class Found:
    kind: str  # vlfast | hf | run
    path: Path  # the model directory; for a run, the run directory
    run: str | None = None


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
    config = _run_config(directory)
    if not (is_model_directory(directory / run / "model") or (directory / run / "vpg" / "config.json").is_file()):
        raise FileNotFoundError(f"{directory / run} holds neither model/ nor vpg/: the {run} run of {directory} "
                                f"did not finish, or was not part of it")
    if not is_model_directory(directory / run / "model") and (config.connector != "input" or config.mma):
        raise ValueError(f"{directory / run} has no model/: the weights of its "
                         f"{'memory connector' if config.connector != 'input' else 'MMA adapters'} were not saved "
                         f"(vpg/ holds only the VPG), so the {run} model cannot be rebuilt")
    return Found("run", directory, run)


def _run_config(directory: Path) -> TransferConfig:
    return TransferConfig(**read_yaml(directory / RUN_CONFIG, TransferConfig))


def _run_tower(value: str) -> nn.Module:
    """A run's vision tower: the embedded default's ('default') or a directory's."""
    return defaults.default_vision_tower() if value == DEFAULT else load_tower(value)


def _run_model(directory: Path, run: str) -> VisionLanguageModel:
    config = _run_config(directory)
    tower = _run_tower(config.vision)
    if is_model_directory(directory / run / "model"):  # trained on cached features: saved without the tower
        return VisionLanguageModel.from_pretrained(directory / run / "model", vision_tower=tower)
    llm, tokenizer = (load_llm(config.source_llm, "source_llm", SOURCE, config.llm_dtype) if run == SOURCE
                      else load_llm(config.target_llm, "target_llm", "target", config.llm_dtype))
    vpg = VPG.from_pretrained(directory / run / "vpg")
    return VisionLanguageModel(tower, vpg, llm, connector=config.connector, tokenizer=tokenizer).eval()


def load_model(directory: str | Path, run: str = TRANSFER) -> VisionLanguageModel:
    """The model in `directory` (a run directory's `run`), in eval mode."""
    from vlfast.export.blip2 import from_hf_blip2

    found = find_model(directory, run)
    if found.kind == "vlfast":
        return VisionLanguageModel.from_pretrained(found.path)
    if found.kind == "hf":
        return from_hf_blip2(found.path)
    return _run_model(found.path, run)

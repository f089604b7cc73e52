"""Atomic training checkpoints: trainable weights as safetensors, everything else (optimizer,
scheduler, RNG, data position, history) as a torch file.

Each checkpoint is written to a temporary folder and renamed into place, then `latest.json` is
replaced to point at it, and older ones are removed. A crash at any moment leaves `latest.json`
pointing at a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

LATEST = "latest.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


def save(directory: Path, weights: dict[str, Tensor], state: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    previous = _latest_name(directory)
    number = int(previous.split("-")[1]) + 1 if previous else 1
    final = directory / f"checkpoint-{number:06d}"
    partial = directory / f".partial-{final.name}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(partial / WEIGHTS))
    torch.save(state, partial / STATE)
    partial.rename(final)
    pointer = directory / f".{LATEST}.{os.getpid()}"
    pointer.write_text(json.dumps({"checkpoint": final.name}))
    os.replace(pointer, directory / LATEST)
    for old in directory.glob("checkpoint-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(directory: Path) -> tuple[dict[str, Tensor], dict] | None:
    """(weights, state) of the latest checkpoint in directory, or None if it holds none."""
    name = _latest_name(directory)
    if name is None:
        return None
    path = directory / name
    return load_file(str(path / WEIGHTS)), torch.load(path / STATE, weights_only=False)


def _latest_name(directory: Path) -> str | None:
    pointer = directory / LATEST
    return json.loads(pointer.read_text())["checkpoint"] if pointer.is_file() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

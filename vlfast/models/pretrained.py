"""Saving and loading a module whose config is a dataclass: the config as JSON beside the weights
as safetensors (VPG, P-Former)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def save_pretrained(module: nn.Module, directory: str | Path, config_name: str, weights_name: str) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / config_name).write_text(json.dumps(asdict(module.config), indent=1))
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(directory / weights_name))


def read_pretrained(directory: str | Path, config_name: str, weights_name: str,
                    expected: str) -> tuple[dict, dict[str, Tensor]]:
    """(config values, weights) from `directory`; FileNotFoundError naming the missing file and
    what such a directory should be (`expected`)."""
    directory = Path(directory)
    for name in (config_name, weights_name):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: {expected}")
    return json.loads((directory / config_name).read_text()), load_file(str(directory / weights_name))

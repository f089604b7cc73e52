"""Settings of vlfast's commands, each a dataclass with an `output_dir` field: one command-line
option per field, YAML files checked against the fields, the resolved settings written to the run
directory as config.yaml, and the rules for starting or resuming a run there."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

CONFIG_NAME = "config.yaml"


def _parse_type(annotation: str):
    return {"int": int, "float": float, "str": str, "str | None": str, "int | None": int}[annotation]


def add_fields(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the dataclass `cls`, its default shown but left unset (None), so that
    the values given can be told apart from the defaults."""
    defaults = cls()
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        help_text = f"default: {getattr(defaults, field.name)}"
        if field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_parse_type(str(field.type)), default=None, help=help_text)


def read_yaml(path: str | Path, cls: type) -> dict:
    """Settings of `cls` from a YAML file; an unknown key is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of setting: value, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return values


def save_config(config, directory: Path) -> None:
    (directory / CONFIG_NAME).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def config_to_run(cls: type, given: dict, resume: bool, machine: tuple[str, ...] = ()):
    """The settings `given`, in an output directory that holds no other run; when resuming, the
    run's saved settings, which those given now must agree with. `machine` names settings that
    belong to the machine rather than the run (a device): they are taken as given now."""
    config = cls(**given)
    path = Path(config.output_dir) / CONFIG_NAME
    if not resume:
        if path.is_file():
            raise FileExistsError(f"--output-dir {config.output_dir} holds another run ({CONFIG_NAME}); pass --resume "
                                  f"to continue it, or choose another --output-dir")
        return config
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {config.output_dir} holds no run to resume (no {CONFIG_NAME})")
    saved = cls(**read_yaml(path, cls))
    conflicts = {k: v for k, v in given.items()
                 if k not in (*machine, "output_dir") and getattr(saved, k) != v}
    if conflicts:
        raise ValueError(f"--resume: {', '.join(f'{k}={v!r}' for k, v in conflicts.items())} differ from the run's "
                         f"{path}; resume with the same settings")
    # The run is where it is now: a moved or copied output directory resumes in place.
    return dataclasses.replace(saved, output_dir=config.output_dir, **{k: getattr(config, k) for k in machine})

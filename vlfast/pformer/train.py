"""Text-only training of a P-Former for a frozen LLM (SPEC.md section 7): each caption is read
twice, each time with 25% of its tokens masked; the LLM must reconstruct the caption from the first
view's prompts (LM loss), the two views' sentence embeddings must find each other among the batch
(contrastive, temperature 0.07), and the prompts are pulled toward their nearest word embeddings.
It runs on the shared run machinery (vlfast.training): validation every epoch (and every N steps
with --eval-every), an epoch or step budget, checkpoints every N steps, after every validation and
on SIGINT / SIGTERM; `--resume` continues."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlfast.data.collate import CaptionCollator
from vlfast.data.shapes import ShapesDataset
from vlfast.defaults import DEFAULT
from vlfast.models.llm import load_llm
from vlfast.models.pformer import MODEL_DIR, PFormer, PFormerConfig, caption_ids
from vlfast.models.vlm import prompted_lm_loss
from vlfast.pformer.losses import contrastive_loss, mask_tokens, nearest_word_loss
from vlfast.settings import save_config
from vlfast.training import Run, Stage, StopSignals, epoch_steps, seed_for
from vlfast.training.distributed import Processes

HISTORY = "history.json"
TERMS = ("reconstruction", "contrastive", "nearest_word")


@dataclass
class PFormerTrainConfig:
    llm: str = DEFAULT  # a Hugging Face causal-LM directory (with its tokenizer), or the default target LM
    text: str = "shapes"  # 'shapes' (the shapes captions) or a text file, one caption per line
    output_dir: str = "runs/pformer"
    num_prompts: int = 8  # K: the query tokens of the VPGs it will be aligned with
    hidden_size: int = 128
    num_layers: int = 2
    epochs: int = 4
    max_steps: int | None = None  # the budget in optimizer steps instead of epochs
    eval_every: int | None = None  # validate every N optimizer steps too (always at epoch ends and the end)
    batch_size: int = 64
    lr: float = 1e-3
    mask_rate: float = 0.25
    temperature: float = 0.07
    contrastive_weight: float = 1.0
    nearest_word_weight: float = 1.0
    shapes_images: int = 1000  # with --text shapes: every phrasing of this many scenes' captions
    val_fraction: float = 0.05  # captions held out for the validation reconstruction loss
    seed: int = 0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        checks = {"mask_rate": (0 <= self.mask_rate < 1, "in [0, 1)"),
                  "val_fraction": (0 < self.val_fraction < 1, "in (0, 1)")}
        checks |= {name: (getattr(self, name) is None or getattr(self, name) > 0, "positive")
                   for name in ("max_steps", "eval_every")}
        checks |= {name: (getattr(self, name) > 0, "positive")
                   for name in ("num_prompts", "hidden_size", "num_layers", "epochs", "batch_size", "lr",
                                "temperature", "shapes_images", "checkpoint_every")}
        checks |= {name: (getattr(self, name) >= 0, "0 or more") for name in ("contrastive_weight",
                                                                               "nearest_word_weight")}
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")


def load_captions(text: str, shapes_images: int) -> list[str]:
    if text == "shapes":
        data = ShapesDataset("train", shapes_images)
        return [caption for i in range(len(data)) for caption in data[i].captions]
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"--text {text}: neither 'shapes' nor a file")
    captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(captions) < 2:
        raise ValueError(f"--text {text}: {len(captions)} non-empty lines; at least 2 captions are needed")
    return captions


def losses(pformer: PFormer, llm, collate: CaptionCollator, captions: list[str], config: PFormerTrainConfig,
           masked: bool = True) -> dict[str, torch.Tensor]:
    """The three terms on a batch of captions (masked views while training)."""
    ids, mask = caption_ids(collate.tokenizer, captions, pformer.config.max_length)
    rate = config.mask_rate if masked else 0.0
    views = [mask_tokens(ids, mask, rate, pformer.config.mask_id) for _ in range(2)]
    sentence, prompts = pformer.encode(views[0], mask)
    other, _ = pformer.encode(views[1], mask)
    target = collate.tokenize(captions)
    return {
        "reconstruction": prompted_lm_loss(llm, prompts, target["input_ids"], target["attention_mask"],
                                           target["labels"]),
        "contrastive": contrastive_loss(sentence, other, config.temperature),
        "nearest_word": nearest_word_loss(prompts, llm.get_input_embeddings().weight),
    }


def total(terms: dict[str, torch.Tensor], config: PFormerTrainConfig) -> torch.Tensor:
    return (terms["reconstruction"] + config.contrastive_weight * terms["contrastive"]
            + config.nearest_word_weight * terms["nearest_word"])


@torch.no_grad()
def validate(pformer: PFormer, llm, collate: CaptionCollator, captions: list[str], config: PFormerTrainConfig) -> dict:
    """Each term's mean over the held-out captions, unmasked, dropout off."""
    pformer.eval()
    sums = dict.fromkeys(TERMS, 0.0)
    for start in range(0, len(captions), config.batch_size):
        batch = captions[start:start + config.batch_size]
        for name, value in losses(pformer, llm, collate, batch, config, masked=False).items():
            sums[name] += value.item() * len(batch)
    pformer.train()
    return {f"val_{name}": value / len(captions) for name, value in sums.items()}


def train(config: PFormerTrainConfig) -> list[dict]:
    """Trains (or resumes the run in its output directory: config from vlfast.settings.config_to_run)
    and writes <output_dir>/pformer (model and tokenizer), history.json and curves.png; returns the
    history."""
    llm, tokenizer = load_llm(config.llm, "llm", "target")  # inputs are checked before any training
    captions = load_captions(config.text, config.shapes_images)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out)
    order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(config.seed)).tolist()
    held_out = max(1, int(len(captions) * config.val_fraction))
    val = [captions[i] for i in order[:held_out]]
    train_captions = [captions[i] for i in order[held_out:]]
    torch.manual_seed(seed_for(config.seed, "pformer"))
    pformer = PFormer(PFormerConfig(len(tokenizer), config.num_prompts, llm.get_input_embeddings().embedding_dim,
                                    config.hidden_size, config.num_layers))
    collate = CaptionCollator.for_llm(tokenizer, llm)

    def start(stage: Stage, steps: int):
        optimizer = torch.optim.AdamW(pformer.parameters(), lr=config.lr, weight_decay=0.01)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # a constant lr

    def step(stage: Stage, batches: list[torch.Tensor]) -> dict[str, float]:
        terms = losses(pformer, llm, collate, [train_captions[i] for i in batches[0].tolist()], config)
        loss = total(terms, config)
        loss.backward()
        return {name: value.item() for name, value in terms.items()} | {"loss": loss.item()}

    def scores(step: int, epoch: int | float) -> dict:
        return {k: round(v, 5) for k, v in validate(pformer, llm, collate, val, config).items()}

    pformer.train()
    with StopSignals() as signals:
        history = Run(
            "P-Former", out, [Stage("train", config.epochs)],
            len(epoch_steps(len(train_captions), config.batch_size, 1, 1)),
            lambda epoch, first: iter(epoch_steps(len(train_captions), config.batch_size, 1, 1,
                                                  seed_for(config.seed, "pformer", epoch))[first:]),
            pformer.state_dict(), start, step, scores, Processes(0, 1, torch.device("cpu")), signals,
            config.checkpoint_every, config.eval_every, config.max_steps, tensorboard=out / "tensorboard",
        ).train()["history"]
    pformer.save_pretrained(out / MODEL_DIR)
    tokenizer.save_pretrained(out / MODEL_DIR)
    (out / HISTORY).write_text(json.dumps(history, indent=1))
    _plot(history, out / "curves.png")
    return history


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TERMS), figsize=(4 * len(TERMS), 3))
    for ax, name in zip(axes, TERMS, strict=True):
        ax.plot([h["epoch"] for h in history], [h[f"val_{name}"] for h in history], marker="o")
        ax.set_title(f"validation {name.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

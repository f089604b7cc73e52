"""The VPGTrans experiment on the embedded default: train a VPG on the source LM, transfer it to the
target LM (word converter, merged projector, stage 1 projector warm-up, stage 2 fine-tuning), train
the same VPG on the target from scratch, and compare (SPEC.md section 6)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vlfast import defaults
from vlfast.data.collate import CaptionCollator
from vlfast.data.shapes import ShapesDataset
from vlfast.models import VPG, QFormerConfig, VisionLanguageModel, VPGConfig
from vlfast.models.vision import FeatureCache
from vlfast.transfer.converter import merge_projector, shared_vocabulary_pairs, train_word_converter


@dataclass
class TransferConfig:
    train_images: int = 2000
    val_images: int = 200
    epochs: int = 6  # budget of the transfer and scratch runs on the target LM
    source_epochs: int = 15  # the source VPG's training (not part of the transfer's cost)
    batch_size: int = 64
    lr: float = 1e-3
    stage1_lr_multiplier: float = 5.0
    min_lr_ratio: float = 0.5  # stage 2's cosine decay ends at lr * this (1e-4 -> 5e-5 in the paper)
    num_query_tokens: int = 8
    qformer_hidden: int = 64
    qformer_layers: int = 2
    converter_epochs: int = 8
    baseline: bool = True
    seed: int = 0
    output_dir: str = "runs/transfer"

    @classmethod
    def smoke(cls) -> TransferConfig:
        return cls(train_images=64, val_images=16, epochs=2, source_epochs=1, batch_size=16, converter_epochs=1)


@dataclass
class RunResult:
    history: list[float] = field(default_factory=list)  # validation caption loss after each epoch
    wall: list[float] = field(default_factory=list)  # seconds since the run started, per epoch

    @property
    def best(self) -> float:
        return min(self.history)


def _features(config: TransferConfig, tower, split: str, size: int, cache_dir: Path):
    data = ShapesDataset(split, size, seed=config.seed)
    cache = FeatureCache(cache_dir, tower, {"image_size": 48, "normalise": "x/127.5-1"})
    features, captions = [], []
    for start in range(0, size, 256):
        scenes = [data[i] for i in range(start, min(size, start + 256))]
        pixels = torch.stack([s.image for s in scenes]).float() / 127.5 - 1
        features.append(cache.features([f"{split}/{config.seed}/{start + i}/view0" for i in range(len(scenes))],
                                       pixels))
        captions += [s.captions[0].replace(":", " :") for s in scenes]
    return torch.cat(features), captions


def _vpg(config: TransferConfig, vision_width: int, llm_width: int) -> VPG:
    qformer = QFormerConfig(hidden_size=config.qformer_hidden, num_layers=config.qformer_layers, num_heads=2,
                            intermediate_size=2 * config.qformer_hidden, encoder_hidden_size=vision_width,
                            cross_attention_frequency=1, hidden_dropout=0.0)
    return VPG(VPGConfig(qformer, config.num_query_tokens, llm_width))


def _evaluate(model: VisionLanguageModel, features, batches) -> float:
    model.eval()
    total = count = 0
    with torch.no_grad():
        for rows, batch in batches:
            loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], image_features=features[rows])
            total, count = total + loss.item() * len(rows), count + len(rows)
    return total / count


def _batches(collate, captions, batch_size, generator=None):
    order = torch.arange(len(captions)) if generator is None else torch.randperm(len(captions), generator=generator)
    for rows in order.split(batch_size):
        yield rows, collate.tokenize([captions[i] for i in rows])


def train(model: VisionLanguageModel, parameters, lr_at, epochs: int, data, config: TransferConfig, name: str,
          result: RunResult, start: float) -> None:
    """AdamW (0.9, 0.999), weight decay 0.05 except biases and norms; lr_at(step, total) per step."""
    (features, captions), (val_features, val_captions), collate = data
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(captions) / config.batch_size)
    total, step = epochs * steps_per_epoch, 0
    generator = torch.Generator().manual_seed(config.seed)
    val_batches = list(_batches(collate, val_captions, config.batch_size))
    for _ in range(epochs):
        model.train()
        for rows, batch in tqdm(_batches(collate, captions, config.batch_size, generator), total=steps_per_epoch,
                                desc=name, leave=False):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total)
            loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], image_features=features[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        result.history.append(_evaluate(model, val_features, val_batches))
        result.wall.append(time.perf_counter() - start)


def epochs_to_reach(history: list[float], target: float) -> int | None:
    return next((i + 1 for i, loss in enumerate(history) if loss <= target), None)


def run(config: TransferConfig) -> dict:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1))
    begin = time.perf_counter()
    tokenizer, tower = defaults.shapes_tokenizer(), defaults.default_vision_tower()
    source_lm, target_lm = defaults.default_lm("source"), defaults.default_lm("target")
    build_s = time.perf_counter() - begin
    torch.manual_seed(config.seed)  # the same runs whether the default parts were just built or loaded
    cache_dir = defaults.cache_root().parent / "features"
    collate = CaptionCollator(tokenizer)
    data = (_features(config, tower, "train", config.train_images, cache_dir),
            _features(config, tower, "val", config.val_images, cache_dir), collate)
    width = tower.config.hidden_size
    constant = lambda lr: (lambda step, total: lr)  # noqa: E731
    cosine = lambda lr: (lambda step, total: lr * (config.min_lr_ratio + (1 - config.min_lr_ratio)  # noqa: E731
                                                  * 0.5 * (1 + math.cos(math.pi * step / total))))

    # 1. The source VPG, trained on the source LM.
    source = VisionLanguageModel(None, _vpg(config, width, source_lm.config.hidden_size), source_lm)
    source_run = RunResult()
    train(source, list(source.vpg.parameters()), constant(config.lr), config.source_epochs, data, config,
          "source VPG", source_run, time.perf_counter())

    # 2. Transfer: converter, merged projector, stage 1 (projector, 5x lr, 1 epoch), stage 2 (all, cosine).
    start = time.perf_counter()
    pairs = shared_vocabulary_pairs(len(tokenizer))
    converter = train_word_converter(source_lm.get_input_embeddings().weight, target_lm.get_input_embeddings().weight,
                                     pairs, epochs=config.converter_epochs, seed=config.seed)
    vpg = _vpg(config, width, target_lm.config.hidden_size)
    vpg.load_state_dict({k: v for k, v in source.vpg.state_dict().items() if not k.startswith("projector.")},
                        strict=False)
    vpg.projector = merge_projector(converter, source.vpg.projector)
    transfer = VisionLanguageModel(None, vpg, target_lm)
    transfer_run = RunResult()
    train(transfer, list(vpg.projector.parameters()), constant(config.lr * config.stage1_lr_multiplier), 1, data,
          config, "transfer stage 1", transfer_run, start)
    train(transfer, list(vpg.parameters()), cosine(config.lr), config.epochs - 1, data, config, "transfer stage 2",
          transfer_run, start)

    report = {"target_metric": "val caption loss (lower is better)", "build_models_s": round(build_s, 1),
              "runs": {"source": asdict(source_run), "transfer": asdict(transfer_run)}}
    if config.baseline:
        scratch = VisionLanguageModel(None, _vpg(config, width, target_lm.config.hidden_size), target_lm)
        scratch_run = RunResult()
        train(scratch, list(scratch.vpg.parameters()), cosine(config.lr), config.epochs, data, config, "scratch",
              scratch_run, time.perf_counter())
        best_epoch = scratch_run.history.index(scratch_run.best) + 1
        reached = epochs_to_reach(transfer_run.history, scratch_run.best)
        report["runs"]["scratch"] = asdict(scratch_run)
        report["scratch_best_epoch"] = best_epoch
        report["transfer_epochs_to_scratch_best"] = reached
        report["speedup"] = best_epoch / reached if reached else None
        report["speedup_wall"] = scratch_run.wall[best_epoch - 1] / transfer_run.wall[reached - 1] if reached else None
    report["total_s"] = round(time.perf_counter() - begin, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def table(report: dict) -> str:
    runs = report["runs"]
    names = [n for n in ("scratch", "transfer") if n in runs]
    epochs = max(len(runs[n]["history"]) for n in names)
    lines = ["epoch  " + "  ".join(f"{n:>10}" for n in names)]
    for e in range(epochs):
        cells = [f"{runs[n]['history'][e]:10.3f}" if e < len(runs[n]["history"]) else " " * 10 for n in names]
        lines.append(f"{e + 1:>5}  " + "  ".join(cells))
    if "speedup" in report:
        lines.append(f"\nscratch best {min(runs['scratch']['history']):.3f} at epoch {report['scratch_best_epoch']}; "
                     f"transfer reaches it at epoch {report['transfer_epochs_to_scratch_best']} "
                     f"(stage 1 counts as one): speed-up {report['speedup'] or 'not reached'}"
                     + (f" ({report['speedup_wall']:.2f}x wall)" if report.get("speedup_wall") else ""))
    return "\n".join(lines)

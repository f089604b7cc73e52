"""The VPGTrans experiment: train (or load) a VPG on the source LLM, transfer it to the target LLM
(word converter, merged projector, stage 1 projector warm-up, stage 2 fine-tuning), train the same
VPG on the target from scratch, and compare (SPEC.md section 6).

Everything that can be wrong with the inputs is checked in `prepare` before any training starts.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlfast import defaults
from vlfast.data.collate import CaptionCollator
from vlfast.defaults import DEFAULT
from vlfast.models import VPG, QFormerConfig, VisionLanguageModel, VPGConfig
from vlfast.models.llm import load_llm
from vlfast.models.pformer import Alignment, PFormer
from vlfast.models.pformer import load as load_pformer
from vlfast.models.vision import load_tower, tower_width
from vlfast.patch.families import family
from vlfast.training import StopSignals, seed_for
from vlfast.training.distributed import Processes
from vlfast.transfer import loop, report
from vlfast.transfer.config import TransferConfig
from vlfast.transfer.converter import (
    cosine_loss,
    merge_projector,
    token_pairs,
    train_word_converter,
)
from vlfast.transfer.data import TransferData
from vlfast.transfer.evaluate import BenchmarkEval

SOURCE, TRANSFER, SCRATCH = "source", "transfer", "scratch"
WORD_PAIR_TEXTS = 100_000


@dataclass
class Parts:
    tower: nn.Module
    source_llm: nn.Module
    target_llm: nn.Module
    source_tokenizer: object
    target_tokenizer: object
    source_vpg: VPG | None  # given by --source-vpg; None: trained here
    pformer: PFormer | None = None  # given by --pformer: reference prompts for the target LLM
    benchmark: BenchmarkEval | None = None  # --eval-task on --eval-data


def _directory(option: str, value: str, path: str | None = None) -> Path:
    """value's directory (`path` when the option's value is more than a path)."""
    directory = Path(path or value)
    if not directory.is_dir():
        raise FileNotFoundError(f"--{option.replace('_', '-')} {value}: no such directory")
    return directory


def _source_vpg(value: str) -> VPG:
    """--source-vpg: a VPG.save_pretrained or Hugging Face BLIP-2 directory, or a LAVIS / VPGTrans
    checkpoint file (.pth)."""
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"--source-vpg {value}: no such directory or file")
    try:
        return VPG.from_pretrained(path)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"--source-vpg {value}: {error}") from error


def _llm_width(llm: nn.Module) -> int:
    return llm.get_input_embeddings().embedding_dim


def prepare(config: TransferConfig, world: int = 1) -> Parts:
    """Loads (or builds) every part and checks that they fit together (`world`: the processes)."""
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size}: not a multiple of the {world} processes (each streams "
                         f"an equal share of every batch)")
    if any(option.startswith("coco:") for option in (config.data, config.val_data or "")) and DEFAULT in (
            config.source_llm, config.target_llm):  # (wds shards of shapes scenes are fine: data.shapes shards)
        raise ValueError(f"--data {config.data}: the default LLMs only know the shapes vocabulary; pass "
                         f"--source-llm and --target-llm directories of LLMs with an English tokenizer")
    if config.vision == DEFAULT:
        tower = defaults.default_vision_tower()
    else:
        try:
            tower = load_tower(_directory("vision", config.vision))
        except ValueError as error:
            raise ValueError(f"--vision {config.vision}: {error}") from error
    source_vpg = _source_vpg(config.source_vpg) if config.source_vpg else None
    source_llm, source_tokenizer = load_llm(config.source_llm, "source_llm", "source", config.llm_dtype)
    target_llm, target_tokenizer = load_llm(config.target_llm, "target_llm", "target", config.llm_dtype)
    if config.connector == "memory" or config.mma:  # they patch the LLM's layers: its family must be known
        for option, llm in (("source_llm", source_llm), ("target_llm", target_llm)):
            try:
                family(llm)
            except TypeError as error:
                raise ValueError(f"--{option.replace('_', '-')} {getattr(config, option)}: the memory connector "
                                 f"and --mma patch the LLM's layers, but {error}") from error
    if source_vpg is not None:
        if source_vpg.config.vision_width != tower_width(tower):
            raise ValueError(f"--source-vpg {config.source_vpg} reads {source_vpg.config.vision_width}-wide image "
                             f"features but the vision tower emits {tower_width(tower)}")
        width = _llm_width(source_llm)
        if source_vpg.config.llm_hidden_size != width:
            raise ValueError(f"--source-vpg {config.source_vpg} projects to {source_vpg.config.llm_hidden_size} but "
                             f"the source LLM's hidden size is {width}: they were not trained together")
    pformer = _checked_pformer(config, target_llm, target_tokenizer, source_vpg) if config.pformer else None
    benchmark = (BenchmarkEval.load(config.eval_task, config.eval_data, config.eval_prompt, config.eval_limit)
                 if config.eval_task else None)
    if benchmark is not None:  # it scores every run: the source's too when it trains here
        benchmark.check_llm(target_llm, target_tokenizer, "--target-llm")
        if source_vpg is None:
            benchmark.check_llm(source_llm, source_tokenizer, "--source-llm")
    return Parts(tower, source_llm, target_llm, source_tokenizer, target_tokenizer, source_vpg, pformer, benchmark)


def _checked_pformer(config: TransferConfig, target_llm: nn.Module, target_tokenizer, source_vpg: VPG | None):
    """The P-Former of --pformer, if it was trained for the target LLM and emits as many prompts as
    the VPG has queries."""
    directory = _directory("pformer", config.pformer)
    pformer, tokenizer = load_pformer(directory)
    queries = source_vpg.config.num_query_tokens if source_vpg is not None else config.num_query_tokens
    problems = {
        f"emits prompts {pformer.config.llm_hidden_size} wide, but the target LLM's hidden size is "
        f"{_llm_width(target_llm)}": pformer.config.llm_hidden_size != _llm_width(target_llm),
        f"emits {pformer.config.num_prompts} prompts, but the VPG has {queries} query tokens (train it with "
        f"--num-prompts {queries})": pformer.config.num_prompts != queries,
        "reads another tokenizer's ids than the target LLM's": tokenizer.get_vocab() != target_tokenizer.get_vocab(),
    }
    for problem, found in problems.items():
        if found:
            raise ValueError(f"--pformer {config.pformer}: the P-Former {problem}")
    return pformer


def _new_vpg(config: TransferConfig, tower: nn.Module, llm_width: int) -> VPG:
    """A VPG of the configured size; its ln_vision takes the tower's LayerNorm eps, so that a BLIP-2
    tower's post_layernorm can hold it on export."""
    qformer = QFormerConfig(hidden_size=config.qformer_hidden, num_layers=config.qformer_layers, num_heads=2,
                            intermediate_size=2 * config.qformer_hidden, encoder_hidden_size=tower_width(tower),
                            cross_attention_frequency=1, hidden_dropout=0.0)
    eps = getattr(tower.config, "layer_norm_eps", VPGConfig.vision_layer_norm_eps)
    return VPG(VPGConfig(qformer, config.num_query_tokens, llm_width, eps))


def _model(config: TransferConfig, tower: nn.Module, vpg: VPG, llm: nn.Module, tokenizer) -> VisionLanguageModel:
    """Trained on cached features; the tower comes along so that the saved model reads images."""
    model = VisionLanguageModel(tower, vpg, llm, connector=config.connector, mma={} if config.mma else None,
                                tokenizer=tokenizer)
    model.gradient_checkpointing(config.grad_checkpointing)
    return model


def _patch_parameters(model: VisionLanguageModel) -> list[nn.Parameter]:
    """What the connector and the adapters added to the LLM: trained in every stage of every run."""
    return [p for module in model.llm_patches() for p in module.parameters()]


def _all_of(model: VisionLanguageModel) -> list[nn.Parameter]:
    return [*model.vpg.parameters(), *_patch_parameters(model)]


def _projector_and_patches(model: VisionLanguageModel) -> list[nn.Parameter]:
    return [*model.vpg.projector.parameters(), *_patch_parameters(model)]


def _word_pairs(parts: Parts, data: TransferData, seed: int) -> torch.Tensor:
    """The converter's token pairs: every token of an epoch's texts (at most WORD_PAIR_TEXTS of them), the
    whole epoch's on every process, so that every process trains the same converter."""
    texts = []
    for batch in data.train_loader(seed, whole=True):
        texts += batch["captions"]
        if len(texts) >= WORD_PAIR_TEXTS:
            break
    return token_pairs(parts.source_tokenizer, parts.target_tokenizer, texts)


def run(config: TransferConfig, parts: Parts, processes: Processes, signals: StopSignals) -> dict:
    """The three runs (each skipped if it finished before, resumed if it was interrupted) and
    their report."""
    out = Path(config.output_dir)
    begin = time.perf_counter()
    data = TransferData.load(config, parts.tower, processes)

    def context(tokenizer, llm: nn.Module) -> loop.Context:
        return loop.Context(config, processes, data, CaptionCollator.for_llm(tokenizer, llm), out, signals,
                            parts.benchmark)

    def aligned(weight: float) -> tuple[Alignment, ...]:
        """The P-Former alignment as the target runs' extra loss, with this weight."""
        return (Alignment(parts.pformer, parts.target_tokenizer, weight),) if parts.pformer and weight > 0 else ()

    # 1. The source VPG, trained on the source LLM unless given.
    source_vpg, results = parts.source_vpg, {}
    if source_vpg is None:
        torch.manual_seed(seed_for(config.seed, SOURCE))
        vpg = _new_vpg(config, parts.tower, _llm_width(parts.source_llm))
        model = _model(config, parts.tower, vpg, parts.source_llm, parts.source_tokenizer)
        results[SOURCE] = loop.train_run(SOURCE, model,
                                         [loop.Stage("train", config.source_epochs, config.lr, "constant", _all_of)],
                                         context(parts.source_tokenizer, parts.source_llm), compared=False)
        model.release_llm()
        source_vpg = VPG.from_pretrained(out / SOURCE / "vpg")

    # 2. Transfer: converter, merged projector, stage 1 (projector, lr x5, 1 epoch), stage 2 (all, cosine).
    torch.manual_seed(seed_for(config.seed, TRANSFER))
    embeddings = (parts.source_llm.get_input_embeddings().weight, parts.target_llm.get_input_embeddings().weight)
    pairs = _word_pairs(parts, data, seed_for(config.seed, TRANSFER))
    converter = train_word_converter(*embeddings, pairs, epochs=config.converter_epochs, seed=config.seed)
    converter_report = {"token_pairs": len(pairs), "cosine_loss": cosine_loss(converter, *embeddings, pairs)}
    vpg = VPG(dataclasses.replace(source_vpg.config, llm_hidden_size=_llm_width(parts.target_llm)))
    vpg.load_state_dict({k: v for k, v in source_vpg.state_dict().items() if not k.startswith("projector.")},
                        strict=False)
    vpg.projector = merge_projector(converter, source_vpg.projector)
    model = _model(config, parts.tower, vpg, parts.target_llm, parts.target_tokenizer)
    stages = [loop.Stage("stage 1", 1, config.lr * config.stage1_lr_multiplier, "constant",
                         _projector_and_patches, aligned(config.pformer_weight_stage1)),
              loop.Stage("stage 2", config.epochs - 1, config.lr, "cosine", _all_of,
                         aligned(config.pformer_weight_stage2))]
    results[TRANSFER] = loop.train_run(TRANSFER, model, stages, context(parts.target_tokenizer, parts.target_llm))
    model.release_llm()

    # 3. The baseline: the same VPG on the target LLM from scratch, same data and budget.
    if config.baseline:
        torch.manual_seed(seed_for(config.seed, SCRATCH))
        model = _model(config, parts.tower, VPG(vpg.config), parts.target_llm, parts.target_tokenizer)
        results[SCRATCH] = loop.train_run(SCRATCH, model,
                                          [loop.Stage("train", config.epochs, config.lr, "cosine", _all_of,
                                                      aligned(config.pformer_weight_stage2))],
                                          context(parts.target_tokenizer, parts.target_llm))
        model.release_llm()
    if not processes.main:  # only the main process evaluates
        return {}
    summary = report.build(results, config.metric, processes.world,
                           {"total_s": round(time.perf_counter() - begin, 1), "converter": converter_report},
                           "step" if config.max_steps else "epoch")
    report.write(summary, out)
    return summary

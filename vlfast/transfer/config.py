"""Every setting of `python -m vlfast.transfer`, with its default, in one dataclass. The command line
and YAML `--config` files are generated from it (vlfast.settings); the resolved values are written
to the run directory as `config.yaml`."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from vlfast.data.sources import ON_ERROR, parse_data
from vlfast.defaults import DEFAULT
from vlfast.evaluate.tasks import TASKS
from vlfast.models.vlm import LLM_DTYPES
from vlfast.settings import add_fields, read_yaml

METRICS = {"val_loss": "min", "cider": "max", "qa_accuracy": "max"}  # name -> which way is better


def direction(metric: str) -> str:
    """min or max: which way `metric` is better (every benchmark score is higher-better)."""
    return METRICS.get(metric, "max")


def benchmark_metrics(task: str | None) -> list[str]:
    """The scores of an --eval-task, as the runs' histories name them: <task>/<score>."""
    return [f"{task}/{name}" for name in TASKS[task].metrics] if task in TASKS else []
PRESETS = {  # smoke: a seconds-long run for tests
    "smoke": dict(train_images=64, val_images=16, epochs=2, source_epochs=1, batch_size=16, converter_epochs=1,
                  checkpoint_every=2),
}


@dataclass
class TransferConfig:
    # What to connect.
    source_vpg: str | None = None  # a vlfast VPG or BLIP-2 directory, or a LAVIS .pth; None: train one here
    source_llm: str = DEFAULT  # an HF LLM directory with its tokenizer (causal or T5), 'smollm2' or 'default'
    target_llm: str = DEFAULT
    llm_dtype: str = "fp32"  # fp32 | bf16 | fp16: the frozen LLMs' weights (the VPG trains in fp32)
    vision: str = DEFAULT  # a Hugging Face vision-model directory, or 'default'
    # shapes (made here), coco:DIR (DIR/annotations/captions_{train,val}2017.json), wds:PATTERN (webdataset tar
    # shards: an image and a txt or json caption each), or a mixture with ratios: 'wds:a/{0..9}.tar=0.7,shapes=0.3'
    data: str = "shapes"
    val_data: str | None = None  # shapes, coco:DIR or wds:PATTERN; None: the val split of --data's shapes or coco
    connector: str = "input"  # input (BLIP-2 soft prompts) | memory (MemVP)
    mma: bool = False  # LaVIN's mixture-of-modality adapters in the LLM (trained in every run)
    # Data and budget.
    train_images: int = 1000  # of shapes and coco (all of a wds: source's shards are read)
    val_images: int = 200  # of shapes and coco
    samples_per_epoch: int | None = None  # examples an epoch; None: one pass over shapes' or coco's (needed otherwise)
    workers: int = 0  # DataLoader worker processes reading and decoding images, per process
    on_error: str = "skip"  # skip (and count, in the run's log) or raise on an unusable sample
    # The frozen tower's features: computed once into shards in this directory ('default': the vlfast cache),
    # or 'none': computed on the fly by the tower at every step (bf16 on a GPU).
    feature_cache: str = "default"
    epochs: int = 6  # budget of the transfer and the scratch run on the target LLM
    max_steps: int | None = None  # their budget in optimizer steps instead (split between stages as their epochs)
    source_epochs: int = 16  # the source VPG's training, when it is trained here (not part of the transfer's cost)
    batch_size: int = 64  # global: split across processes under torchrun
    grad_accum: int = 1  # batches accumulated per optimizer step: a step sees batch_size x grad_accum examples
    grad_checkpointing: bool = False  # recompute the Q-Former's and the frozen LLM's activations in the backward pass
    # Under torchrun: shard the frozen LLM (each decoder layer) and the VPG over the processes with FSDP2 instead of
    # copying them to each; one process: no effect (nothing to shard over).
    fsdp: bool = False
    max_grad_norm: float = 0.0  # clip the trained parameters' gradient norm to this before each step; 0: no clipping
    lr: float = 1e-3
    stage1_lr_multiplier: float = 5.0
    min_lr_ratio: float = 0.5  # stage 2's cosine decay ends at lr * this (1e-4 -> 5e-5 in the paper)
    converter_epochs: int = 8
    metric: str = "val_loss"  # the score behind the speed-up: val_loss | cider | qa_accuracy | <eval_task>/<score>
    # Validate every N optimizer steps too (always at epoch ends and the end); None: every quarter epoch. Between
    # epoch ends only the --metric is computed (the val_loss alone is cheap; captions and answers are generated).
    eval_every: int | None = None
    # A benchmark scored at every validation too, by `python -m vlfast.evaluate`'s code (its official files and metric).
    eval_task: str | None = None  # vqav2 | okvqa | gqa | coco_caption | nocaps | scienceqa
    eval_data: str | None = None  # its files' folder (e.g. DIR/<task> of `python -m vlfast.data.shapes export DIR`)
    eval_prompt: str | None = None  # its prompt template; None: the task's (BLIP-2's); '{}' is the question
    eval_limit: int | None = None  # only its first N questions (or images)
    # The VPG, when trained here.
    num_query_tokens: int = 8
    qformer_hidden: int = 64
    qformer_layers: int = 2
    # P-Former alignment (SPEC.md section 7): weight * MSE(VPG prompts, P-Former prompts) on captions.
    pformer: str | None = None  # the output directory of `python -m vlfast.pformer train`; None: no alignment
    pformer_weight_stage1: float = 10.0  # in the transfer's stage 1
    pformer_weight_stage2: float = 100.0  # in its stage 2, and in the scratch run
    # The run.
    baseline: bool = True  # also train the VPG on the target from scratch, and report the speed-up
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "runs/transfer"
    checkpoint_every: int = 20  # optimizer steps between checkpoints (also at every epoch end and on SIGINT/SIGTERM)

    def __post_init__(self) -> None:
        specs = parse_data(self.data)  # its errors name --data
        if self.val_data is not None:
            try:
                val = parse_data(self.val_data)
            except ValueError as error:  # parse_data names --data
                raise ValueError(str(error).replace("--data", "--val-data", 1)) from None
            if len(val) != 1:
                raise ValueError(f"--val-data {self.val_data!r}: one source, not a mixture")
        finite = len(specs) == 1 and specs[0].kind != "wds"  # shapes or coco alone: an epoch is a pass over it
        checks = {
            "connector": (self.connector in ("input", "memory"), "input or memory"),
            "llm_dtype": (self.llm_dtype in LLM_DTYPES, " | ".join(LLM_DTYPES)),
            "metric": (self.metric in METRICS or self.metric in benchmark_metrics(self.eval_task),
                       " | ".join([*METRICS, *benchmark_metrics(self.eval_task)]) if self.eval_task
                       else " | ".join(METRICS) + ", or a score of --eval-task T as T/<score>"),
            "eval_task": (self.eval_task is None or self.eval_task in TASKS, " | ".join(TASKS)),
            "eval_data": ((self.eval_task is None) == (self.eval_data is None), "given together with --eval-task"),
            "eval_prompt": (self.eval_prompt is None or self.eval_task is not None, "given with --eval-task"),
            "eval_limit": (self.eval_limit is None or (self.eval_limit > 0 and self.eval_task is not None),
                           "a positive number, given with --eval-task"),
            "eval_every": (self.eval_every is None or self.eval_every > 0, "a positive number"),
            "max_steps": (self.max_steps is None or self.max_steps >= 2, "at least 2 (the transfer has two stages)"),
            "samples_per_epoch": (self.samples_per_epoch > 0 if self.samples_per_epoch is not None else finite,
                                  "a positive number, given with wds: data or a mixture (an epoch's length is "
                                  "needed in advance)"),
            "val_data": (self.val_data is not None or any(s.kind != "wds" for s in specs),
                         "given when --data has no shapes or coco source"),
            "on_error": (self.on_error in ON_ERROR, " or ".join(ON_ERROR)),
            "workers": (self.workers >= 0, "0 or more"),
            "device": (self.device in ("auto", "cpu") or self.device.startswith("cuda"), "auto, cpu, cuda or cuda:N"),
            "epochs": (self.epochs >= 2, "at least 2 (stage 1 is one epoch)"),
            "grad_checkpointing": (not self.grad_checkpointing or (self.connector == "input" and not self.mma),
                                   "off with the memory connector or --mma (their per-batch state is gone when the "
                                   "backward pass recomputes the LLM)"),
            "fsdp": (not self.fsdp or (self.connector == "input" and not self.mma and self.eval_task is None),
                     "off with the memory connector, --mma or --eval-task (their LLM patches and the benchmark's "
                     "scoring in the main process alone are not sharded)"),
        }
        checks |= {name: (getattr(self, name) > 0, "a positive number")
                   for name in ("train_images", "val_images", "source_epochs", "batch_size", "lr",
                                "stage1_lr_multiplier", "converter_epochs", "num_query_tokens", "checkpoint_every",
                                "grad_accum")}
        checks |= {name: (getattr(self, name) >= 0, "0 or more")
                   for name in ("pformer_weight_stage1", "pformer_weight_stage2", "max_grad_norm")}
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")


FIELDS = {f.name: f for f in dataclasses.fields(TransferConfig)}


def parser(description: str) -> argparse.ArgumentParser:
    """One option per TransferConfig field (defaults left unset so that presets, YAML and the
    command line layer in that order), plus --config, --preset and --resume."""
    parser = argparse.ArgumentParser(prog="python -m vlfast.transfer", description=description)
    parser.add_argument("--config", help="a YAML file of settings (the names below, with underscores)")
    parser.add_argument("--preset", choices=list(PRESETS), help="smoke: a seconds-long run for tests")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its last checkpoint")
    add_fields(parser, TransferConfig)
    return parser


def given_values(args: argparse.Namespace) -> dict:
    """The settings chosen for this run: the preset's, then the YAML file's, then the command
    line's (each overriding the one before). TransferConfig(**given_values(args)) is the config."""
    values = dict(PRESETS[args.preset]) if args.preset else {}
    if args.config:
        values |= read_yaml(args.config, TransferConfig)
    return values | {name: getattr(args, name) for name in FIELDS if getattr(args, name) is not None}


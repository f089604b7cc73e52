"""The six benchmarks in one table: where their files are, how a model is prompted and decodes for
them (BLIP-2's zero-shot settings in LAVIS's run configs, REFERENCE.md 3.8; LaVIN's ScienceQA
format), how their predictions are written and read, and how they are scored."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlfast.evaluate import captions, scienceqa, vqa
from vlfast.evaluate.common import Benchmark
from vlfast.evaluate.vqa_metric import RULES

VQA_PROMPT = "Question: {} Short answer:"  # LAVIS's BLIP-2 VQA / OK-VQA / GQA configs
# length_penalty None: the LLM kind's default in LAVIS's BLIP-2 models (OPT 0, FlanT5 -1), which its
# VQA task leaves in place.
CAPTION_METRICS = ("CIDEr", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L")
SHORT_ANSWER = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": None,
                "repetition_penalty": 1.0}


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    splits: tuple[str, ...]  # the first is the default
    files: str  # what --data must hold, for --help and errors
    load: Callable[..., Benchmark]  # (root, split, image_dir) -> Benchmark
    score: Callable[..., dict]  # (benchmark, predictions[, rule]) -> scores
    write: Callable[[dict, Path], None]
    read: Callable[[Path], dict]
    predictions_file: str  # formatted with split
    prompt: str
    generation: dict
    metrics: tuple[str, ...]  # the scores a run can be steered by (`--metric`); the first sums the task up
    rules: tuple[str, ...] = field(default=())  # metric variants the scorer takes as `rule`


TASKS = {task.name: task for task in (
    Task("vqav2", "VQAv2", tuple(vqa.VQAV2_SPLITS),
         "v2_OpenEnded_mscoco_{val2014,test-dev2015}_questions.json, v2_mscoco_val2014_annotations.json, "
         "val2014/ and test2015/ images",
         vqa.load_vqa, vqa.score_vqa, vqa.write_vqa, vqa.read_vqa, "vqa_OpenEnded_mscoco_{split}_vlfast_results.json",
         VQA_PROMPT, SHORT_ANSWER, ("accuracy",), RULES),
    Task("okvqa", "OK-VQA", tuple(vqa.OKVQA_SPLITS),
         "OpenEnded_mscoco_val2014_questions.json, mscoco_val2014_annotations.json, val2014/ images",
         lambda root, split, images: vqa.load_vqa(root, split, images, okvqa=True), vqa.score_vqa, vqa.write_vqa,
         vqa.read_vqa, "okvqa_{split}_vlfast_results.json", VQA_PROMPT, SHORT_ANSWER, ("accuracy",), RULES),
    Task("gqa", "GQA", tuple(vqa.GQA_SPLITS), "{testdev,val}_balanced_questions.json, images/",
         vqa.load_gqa, vqa.score_gqa, vqa.write_gqa, vqa.read_gqa, "gqa_{split}_predictions.json",
         VQA_PROMPT, SHORT_ANSWER, ("accuracy", "accuracy_exact")),
    # BLIP-2's release decoding for COCO (LAVIS cd4db98); LAVIS HEAD adds repetition_penalty 1.15, length_penalty 0.
    Task("coco_caption", "COCO captions (Karpathy)", tuple(captions.KARPATHY),
         "coco_karpathy_{test,val}.json and the val2014/ images it names",
         captions.load_coco_karpathy, captions.score_coco, captions.write_captions, captions.read_captions,
         "captions_karpathy_{split}_vlfast_results.json", "a photo of",
         {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8, "length_penalty": 1.0, "repetition_penalty": 1.0},
         (*CAPTION_METRICS, "agg_metrics")),
    Task("nocaps", "NoCaps", tuple(captions.NOCAPS), "nocaps_val_4500_captions.json, val/ images",
         captions.load_nocaps, captions.score_nocaps, captions.write_captions, captions.read_captions,
         "nocaps_{split}_vlfast_results.json", "",
         {"num_beams": 5, "max_new_tokens": 80, "min_new_tokens": 10, "length_penalty": 1.0, "repetition_penalty": 1.0},
         tuple(f"{group}/{m}" for group in ("overall", *captions.NOCAPS_DOMAINS) for m in CAPTION_METRICS)),
    # MemVP's decoding: greedy after "The answer is" (a few tokens more than its one: answers in words are read too).
    Task("scienceqa", "ScienceQA", ("test", "val", "minival", "minitest", "train"),
         "problems.json, pid_splits.json, images/{split}/{pid}/image.png",
         scienceqa.load_scienceqa, scienceqa.score_scienceqa, scienceqa.write_outputs, scienceqa.read_outputs,
         "scienceqa_{split}_outputs.json", scienceqa.PROMPT,
         {"num_beams": 1, "max_new_tokens": 5, "min_new_tokens": 1, "length_penalty": 1.0, "repetition_penalty": 1.0},
         ("accuracy", "image_accuracy")),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {' | '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def load_benchmark(task: Task, data: str | Path, split: str | None = None, image_dir: str | Path | None = None,
                   limit: int | None = None, check_images: bool = True) -> tuple[str, Benchmark]:
    """(split, the benchmark's first `limit` samples); errors name the file and field at fault or (with
    check_images) the first missing image."""
    split = split or task.splits[0]
    if split not in task.splits:
        raise ValueError(f"split of {task.name} must be one of {' | '.join(task.splits)}, got {split!r}")
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: no such directory (expected {task.files})")
    benchmark = task.load(root, split, Path(image_dir) if image_dir else None).limited(limit)
    if not benchmark.samples:
        raise ValueError(f"--data {data}: the {split} split of {task.title} has no samples")
    missing = [s.image for s in benchmark.samples if check_images and s.image is not None and not s.image.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {task.title} images are missing, first {missing[0]} "
                                "(--image-dir says where they are)")
    return split, benchmark


def numeric_scores(scores: dict, prefix: str = "") -> dict[str, float]:
    """Every score as 'name' or 'group/name' -> value (counts and labels left out): what
    `--metric` can name."""
    flat = {}
    for key, value in scores.items():
        if key in ("questions", "images", "read_as"):
            continue
        if isinstance(value, dict):
            flat |= numeric_scores(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[prefix + key] = float(value)
    return flat

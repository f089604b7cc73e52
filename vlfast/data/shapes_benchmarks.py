"""The `shapes` scenes written in the official file formats of the six benchmarks `python -m
vlfast.evaluate` reads (REFERENCE.md section 3), so that every task runs end to end with no
download: `python -m vlfast.data.shapes export DIR` makes DIR/<task>/ for each task.

Every question of a scene becomes a VQA / GQA question (its ten VQA answers all the same) and a
ScienceQA problem (the options: the answer and other words of its kind, in a seeded order); every
scene's four caption phrasings are its COCO and NoCaps references. NoCaps domains stand for the
number of shapes (one: in-domain, two: near-domain, three: out-domain). Images are written as
lossless PNG for ScienceQA, as JPEG at quality 100 without chroma subsampling elsewhere.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vlfast.data.shapes import COLOURS, NUMBERS, SHAPES, SIZES, Scene, ShapesDataset

DOMAINS = ("in-domain", "near-domain", "out-domain")
KINDS = (NUMBERS, tuple(COLOURS), SHAPES, SIZES)  # the words an answer is chosen among


def _image(scene: Scene) -> Image.Image:
    return Image.fromarray(scene.image.permute(1, 2, 0).numpy().astype(np.uint8))


def _save(scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        _image(scene).save(path)
    else:
        _image(scene).save(path, quality=100, subsampling=0)


def _question_type(question: str) -> str:
    return " ".join(question.split()[:2])  # 'how many', 'what colour', 'what shape', 'how big'


def _vqa(directory: Path, scenes: list[Scene], okvqa: bool) -> None:
    prefix = "" if okvqa else "v2_"
    questions, annotations = [], []
    for image_id, scene in enumerate(scenes, 1):
        _save(scene, directory / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
        for k, (question, answer) in enumerate(scene.questions):
            question_id = image_id * 100 + k
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": image_id, "question_type": _question_type(question),
                "answer_type": "number" if answer in NUMBERS else "other", "multiple_choice_answer": answer,
                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": j} for j in range(1, 11)]})
    meta = {"info": {"description": "vlfast shapes"}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014"}
    (directory / f"{prefix}OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({**meta, "task_type": "Open-Ended", "questions": questions}))
    (directory / f"{prefix}mscoco_val2014_annotations.json").write_text(
        json.dumps({**meta, "annotations": annotations}))


def _gqa(directory: Path, scenes: list[Scene]) -> None:
    questions = {}
    for index, scene in enumerate(scenes):
        image_id = f"shapes{index}"
        _save(scene, directory / "images" / f"{image_id}.jpg")
        for k, (question, answer) in enumerate(scene.questions):
            questions[f"{index}{k:02d}"] = {
                "imageId": image_id, "question": question, "answer": answer, "fullAnswer": answer,
                "isBalanced": True, "types": {"structural": "query", "semantic": "attr", "detailed": "shapes"}}
    (directory / "testdev_balanced_questions.json").write_text(json.dumps(questions))


def _coco(directory: Path, scenes: list[Scene]) -> None:
    entries = []
    for image_id, scene in enumerate(scenes, 1):
        name = f"val2014/COCO_val2014_{image_id:012d}.jpg"
        _save(scene, directory / name)
        entries.append({"image": name, "caption": list(scene.captions)})
    (directory / "coco_karpathy_test.json").write_text(json.dumps(entries))


def _nocaps(directory: Path, scenes: list[Scene]) -> None:
    images, annotations = [], []
    for image_id, scene in enumerate(scenes):
        name = f"shapes{image_id:06d}.jpg"
        _save(scene, directory / "val" / name)
        images.append({"id": image_id, "file_name": name, "domain": DOMAINS[len(scene.objects) - 1],
                       "height": scene.image.shape[1], "width": scene.image.shape[2]})
        annotations += [{"image_id": image_id, "caption": caption, "id": len(annotations) + j}
                        for j, caption in enumerate(scene.captions)]
    (directory / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images,
                                                                         "annotations": annotations}))


def _scienceqa(directory: Path, scenes: list[Scene], seed: int) -> None:
    problems, pids = {}, []
    for index, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, index])
        for k, (question, answer) in enumerate(scene.questions):
            pid = f"{index}{k:02d}"
            kind = next(words for words in KINDS if answer in words)
            others = [w for w in kind if w != answer]
            choices = [answer, *rng.choice(others, size=min(2, len(others)), replace=False).tolist()]
            rng.shuffle(choices)
            problems[pid] = {"question": question, "choices": choices, "answer": choices.index(answer), "hint": "",
                             "image": "image.png", "split": "test", "subject": "natural science", "grade": "grade1",
                             "lecture": "", "solution": ""}
            _save(scene, directory / "images" / "test" / pid / "image.png")
            pids.append(pid)
    (directory / "problems.json").write_text(json.dumps(problems))
    (directory / "pid_splits.json").write_text(json.dumps({"test": pids}))


WRITERS: dict[str, Callable[[Path, list[Scene], int], None]] = {
    "vqav2": lambda d, scenes, seed: _vqa(d, scenes, okvqa=False),
    "okvqa": lambda d, scenes, seed: _vqa(d, scenes, okvqa=True),
    "gqa": lambda d, scenes, seed: _gqa(d, scenes),
    "coco_caption": lambda d, scenes, seed: _coco(d, scenes),
    "nocaps": lambda d, scenes, seed: _nocaps(d, scenes),
    "scienceqa": _scienceqa,
}


def export(directory: str | Path, count: int, split: str = "test", seed: int = 0,
           tasks: tuple[str, ...] = tuple(WRITERS)) -> dict[str, Path]:
    """The first `count` scenes of a split in each task's format under directory/<task>/; returns
    each task's folder (what `python -m vlfast.evaluate --data` takes)."""
    unknown = [t for t in tasks if t not in WRITERS]
    if unknown:
        raise ValueError(f"tasks must be among {' | '.join(WRITERS)}, got {unknown}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    data = ShapesDataset(split, count, seed)
    scenes = [data[i] for i in range(count)]
    folders = {}
    for task in tasks:
        folder = Path(directory) / task
        folder.mkdir(parents=True, exist_ok=True)
        WRITERS[task](folder, scenes, seed)
        folders[task] = folder
    return folders

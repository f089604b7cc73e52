"""The six benchmark readers on tiny hand-written files in the official formats (REFERENCE.md 3.1-3.7):
what they read, what they refuse (naming the file, the entry and the field), --limit, the prediction
files and the coverage check before scoring."""
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlfast.evaluate.run import score
from vlfast.evaluate.tasks import TASKS, load_benchmark


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def _write(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Tiny data sets, written as the official files are laid out
# ---------------------------------------------------------------------------------------------------------------

VQA_QUESTIONS = [
    {"image_id": 42, "question": "What colour is the bus?", "question_id": 420},
    {"image_id": 42, "question": "How many wheels?", "question_id": 421},
    {"image_id": 7, "question": "Is it raining?", "question_id": 70},
]


def _answers(*words: str) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": j} for j, w in enumerate(words, 1)]


VQA_ANNOTATIONS = [
    {"question_id": 420, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
     "multiple_choice_answer": "red", "answers": _answers(*["red"] * 8, "orange", "dark red")},
    {"question_id": 421, "image_id": 42, "question_type": "how many", "answer_type": "number",
     "multiple_choice_answer": "4", "answers": _answers(*["4"] * 10)},
    {"question_id": 70, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
     "multiple_choice_answer": "no", "answers": _answers(*["no"] * 9, "yes")},
]


def write_vqa(root: Path, okvqa: bool = False, images: bool = True) -> Path:
    prefix = "" if okvqa else "v2_"
    meta = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "val2014"}
    _write(root / f"{prefix}OpenEnded_mscoco_val2014_questions.json",
           {**meta, "task_type": "Open-Ended", "questions": VQA_QUESTIONS})
    _write(root / f"{prefix}mscoco_val2014_annotations.json", {**meta, "annotations": VQA_ANNOTATIONS})
    if images:
        for image_id in (42, 7):
            _image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    return root


GQA_QUESTIONS = {
    "20968379": {"imageId": "n288870", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is.",
                 "isBalanced": True, "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
    "201307251": {"imageId": "n161313", "question": "What is on the table?", "answer": "laptop",
                  "fullAnswer": "The laptop is on the table.", "isBalanced": True,
                  "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
    "201640614": {"imageId": "n161313", "question": "Which color is the laptop?", "answer": "silver",
                  "fullAnswer": "The laptop is silver.", "isBalanced": False,
                  "types": {"structural": "query", "semantic": "attr", "detailed": "chooseAttr"}},
    "20405052": {"imageId": "n288870", "question": "Are there both cars and trucks?", "answer": "no",
                 "fullAnswer": "No, there are cars but no trucks.", "isBalanced": True,
                 "types": {"structural": "logical", "semantic": "obj", "detailed": "logicalObj"}},
}


def write_gqa(root: Path, images: bool = True) -> Path:
    _write(root / "testdev_balanced_questions.json", GQA_QUESTIONS)
    if images:
        for image_id in ("n288870", "n161313"):
            _image(root / "images" / f"{image_id}.jpg")
    return root


KARPATHY = [
    {"image": "val2014/COCO_val2014_000000391895.jpg",
     "caption": ["A man with a red helmet on a small moped on a dirt road.",
                 "Man riding a motor bike on a dirt road."]},
    {"image": "val2014/COCO_val2014_000000060623.jpg",
     "caption": ["A young girl inhales with the intent of blowing out a candle.", "A girl blowing out a candle."]},
    {"image": "val2014/COCO_val2014_000000483108.jpg", "caption": "A man on a bicycle riding next to a train."},
]


def write_karpathy(root: Path, images: bool = True) -> Path:
    _write(root / "coco_karpathy_test.json", KARPATHY)
    if images:
        for entry in KARPATHY:
            _image(root / entry["image"])
    return root


NOCAPS = {
    "licenses": [], "info": {},
    "images": [
        {"id": 0, "open_images_id": "0013ea2087020901", "file_name": "0013ea2087020901.jpg", "height": 8, "width": 8,
         "domain": "in-domain", "coco_url": "", "license": 0, "date_captured": ""},
        {"id": 1, "open_images_id": "0019e4a8d3ee7a8b", "file_name": "0019e4a8d3ee7a8b.jpg", "height": 8, "width": 8,
         "domain": "out-domain", "coco_url": "", "license": 0, "date_captured": ""},
        {"id": 2, "open_images_id": "001b1c0b21bb8e5c", "file_name": "001b1c0b21bb8e5c.jpg", "height": 8, "width": 8,
         "domain": "near-domain", "coco_url": "", "license": 0, "date_captured": ""},
    ],
    "annotations": [
        {"image_id": 0, "id": 0, "caption": "A baby is standing in front of a house."},
        {"image_id": 1, "id": 1, "caption": "A red accordion sits on a table."},
        {"image_id": 0, "id": 2, "caption": "A little girl in a white dress."},
        {"image_id": 2, "id": 3, "caption": "Two jellyfish in blue water."},
    ],
}


def write_nocaps(root: Path, images: bool = True) -> Path:
    _write(root / "nocaps_val_4500_captions.json", NOCAPS)
    if images:
        for image in NOCAPS["images"]:
            _image(root / "val" / image["file_name"])
    return root


SCIENCEQA = {
    "5": {"question": "Which  of these states is farthest north?", "choices": ["Utah", "Maine", "Texas"],
          "answer": 1, "hint": "", "image": "image.png", "task": "closed choice", "grade": "grade4",
          "subject": "social science", "topic": "geography", "category": "Geography", "skill": "Read a map",
          "lecture": "", "solution": "", "split": "test"},
    "12": {"question": "What does the  word 'ornery' mean?", "choices": ["grumpy", "happy"], "answer": 0,
           "hint": "Read the  text.  The dog was ornery.", "image": None, "grade": "grade8",
           "subject": "language science", "lecture": "", "solution": "", "split": "test"},
    "19": {"question": "Which is a mammal?", "choices": ["frog", "whale", "shark", "eel"], "answer": 1, "hint": "",
           "image": None, "grade": "grade2", "subject": "natural science", "lecture": "", "solution": "",
           "split": "val"},
}
SCIENCEQA_SPLITS = {"train": [], "val": ["19"], "test": ["5", "12"]}


def write_scienceqa(root: Path, images: bool = True) -> Path:
    _write(root / "problems.json", SCIENCEQA)
    _write(root / "pid_splits.json", SCIENCEQA_SPLITS)
    if images:
        _image(root / "images" / "test" / "5" / "image.png")
    return root


WRITERS = {"vqav2": write_vqa, "okvqa": lambda root, images=True: write_vqa(root, okvqa=True, images=images),
           "gqa": write_gqa, "coco_caption": write_karpathy, "nocaps": write_nocaps, "scienceqa": write_scienceqa}
# the main file of each task's data (what a broken-file test breaks)
MAIN_FILE = {"vqav2": "v2_OpenEnded_mscoco_val2014_questions.json", "okvqa": "OpenEnded_mscoco_val2014_questions.json",
             "gqa": "testdev_balanced_questions.json", "coco_caption": "coco_karpathy_test.json",
             "nocaps": "nocaps_val_4500_captions.json", "scienceqa": "problems.json"}


def test_writers_cover_every_task():
    assert set(WRITERS) == set(TASKS) == set(MAIN_FILE)


# ---------------------------------------------------------------------------------------------------------------
# What is read
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqa_samples_and_references(tmp_path, name):
    root = WRITERS[name](tmp_path)
    split, benchmark = load_benchmark(TASKS[name], root)
    assert split == "val"
    assert [s.id for s in benchmark.samples] == [420, 421, 70]
    assert [s.image for s in benchmark.samples] == [
        root / "val2014" / "COCO_val2014_000000000042.jpg", root / "val2014" / "COCO_val2014_000000000042.jpg",
        root / "val2014" / "COCO_val2014_000000000007.jpg"]
    assert [s.fields for s in benchmark.samples] == [{"question": q["question"]} for q in VQA_QUESTIONS]
    assert benchmark.references == {a["question_id"]: a for a in VQA_ANNOTATIONS}
    assert benchmark.groups == {}


def test_vqa_image_dir(tmp_path):
    root = write_vqa(tmp_path / "data", images=False)
    for image_id in (42, 7):
        _image(tmp_path / "elsewhere" / f"COCO_val2014_{image_id:012d}.jpg")
    _, benchmark = load_benchmark(TASKS["vqav2"], root, image_dir=tmp_path / "elsewhere")
    assert benchmark.samples[2].image == tmp_path / "elsewhere" / "COCO_val2014_000000000007.jpg"


def test_vqav2_test_dev_has_no_references(tmp_path):
    questions = [{"image_id": 1, "question": "What is it?", "question_id": 10}]
    _write(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"questions": questions})
    _image(tmp_path / "test2015" / "COCO_test2015_000000000001.jpg")
    split, benchmark = load_benchmark(TASKS["vqav2"], tmp_path, "test-dev")
    assert split == "test-dev" and benchmark.references is None
    assert benchmark.samples[0].image == tmp_path / "test2015" / "COCO_test2015_000000000001.jpg"
    scores = score(TASKS["vqav2"], benchmark, {10: "a cat"}, "predictions.json")
    assert set(scores) == {"unavailable"} and "server" in scores["unavailable"]
    with pytest.raises(ValueError, match="1 of 1 ids have no prediction"):  # coverage is checked all the same
        score(TASKS["vqav2"], benchmark, {}, "predictions.json")


def test_vqa_val_needs_its_annotations(tmp_path):
    root = write_vqa(tmp_path)
    (root / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "v2_mscoco_val2014_annotations.json"))):
        load_benchmark(TASKS["vqav2"], root)


def test_gqa_samples_and_references(tmp_path):
    root = write_gqa(tmp_path)
    split, benchmark = load_benchmark(TASKS["gqa"], root)
    assert split == "testdev"
    assert [s.id for s in benchmark.samples] == ["20968379", "201307251", "20405052"]  # the unbalanced one left out
    assert [s.image for s in benchmark.samples] == [root / "images" / "n288870.jpg", root / "images" / "n161313.jpg",
                                                    root / "images" / "n288870.jpg"]
    assert benchmark.samples[1].fields == {"question": "What is on the table?"}
    assert benchmark.references == {"20968379": {"answer": "yes", "kind": "binary"},
                                    "201307251": {"answer": "laptop", "kind": "open"},
                                    "20405052": {"answer": "no", "kind": "binary"}}


def test_gqa_without_answers(tmp_path):
    questions = {qid: {k: v for k, v in q.items() if k != "answer"} for qid, q in GQA_QUESTIONS.items()}
    _write(tmp_path / "testdev_balanced_questions.json", questions)
    benchmark = TASKS["gqa"].load(tmp_path, "testdev", None)
    assert len(benchmark.samples) == 3 and benchmark.references is None


def test_gqa_some_answers_missing(tmp_path):
    questions = json.loads(json.dumps(GQA_QUESTIONS))
    del questions["201307251"]["answer"]
    path = _write(tmp_path / "testdev_balanced_questions.json", questions)
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected an 'answer' for every balanced question")):
        TASKS["gqa"].load(tmp_path, "testdev", None)


def test_karpathy_samples_and_references(tmp_path):
    root = write_karpathy(tmp_path)
    split, benchmark = load_benchmark(TASKS["coco_caption"], root)
    assert split == "test"
    assert [s.id for s in benchmark.samples] == [391895, 60623, 483108]
    assert [s.image for s in benchmark.samples] == [root / entry["image"] for entry in KARPATHY]
    assert all(s.fields == {} for s in benchmark.samples)
    assert benchmark.references == {391895: KARPATHY[0]["caption"], 60623: KARPATHY[1]["caption"],
                                    483108: [KARPATHY[2]["caption"]]}  # a single string is one reference


def test_nocaps_samples_references_and_domains(tmp_path):
    root = write_nocaps(tmp_path)
    split, benchmark = load_benchmark(TASKS["nocaps"], root)
    assert split == "val"
    assert [s.id for s in benchmark.samples] == [0, 1, 2]
    assert [s.image for s in benchmark.samples] == [root / "val" / image["file_name"] for image in NOCAPS["images"]]
    assert benchmark.references == {0: ["A baby is standing in front of a house.", "A little girl in a white dress."],
                                    1: ["A red accordion sits on a table."], 2: ["Two jellyfish in blue water."]}
    assert benchmark.groups == {0: "in-domain", 1: "out-domain", 2: "near-domain"}


def test_scienceqa_samples_and_references(tmp_path):
    root = write_scienceqa(tmp_path)
    split, benchmark = load_benchmark(TASKS["scienceqa"], root)
    assert split == "test"
    assert [s.id for s in benchmark.samples] == ["5", "12"]
    assert [s.image for s in benchmark.samples] == [root / "images" / "test" / "5" / "image.png", None]
    assert benchmark.samples[0].fields == {"question": "Which of these states is farthest north?", "context": "N/A",
                                           "options": "(A) Utah (B) Maine (C) Texas"}
    assert benchmark.samples[1].fields == {"question": "What does the word 'ornery' mean?",
                                           "context": "Read the text. The dog was ornery.",
                                           "options": "(A) grumpy (B) happy"}
    assert benchmark.references == {"5": SCIENCEQA["5"], "12": SCIENCEQA["12"]}
    _, val = load_benchmark(TASKS["scienceqa"], root, "val")  # a text-only split needs no image at all
    assert [s.id for s in val.samples] == ["19"] and val.samples[0].image is None


# ---------------------------------------------------------------------------------------------------------------
# What is refused
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_missing_file_is_named(tmp_path, name):
    root = WRITERS[name](tmp_path)
    (root / MAIN_FILE[name]).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{root / MAIN_FILE[name]}: no such file")):
        load_benchmark(TASKS[name], root)


@pytest.mark.parametrize("name", list(TASKS))
def test_malformed_json_is_named(tmp_path, name):
    root = WRITERS[name](tmp_path)
    (root / MAIN_FILE[name]).write_text('{"questions": [')
    with pytest.raises(ValueError, match=re.escape(f"{root / MAIN_FILE[name]}: not valid JSON")):
        load_benchmark(TASKS[name], root)


@pytest.mark.parametrize("name", list(TASKS))
def test_wrong_top_level_is_named(tmp_path, name):
    root = WRITERS[name](tmp_path)
    (root / MAIN_FILE[name]).write_text('"just a string"')
    with pytest.raises(ValueError, match=re.escape(f"{root / MAIN_FILE[name]}: expected a JSON")):
        load_benchmark(TASKS[name], root)


def test_missing_data_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_benchmark(TASKS["gqa"], tmp_path / "nowhere")


def _drop(value: dict, key: str) -> dict:
    return {k: v for k, v in value.items() if k != key}


def _vqa_broken(root, questions=VQA_QUESTIONS, annotations=VQA_ANNOTATIONS):
    write_vqa(root)
    _write(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": questions})
    _write(root / "v2_mscoco_val2014_annotations.json", {"annotations": annotations})


def _karpathy_broken(root, entries):
    write_karpathy(root)
    _write(root / "coco_karpathy_test.json", entries)


def _nocaps_broken(root, images=NOCAPS["images"], annotations=NOCAPS["annotations"]):
    write_nocaps(root)
    _write(root / "nocaps_val_4500_captions.json", {"images": images, "annotations": annotations})


def _scienceqa_broken(root, problems=SCIENCEQA, splits=SCIENCEQA_SPLITS):
    write_scienceqa(root)
    _write(root / "problems.json", problems)
    _write(root / "pid_splits.json", splits)


# (task, how the data is broken, file, entry, what the error says is expected)
BROKEN = {
    "vqa question without image_id": (
        "vqav2", lambda r: _vqa_broken(r, questions=[VQA_QUESTIONS[0], _drop(VQA_QUESTIONS[1], "image_id")]),
        "v2_OpenEnded_mscoco_val2014_questions.json", "questions[1]", "'image_id'"),
    "vqa question without question": (
        "vqav2", lambda r: _vqa_broken(r, questions=[_drop(VQA_QUESTIONS[0], "question")]),
        "v2_OpenEnded_mscoco_val2014_questions.json", "questions[0]", "'question'"),
    "vqa questions not a list": (
        "vqav2", lambda r: _write(r / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": {}}),
        "v2_OpenEnded_mscoco_val2014_questions.json", "", "a list 'questions'"),
    "vqa annotation without answers": (
        "vqav2", lambda r: _vqa_broken(r, annotations=[VQA_ANNOTATIONS[0], _drop(VQA_ANNOTATIONS[1], "answers"),
                                                       VQA_ANNOTATIONS[2]]),
        "v2_mscoco_val2014_annotations.json", "annotations[1]", "'answers'"),
    "vqa annotation with an answer not a string": (
        "vqav2", lambda r: _vqa_broken(r, annotations=[{**VQA_ANNOTATIONS[0], "answers": [{"answer": 3}]}]),
        "v2_mscoco_val2014_annotations.json", "annotations[0]", "'answers'"),
    "vqa annotation without answer_type": (
        "vqav2", lambda r: _vqa_broken(r, annotations=[_drop(VQA_ANNOTATIONS[0], "answer_type")]),
        "v2_mscoco_val2014_annotations.json", "annotations[0]", "'answer_type'"),
    "vqa annotation without question_type": (
        "okvqa", lambda r: (write_vqa(r, okvqa=True), _write(r / "mscoco_val2014_annotations.json", {
            "annotations": [VQA_ANNOTATIONS[0], _drop(VQA_ANNOTATIONS[1], "question_type"), VQA_ANNOTATIONS[2]]})),
        "mscoco_val2014_annotations.json", "annotations[1]", "'question_type'"),
    "vqa question without annotation": (
        "vqav2", lambda r: _vqa_broken(r, annotations=VQA_ANNOTATIONS[:2]),
        "v2_mscoco_val2014_annotations.json", "", "an annotation for every question"),
    "gqa question without imageId": (
        "gqa", lambda r: _write(r / "testdev_balanced_questions.json",
                                {**GQA_QUESTIONS, "20405052": _drop(GQA_QUESTIONS["20405052"], "imageId")}),
        "testdev_balanced_questions.json", "question 20405052", "'imageId'"),
    "gqa question with an answer not a string": (
        "gqa", lambda r: _write(r / "testdev_balanced_questions.json",
                                {"1": {**GQA_QUESTIONS["20968379"], "answer": ["yes"]}}),
        "testdev_balanced_questions.json", "question 1", "a string 'answer'"),
    "karpathy entry without caption": (
        "coco_caption", lambda r: _karpathy_broken(r, [KARPATHY[0], _drop(KARPATHY[1], "caption")]),
        "coco_karpathy_test.json", "entry 1", "'caption'"),
    "karpathy entry without image": (
        "coco_caption", lambda r: _karpathy_broken(r, [_drop(KARPATHY[0], "image")]),
        "coco_karpathy_test.json", "entry 0", "'image'"),
    "karpathy image name without an id": (
        "coco_caption", lambda r: _karpathy_broken(r, [KARPATHY[0], {**KARPATHY[1], "image": "val2014/girl.jpg"}]),
        "coco_karpathy_test.json", "entry 1", "'image'"),
    "nocaps image without domain": (
        "nocaps", lambda r: _nocaps_broken(r, images=[NOCAPS["images"][0], _drop(NOCAPS["images"][1], "domain")]),
        "nocaps_val_4500_captions.json", "images[1]", "'domain'"),
    "nocaps image with an unknown domain": (
        "nocaps", lambda r: _nocaps_broken(r, images=[{**NOCAPS["images"][0], "domain": "indomain"}]),
        "nocaps_val_4500_captions.json", "images[0]", "'domain'"),
    "nocaps caption of an unknown image": (
        "nocaps", lambda r: _nocaps_broken(r, annotations=[*NOCAPS["annotations"], {"image_id": 9, "caption": "x"}]),
        "nocaps_val_4500_captions.json", "annotations[4]", "'image_id'"),
    "nocaps image without captions": (
        "nocaps", lambda r: _nocaps_broken(r, annotations=NOCAPS["annotations"][:3]),
        "nocaps_val_4500_captions.json", "", "captions for every image"),
    "scienceqa answer out of range": (
        "scienceqa", lambda r: _scienceqa_broken(r, problems={**SCIENCEQA, "12": {**SCIENCEQA["12"], "answer": 2}}),
        "problems.json", "problem 12", "'answer'"),
    "scienceqa too few choices": (
        "scienceqa", lambda r: _scienceqa_broken(r, problems={**SCIENCEQA, "5": {**SCIENCEQA["5"], "choices": ["x"]}}),
        "problems.json", "problem 5", "'choices'"),
    "scienceqa problem not in problems.json": (
        "scienceqa", lambda r: _scienceqa_broken(r, splits={"test": ["5", "404"]}),
        "problems.json", "", "problem 404"),
    "scienceqa split key unknown": (
        "scienceqa", lambda r: _scienceqa_broken(r, splits={"train": [], "val": ["19"]}),
        "pid_splits.json", "", "'test'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_entry_names_file_entry_and_field(tmp_path, case):
    name, breaks, file, entry, expected = BROKEN[case]
    breaks(tmp_path)
    with pytest.raises(ValueError) as error:
        load_benchmark(TASKS[name], tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / file}: {entry}" if entry else f"{tmp_path / file}: "), message
    assert "expected" in message and expected in message, message


def test_unknown_split_is_refused(tmp_path):
    root = write_vqa(tmp_path)
    with pytest.raises(ValueError, match="split of okvqa must be one of val, got 'test-dev'"):
        load_benchmark(TASKS["okvqa"], root, "test-dev")


@pytest.mark.parametrize("name", list(TASKS))
def test_missing_image_is_named_before_anything_runs(tmp_path, name):
    root = WRITERS[name](tmp_path)
    _, benchmark = load_benchmark(TASKS[name], root)
    first = next(s.image for s in benchmark.samples if s.image is not None)
    first.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"images are missing, first {first} ")):
        load_benchmark(TASKS[name], root)


def test_images_past_the_limit_are_not_needed(tmp_path):
    root = write_vqa(tmp_path)
    (root / "val2014" / "COCO_val2014_000000000007.jpg").unlink()
    _, benchmark = load_benchmark(TASKS["vqav2"], root, limit=2)
    assert [s.id for s in benchmark.samples] == [420, 421]


# ---------------------------------------------------------------------------------------------------------------
# --limit
# ---------------------------------------------------------------------------------------------------------------

LIMIT_KEEPS = {"vqav2": [420, 421], "okvqa": [420, 421], "gqa": ["20968379", "201307251"],
               "coco_caption": [391895, 60623], "nocaps": [0, 1], "scienceqa": ["5", "12"]}


@pytest.mark.parametrize("name", list(TASKS))
def test_limit_keeps_the_first_samples_and_their_references(tmp_path, name):
    root = WRITERS[name](tmp_path)
    _, whole = load_benchmark(TASKS[name], root)
    _, limited = load_benchmark(TASKS[name], root, limit=2)
    assert limited.samples == whole.samples[:2]
    assert [s.id for s in limited.samples] == LIMIT_KEEPS[name]
    assert limited.references == {i: whole.references[i] for i in LIMIT_KEEPS[name]}
    assert limited.groups == {i: g for i, g in whole.groups.items() if i in LIMIT_KEEPS[name]}
    _, more = load_benchmark(TASKS[name], root, limit=100)
    assert more.samples == whole.samples and more.references == whole.references


def test_limit_keeps_no_references_where_there_are_none(tmp_path):
    _write(tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json", {"questions": VQA_QUESTIONS})
    for image_id in (42, 7):
        _image(tmp_path / "test2015" / f"COCO_test2015_{image_id:012d}.jpg")
    _, benchmark = load_benchmark(TASKS["vqav2"], tmp_path, "test-dev", limit=1)
    assert [s.id for s in benchmark.samples] == [420] and benchmark.references is None


def test_empty_split_is_refused(tmp_path):
    _scienceqa_broken(tmp_path, splits={"test": []})
    with pytest.raises(ValueError, match="the test split of ScienceQA has no samples"):
        load_benchmark(TASKS["scienceqa"], tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Prediction files
# ---------------------------------------------------------------------------------------------------------------

PREDICTIONS = {"vqav2": {420: "red", 421: "four", 70: "no"}, "okvqa": {420: "red", 421: "4", 70: "yes"},
               "gqa": {"20968379": "yes", "201307251": "a laptop", "20405052": "No."},
               "coco_caption": {391895: "a man riding a motorbike", 60623: "a girl and a cake", 483108: "a train"},
               "nocaps": {0: "a child", 1: "an accordion", 2: "jellyfish"},
               "scienceqa": {"5": " B", "12": "The answer is A.\n"}}


@pytest.mark.parametrize("name", list(TASKS))
def test_predictions_round_trip_and_score(tmp_path, name, monkeypatch):
    task = TASKS[name]
    path = tmp_path / task.predictions_file.format(split=task.splits[0])
    task.write(PREDICTIONS[name], path)
    assert task.read(path) == PREDICTIONS[name]
    root = WRITERS[name](tmp_path / "data")
    _, benchmark = load_benchmark(task, root)
    if name in ("coco_caption", "nocaps"):  # caption scores are tested in test_captions.py: no Java here
        import vlfast.evaluate.captions as captions

        monkeypatch.setattr(captions.shutil, "which", lambda _: None)
    scores = score(task, benchmark, task.read(path), str(path))
    assert scores  # every task scores its own file


def test_predictions_official_shapes(tmp_path):
    """The files are in the benchmarks' own result formats."""
    TASKS["vqav2"].write({2: "b", 1: "a"}, tmp_path / "vqa.json")
    assert json.loads((tmp_path / "vqa.json").read_text()) == [{"question_id": 1, "answer": "a"},
                                                              {"question_id": 2, "answer": "b"}]
    TASKS["gqa"].write({"7": "yes"}, tmp_path / "gqa.json")
    assert json.loads((tmp_path / "gqa.json").read_text()) == [{"questionId": "7", "prediction": "yes"}]
    TASKS["coco_caption"].write({5: "a dog"}, tmp_path / "caps.json")
    assert json.loads((tmp_path / "caps.json").read_text()) == [{"image_id": 5, "caption": "a dog"}]
    TASKS["scienceqa"].write({"5": "B"}, tmp_path / "sqa.json")
    assert json.loads((tmp_path / "sqa.json").read_text()) == {"5": "B"}


def test_predictions_first_of_duplicates_kept(tmp_path):
    """LAVIS deduplicates by question / image id, keeping the first."""
    _write(tmp_path / "vqa.json", [{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}])
    assert TASKS["vqav2"].read(tmp_path / "vqa.json") == {1: "a"}
    _write(tmp_path / "caps.json", [{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}])
    assert TASKS["nocaps"].read(tmp_path / "caps.json") == {1: "a"}


def test_scienceqa_reads_lavin_result_files(tmp_path):
    _write(tmp_path / "lavin.json", {"acc": 90.0, "outputs": {"5": "The answer is B.", "12": "A"}})
    assert TASKS["scienceqa"].read(tmp_path / "lavin.json") == {"5": "The answer is B.", "12": "A"}


# (task, file content, entry, what the error says is expected)
BAD_PREDICTIONS = {
    "vqa entry without answer": ("vqav2", [{"question_id": 1, "answer": "a"}, {"question_id": 2}], "entry 1",
                                 "a string 'answer'"),
    "vqa question_id a string": ("okvqa", [{"question_id": "1", "answer": "a"}], "entry 0", "an integer 'question_id'"),
    "vqa entry not an object": ("vqav2", ["a"], "entry 0", "an integer 'question_id'"),
    "vqa file an object": ("vqav2", {"1": "a"}, "", "a JSON list"),
    "gqa questionId an integer": ("gqa", [{"questionId": 5, "prediction": "yes"}], "entry 0", "a string 'questionId'"),
    "gqa entry without prediction": ("gqa", [{"questionId": "5", "answer": "yes"}], "entry 0",
                                     "a string 'prediction'"),
    "caption image_id a string": ("coco_caption", [{"image_id": "391895", "caption": "a"}], "entry 0",
                                  "an integer 'image_id'"),
    "caption not a string": ("nocaps", [{"image_id": 1, "caption": ["a"]}], "entry 0", "a string 'caption'"),
    "scienceqa output not a string": ("scienceqa", {"5": "B", "12": 1}, "problem 12", "a string"),
    "scienceqa file a list": ("scienceqa", ["B"], "", "a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_PREDICTIONS))
def test_malformed_predictions_name_file_and_entry(tmp_path, case):
    name, content, entry, expected = BAD_PREDICTIONS[case]
    path = _write(tmp_path / "predictions.json", content)
    with pytest.raises(ValueError) as error:
        TASKS[name].read(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {entry}" if entry else f"{path}: "), message
    assert expected in message, message


def test_predictions_file_missing_or_not_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'none.json'}: no such file")):
        TASKS["gqa"].read(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.json'}: not valid JSON")):
        TASKS["coco_caption"].read(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------------------------
# Coverage before scoring
# ---------------------------------------------------------------------------------------------------------------

def test_score_reports_missing_predictions(tmp_path):
    _, benchmark = load_benchmark(TASKS["vqav2"], write_vqa(tmp_path))
    with pytest.raises(ValueError, match=re.escape("preds.json: 2 of 3 ids have no prediction (first: [421, 70])")):
        score(TASKS["vqav2"], benchmark, {420: "red"}, "preds.json")


def test_score_reports_extra_predictions(tmp_path):
    _, benchmark = load_benchmark(TASKS["gqa"], write_gqa(tmp_path))
    predictions = {**PREDICTIONS["gqa"], "9": "x", "201640614": "silver"}
    with pytest.raises(ValueError, match=re.escape(
            "preds.json: 2 predictions are for ids not in the benchmark (first: ['201640614', '9'])")):
        score(TASKS["gqa"], benchmark, predictions, "preds.json")


def test_score_reports_missing_and_extra_together(tmp_path):
    _, benchmark = load_benchmark(TASKS["scienceqa"], write_scienceqa(tmp_path))
    with pytest.raises(ValueError) as error:
        score(TASKS["scienceqa"], benchmark, {"5": "B", "19": "A"}, "out.json")
    assert str(error.value) == ("out.json: 1 of 2 ids have no prediction (first: ['12']); "
                                "1 predictions are for ids not in the benchmark (first: ['19'])")


def test_score_shows_at_most_five_ids(tmp_path):
    _, benchmark = load_benchmark(TASKS["coco_caption"], write_karpathy(tmp_path))
    predictions = {**PREDICTIONS["coco_caption"], **{i: "x" for i in range(1, 9)}}
    with pytest.raises(ValueError, match=re.escape("8 predictions are for ids not in the benchmark (first: "
                                                   "[1, 2, 3, 4, 5])")):
        score(TASKS["coco_caption"], benchmark, predictions, "p.json")


def test_score_refuses_a_rule_the_task_lacks(tmp_path):
    _, benchmark = load_benchmark(TASKS["gqa"], write_gqa(tmp_path))
    with pytest.raises(ValueError, match="rule 'lavis' does not apply to gqa"):
        score(TASKS["gqa"], benchmark, PREDICTIONS["gqa"], "p.json", "lavis")


def test_vqa_scores_both_rules(tmp_path):
    _, benchmark = load_benchmark(TASKS["vqav2"], write_vqa(tmp_path))
    # 420: "red" matches 8 of 10 -> 1; 421: "four" vs ten identical "4": official leaves it unnormalised -> 0,
    # LAVIS normalises the prediction -> 1; 70: "no" matches 9 -> 1.
    official = score(TASKS["vqav2"], benchmark, PREDICTIONS["vqav2"], "p.json")
    lavis = score(TASKS["vqav2"], benchmark, PREDICTIONS["vqav2"], "p.json", "lavis")
    assert official["accuracy"] == 66.67 and official["per_answer_type"]["number"] == 0.0
    assert lavis["accuracy"] == 100.0

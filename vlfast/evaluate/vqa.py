"""Question-answering benchmarks read from their official files: VQAv2, OK-VQA (the same format and
metric) and GQA (REFERENCE.md 3.1-3.4).

VQAv2 / OK-VQA: the official VQA accuracy (vqa_metric; LAVIS's variant on request, labelled).
GQA: exact match after BLIP-2's normalisation (LAVIS's GQA task: the VQA punctuation, number and
article rules on prediction and answer), over the balanced questions; the official script's plain
exact match beside it.
"""
from __future__ import annotations

from pathlib import Path

from vlfast.evaluate.common import Benchmark, Sample, load_json, read_records, require, write_records
from vlfast.evaluate.vqa_metric import normalize_answer, vqa_scores

# split -> (file subtype, image folder)
VQAV2_SPLITS = {"val": ("val2014", "val2014"), "test-dev": ("test-dev2015", "test2015"),
                "test": ("test2015", "test2015")}
OKVQA_SPLITS = {"val": ("val2014", "val2014")}  # OK-VQA's val2014 is what papers and LAVIS call its test
GQA_SPLITS = {"testdev": "testdev", "val": "val"}


def _vqa_files(root: Path, split: str, okvqa: bool) -> tuple[Path, Path, str]:
    subtype, images = (OKVQA_SPLITS if okvqa else VQAV2_SPLITS)[split]
    prefix = "" if okvqa else "v2_"
    return (root / f"{prefix}OpenEnded_mscoco_{subtype}_questions.json",
            root / f"{prefix}mscoco_{subtype}_annotations.json", images)


def load_vqa(root: Path, split: str, image_dir: Path | None = None, *, okvqa: bool = False) -> Benchmark:
    """Questions (and annotations, where the split has them: test splits are scored by the
    evaluation server); images `COCO_{folder}_{image_id:012d}.jpg` under image_dir (default
    root/<folder>)."""
    questions_file, annotations_file, folder = _vqa_files(root, split, okvqa)
    questions = load_json(questions_file, dict).get("questions")
    require(isinstance(questions, list), str(questions_file), "a list 'questions'")
    samples = []
    for index, q in enumerate(questions):
        where = f"{questions_file}: questions[{index}]"
        require(isinstance(q, dict) and isinstance(q.get("question_id"), int), where, "an integer 'question_id'")
        require(isinstance(q.get("image_id"), int), where, "an integer 'image_id'")
        require(isinstance(q.get("question"), str), where, "a string 'question'")
        image = (image_dir or root / folder) / f"COCO_{folder}_{q['image_id']:012d}.jpg"
        samples.append(Sample(q["question_id"], image, {"question": q["question"]}))
    if not annotations_file.is_file() and split != "val":
        return Benchmark(samples, None)
    annotations = load_json(annotations_file, dict).get("annotations")
    require(isinstance(annotations, list), str(annotations_file), "a list 'annotations'")
    references = {}
    for index, a in enumerate(annotations):
        where = f"{annotations_file}: annotations[{index}]"
        require(isinstance(a, dict) and isinstance(a.get("question_id"), int), where, "an integer 'question_id'")
        answers = a.get("answers")
        require(isinstance(answers, list) and answers and all(isinstance(x, dict) and isinstance(x.get("answer"), str)
                                                               for x in answers),
                where, "'answers', a list of {answer: str, ...}")
        require(isinstance(a.get("answer_type"), str), where, "a string 'answer_type'")
        require(isinstance(a.get("question_type"), str), where, "a string 'question_type'")  # scores are kept by it
        references[a["question_id"]] = a
    unanswered = [s.id for s in samples if s.id not in references]
    require(not unanswered, str(annotations_file),
            f"an annotation for every question of {questions_file.name} ({len(unanswered)} missing, first "
            f"{unanswered[:5]})")
    return Benchmark(samples, references)


def score_vqa(benchmark: Benchmark, predictions: dict, rule: str = "official") -> dict:
    return vqa_scores(predictions, [benchmark.references[s.id] for s in benchmark.samples], rule)


def write_vqa(predictions: dict, path: Path) -> None:
    """The VQA server's results format: a list of {question_id, answer}."""
    write_records(predictions, path, "question_id", "answer")


def read_vqa(path: Path) -> dict:
    return read_records(path, "question_id", int, "answer")


def load_gqa(root: Path, split: str, image_dir: Path | None = None) -> Benchmark:
    """`{split}_balanced_questions.json`: a dict question id -> {imageId, question, answer, isBalanced,
    types, ...}; the balanced questions are evaluated; images `{imageId}.jpg` under image_dir
    (default root/images)."""
    path = root / f"{GQA_SPLITS[split]}_balanced_questions.json"
    questions = load_json(path, dict)
    samples, references = [], {}
    for qid, q in questions.items():
        where = f"{path}: question {qid}"
        require(isinstance(q, dict) and isinstance(q.get("imageId"), str), where, "a string 'imageId'")
        require(isinstance(q.get("question"), str), where, "a string 'question'")
        if not q.get("isBalanced", True):
            continue
        samples.append(Sample(qid, (image_dir or root / "images") / f"{q['imageId']}.jpg", {"question": q["question"]}))
        if "answer" in q:
            require(isinstance(q["answer"], str), where, "a string 'answer'")
            references[qid] = {"answer": q["answer"],
                               "kind": "open" if (q.get("types") or {}).get("structural") == "query" else "binary"}
    require(not references or len(references) == len(samples), str(path), "an 'answer' for every balanced question")
    return Benchmark(samples, references or None)


def score_gqa(benchmark: Benchmark, predictions: dict) -> dict:
    """accuracy: BLIP-2's (normalised exact match); accuracy_exact: the official script's; both x100
    over the balanced questions, with the open / binary split of the first."""
    hits, exact, kinds = [], [], {}
    for sample in benchmark.samples:
        truth, prediction = benchmark.references[sample.id], predictions[sample.id]
        hit = normalize_answer(prediction) == normalize_answer(truth["answer"])
        hits.append(hit)
        exact.append(prediction == truth["answer"])
        kinds.setdefault(truth["kind"], []).append(hit)

    def percent(values: list[bool]) -> float:
        return round(100 * sum(values) / len(values), 2)

    return {"accuracy": percent(hits), "accuracy_exact": percent(exact),
            "per_kind": {kind: percent(values) for kind, values in sorted(kinds.items())},
            "questions": len(hits), "rule": "BLIP-2 (LAVIS GQATask: VQA normalisation of prediction and answer)"}


def write_gqa(predictions: dict, path: Path) -> None:
    """The official format: a list of {questionId, prediction}."""
    write_records(predictions, path, "questionId", "prediction")


def read_gqa(path: Path) -> dict:
    return read_records(path, "questionId", str, "prediction")

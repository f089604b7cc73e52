"""GQA scoring (REFERENCE.md 3.4): BLIP-2's accuracy (VQA normalisation of prediction and answer) beside
the official exact match, the open / binary split, and only the balanced questions evaluated."""
import json

import pytest

from vlfast.evaluate.common import Benchmark, Sample
from vlfast.evaluate.vqa import load_gqa, score_gqa


def _question(answer: str, structural: str, balanced: bool = True) -> dict:
    return {"imageId": "n1", "question": "?", "answer": answer, "fullAnswer": answer, "isBalanced": balanced,
            "types": {"structural": structural, "semantic": "attr", "detailed": "x"}}


QUESTIONS = {
    "1": _question("yes", "verify"),
    "2": _question("2", "query"),
    "3": _question("table", "query"),
    "4": _question("red", "query"),
    "5": _question("no", "logical"),
    "6": _question("blue", "choose"),
    "7": _question("cat", "query", balanced=False),
    "8": _question("no", "compare", balanced=False),
}
PREDICTIONS = {
    "1": "Yes.",  # normalised hit, exact miss
    "2": "two",  # normalised hit, exact miss
    "3": "the table",  # normalised hit, exact miss
    "4": "red",  # both hit
    "5": "yes",  # both miss
    "6": "Blue",  # normalised hit, exact miss (the official match is case-sensitive)
}


@pytest.fixture
def gqa(tmp_path):
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(QUESTIONS))
    return load_gqa(tmp_path, "testdev")


def test_only_balanced_questions_are_evaluated(gqa):
    assert [s.id for s in gqa.samples] == ["1", "2", "3", "4", "5", "6"]
    assert set(gqa.references) == set(PREDICTIONS)


def test_open_or_binary_from_structural_type(gqa):
    assert {i: r["kind"] for i, r in gqa.references.items()} == {
        "1": "binary", "2": "open", "3": "open", "4": "open", "5": "binary", "6": "binary"}


def test_scores(gqa):
    scores = score_gqa(gqa, PREDICTIONS)
    assert scores["accuracy"] == 83.33  # 5 of 6
    assert scores["accuracy_exact"] == 16.67  # 1 of 6
    assert scores["per_kind"] == {"binary": 66.67, "open": 100.0}  # binary 1, 5, 6; open 2, 3, 4
    assert scores["questions"] == 6
    assert "BLIP-2" in scores["rule"]


@pytest.mark.parametrize(("prediction", "answer", "hit", "exact"), [
    ("Yes.", "yes", True, False),
    ("two", "2", True, False),
    ("the table", "table", True, False),
    ("table", "the table", True, False),  # the answer is normalised too
    ("  left\n", "left", True, False),
    ("t-shirt", "t shirt", True, False),
    ("tshirt", "t-shirt", False, False),
    ("left", "left", True, True),
    ("white and black", "black and white", False, False),
])
def test_normalisation(prediction, answer, hit, exact):
    benchmark = Benchmark([Sample("q", None)], {"q": {"answer": answer, "kind": "open"}})
    scores = score_gqa(benchmark, {"q": prediction})
    assert (scores["accuracy"], scores["accuracy_exact"]) == (100.0 * hit, 100.0 * exact)

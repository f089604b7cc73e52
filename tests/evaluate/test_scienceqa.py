"""ScienceQA as LaVIN / MemVP evaluate it (REFERENCE.md 3.7): reading the chosen option from generated
text, the LaVIN prompt fields, and the accuracies with LaVIN's breakdown, on hand-computed cases."""
import json

import pytest

from vlfast.evaluate.common import Benchmark
from vlfast.evaluate.scienceqa import GROUPS, PROMPT, load_scienceqa, parse_choice, score_scienceqa

COLOURS = ["blue", "red", "green"]


@pytest.mark.parametrize(("text", "choices", "expected"), [
    ("The answer is B.", COLOURS, (1, "letter")),
    ("The answer is (C).", COLOURS, (2, "letter")),
    ("Response: The answer is A. BECAUSE: ...", COLOURS, (0, "letter")),  # LaVIN's QCM-ALE output
    ("(C) red", COLOURS, (2, "letter")),  # the letter wins over the text
    ("B", COLOURS, (1, "letter")),
    (" B", COLOURS, (1, "letter")),  # what follows "The answer is" starts with a space
    ("B.", COLOURS, (1, "letter")),
    ("C) green", COLOURS, (2, "letter")),
    ("D", COLOURS, (None, "letter")),  # past the last option: counted wrong, as MemVP
    ("The answer is E.", ["yes", "no"], (None, "letter")),
    ("red", COLOURS, (1, "text")),
    ("Red.", COLOURS, (1, "text")),  # the VQA normalisation: case, final period
    ("a red circle", ["a blue circle", "a red circle"], (1, "text")),  # "a" is no letter, "A" would be
    ("the red circle", ["a blue circle", "a red circle"], (1, "text")),  # articles dropped on both sides
    ("two", ["1", "2", "3"], (1, "text")),  # number words as digits
    ("purple", COLOURS, (None, "unparsable")),
    ("it is red", COLOURS, (None, "unparsable")),  # not equal to an option
    ("I think it is red", COLOURS, (None, "letter")),  # a leading capital and a space read as a letter (I): wrong
    ("A red one", ["a red one", "a blue one"], (0, "text")),  # an option's exact text wins over its leading capital
    ("red", ["red", "Red.", "blue"], (None, "unparsable")),  # equal to two options
    ("", COLOURS, (None, "unparsable")),
    ("Bob", ["Bob", "Alice"], (0, "text")),  # a capital starting a word is no letter
])
def test_parse_choice(text, choices, expected):
    assert parse_choice(text, choices) == expected


# Six test problems: subject, hint, image and grade vary; one val problem that the test split leaves out.
PROBLEMS = {
    "1": {"question": "Which  animal is a mammal?", "choices": ["whale", "shark"], "answer": 0,
          "hint": "Look at  the picture.", "image": "image.png", "subject": "natural science", "grade": "grade3"},
    "2": {"question": "Which is a solid?", "choices": ["milk", "rock", "air"], "answer": 1, "hint": "",
          "image": "image.png", "subject": "natural science", "grade": "grade8"},
    "3": {"question": "What is the boiling point of water?", "choices": ["0 C", "50 C", "100 C"], "answer": 2,
          "hint": "Water boils at sea level.", "image": None, "subject": "natural science", "grade": "grade5"},
    "4": {"question": "Which country is in Europe?", "choices": ["France", "Peru", "Chad"], "answer": 0, "hint": "",
          "image": None, "subject": "social science", "grade": "grade10"},
    "5": {"question": "Which colour rhymes with 'bed'?", "choices": COLOURS, "answer": 1, "hint": "",
          "image": None, "subject": "language science", "grade": "grade2"},
    "6": {"question": "Which word is a noun?", "choices": ["cat", "run", "blue"], "answer": 0,
          "hint": "A noun names a thing.", "image": "image.png", "subject": "language science", "grade": "grade12"},
    "7": {"question": "Is it val?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": None,
          "subject": "natural science", "grade": "grade1"},
}
PREDICTIONS = {
    "1": "The answer is A.",  # right, letter
    "2": "B",  # right, letter
    "3": "(A) 0 C",  # wrong, text: "(A)" goes with the punctuation and the article "a", leaving option A's text
    "4": "D",  # wrong: past the last of three options
    "5": "red",  # right, text
    "6": "purple",  # wrong, unparsable
}


@pytest.fixture
def problems(tmp_path) -> Benchmark:
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": list(PREDICTIONS), "val": ["7"]}))
    return load_scienceqa(tmp_path, "test")


def test_prompt_fields_follow_lavin(problems, tmp_path):
    fields = {s.id: s.fields for s in problems.samples}
    assert fields["1"] == {"question": "Which animal is a mammal?", "context": "Look at the picture.",
                           "options": "(A) whale (B) shark"}
    assert fields["2"] == {"question": "Which is a solid?", "context": "N/A", "options": "(A) milk (B) rock (C) air"}
    assert PROMPT.format(**fields["5"]) == (
        "Question: Which colour rhymes with 'bed'?\nContext: N/A\nOptions: (A) blue (B) red (C) green\n"
        "Response: The answer is")
    images = {s.id: s.image for s in problems.samples}
    assert images["1"] == tmp_path / "images" / "test" / "1" / "image.png" and images["3"] is None


def test_scores_by_hand(problems):
    scores = score_scienceqa(problems, PREDICTIONS)
    # right: 1, 2, 5 of 1-6
    assert scores["accuracy"] == 50.0
    assert scores["image_accuracy"] == 66.67  # images: 1, 2, 6
    assert scores["per_group"] == {
        "NAT": 66.67,  # 1, 2, 3
        "SOC": 0.0,  # 4
        "LAN": 50.0,  # 5, 6
        "TXT": 33.33,  # hints: 1, 3, 6
        "IMG": 66.67,
        "NO": 50.0,  # neither: 4, 5
        "G1-6": 66.67,  # grades 3, 5, 2: 1, 3, 5
        "G7-12": 33.33,  # grades 8, 10, 12: 2, 4, 6
    }
    assert list(scores["per_group"]) == list(GROUPS)
    assert scores["questions"] == 6
    assert scores["read_as"] == {"letter": 3, "text": 2, "unparsable": 1}


def test_empty_group_is_none(problems):
    scores = score_scienceqa(problems.limited(2), {"1": "A", "2": "A"})
    assert scores["accuracy"] == 50.0 and scores["image_accuracy"] == 50.0
    assert scores["per_group"]["SOC"] is None and scores["per_group"]["LAN"] is None
    assert scores["per_group"]["TXT"] == 100.0 and scores["per_group"]["NO"] is None


def test_no_image_accuracy_without_images(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["4", "5"]}))
    scores = score_scienceqa(load_scienceqa(tmp_path, "test"), {"4": "The answer is A.", "5": "The answer is A."})
    assert scores["accuracy"] == 50.0 and scores["image_accuracy"] is None


def test_an_answer_that_is_an_option_with_an_article_is_that_option_not_a_letter():
    from vlfast.evaluate.scienceqa import parse_choice

    assert parse_choice("A square", ["circle", "square", "triangle"]) == (1, "text")

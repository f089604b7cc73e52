"""VQA accuracy: hand-computed cases for both rules (official vqaEval.py and LAVIS's copy)."""

import pytest

from vlfast.evaluate.vqa_metric import (
    RULES,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    vqa_scores,
)


def _mixed(prediction_matches: int, match: str = "dog", other: str = "cat") -> list[str]:
    return [match] * prediction_matches + [other] * (10 - prediction_matches)


def test_rules():
    assert RULES == ("official", "lavis")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hot-dog", "hot dog"),  # no space next to "-": replaced by a space
        ("hot - dog", "hot  dog"),  # a space next to "-": every "-" deleted, the spaces stay
        ("a-b -c", "ab c"),  # " -" occurs once, so both hyphens are deleted
        ("a-b (c)", "a b c "),  # each mark judged alone: "-" and ")" spaced, "(" (after a space) deleted
        ("1,000", "1000"),  # digit-comma-digit: the comma is deleted
        ("a-b 1,2", "ab 12"),  # digit-comma-digit anywhere deletes every mark, the hyphen too
        ("red,white", "red white"),  # a comma between letters becomes a space
        ("dog?", "dog "),  # trailing mark with no space around it becomes a space
        ("it's 5:30", "it's 5:30"),  # apostrophe and colon are not in the set
        ("3.5", "3.5"),  # a period before a digit is kept
        ("dog.", "dog"),  # a period not before a digit is deleted
        ("3.5.", "3.5"),  # only the final period goes
        ("5.x", "5x"),  # the intended look-behind is a look-ahead in the original, so this period goes too
        ("mr. smith", "mr smith"),  # period deleted, space kept
        ("." * 40 + "a", "." * 8 + "a"),  # re.UNICODE passed as count: at most 32 periods deleted
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Two Dogs", "2 dogs"),  # lowercase, number word to digit, article dropped
        ("a dog", "dog"),  # article dropped
        ("an  apple ", "apple"),  # split() collapses and trims whitespace
        ("none", "0"),  # "none" maps to 0
        ("ten", "10"),  # the map stops at ten
        ("eleven", "eleven"),  # ... so eleven stays a word
        ("dont", "don't"),  # contraction table adds the apostrophe
        ("it'dve", "it'd've"),  # keys may contain apostrophes (they survive process_punctuation)
        ("Im", "im"),  # the key "Im" has a capital and never matches after lowercasing
        ("Id've", "id've"),  # same for "Id've"
        ("somebody'd", "somebodyd"),  # the table's odd entry removes the apostrophe
        ("5 oclock", "5 o'clock"),  # word by word
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_answer():
    # newline/tab become spaces and are stripped, then punctuation, then digits/articles
    assert normalize_answer("\tThe Two Dogs!\n") == "2 dogs"
    assert normalize_answer("Yes.") == "yes"


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # k matches among 10: mean over j of min(1, (k - [answer j matches]) / 3)
        (0, 0.0),
        (1, 0.3),  # (1 x 0 + 9 x 1/3) / 10
        (2, 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
        (3, 0.9),  # (3 x 2/3 + 7 x 1) / 10
        (4, 1.0),  # every held-out set still has at least 3 matches
        (9, 1.0),
    ],
)
@pytest.mark.parametrize("rule", RULES)
def test_leave_one_out(matches, expected, rule):
    assert question_accuracy("dog", _mixed(matches), rule) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "answers", "official", "lavis"),
    [
        # unanimous GT: official normalizes nothing but whitespace, LAVIS normalizes the prediction anyway
        ("Yes.", ["yes"] * 10, 0.0, 1.0),
        ("yes", ["yes"] * 10, 1.0, 1.0),
        ("Two", ["2"] * 10, 0.0, 1.0),
        ("yes\n", ["yes"] * 10, 1.0, 1.0),  # whitespace is cleaned under both rules
        # mixed GT: "two" becomes "2" and meets 4 x "2" under both rules
        ("two", ["2"] * 4 + ["3"] * 6, 1.0, 1.0),
        # official also maps GT "two" to "2" (4 matches); LAVIS leaves GT words alone (2 matches -> 0.6)
        ("2", ["two"] * 2 + ["2"] * 2 + ["3"] * 6, 1.0, 0.6),
        # article in the prediction: both rules drop it, 3 matches -> 0.9
        ("a dog", _mixed(3), 0.9, 0.9),
        # article in the GT: only the official rule drops it
        ("dog", _mixed(3, match="the dog"), 0.9, 0.0),
        # hyphen spaced out on both sides under both rules
        ("hot-dog", _mixed(3, match="hot dog"), 0.9, 0.9),
        # "hot - dog" -> "hot  dog": official splits and rejoins GT, LAVIS keeps the double space in the GT
        ("hot dog", _mixed(3, match="hot - dog"), 0.9, 0.0),
        ("1,000", _mixed(3, match="1000"), 0.9, 0.9),  # digit-comma-digit: comma deleted
        ("Dog.", _mixed(3), 0.9, 0.9),  # final period deleted, lowercased
        ("3.5", _mixed(3, match="3.5"), 0.9, 0.9),  # decimal point kept
        ("dont", _mixed(3, match="don't"), 0.9, 0.9),  # apostrophe restored in the prediction
        ("Im", _mixed(3, match="im"), 0.9, 0.9),  # "Im" is not expanded, so it equals "im"
        ("Im", _mixed(3, match="I'm"), 0.0, 0.0),  # ... and never equals "i'm" / "I'm"
        # GT newline: official cleans GT whitespace, LAVIS does not ("dog\n" != "dog")
        ("dog", _mixed(3, match="dog\n"), 0.9, 0.0),
        ("\tdog\n", _mixed(3), 0.9, 0.9),  # prediction whitespace cleaned under both rules
    ],
)
def test_question_accuracy(prediction, answers, official, lavis):
    assert question_accuracy(prediction, answers) == pytest.approx(official, abs=1e-12)
    assert question_accuracy(prediction, answers, "official") == pytest.approx(official, abs=1e-12)
    assert question_accuracy(prediction, answers, "lavis") == pytest.approx(lavis, abs=1e-12)


def test_question_accuracy_errors():
    with pytest.raises(ValueError, match="'vqa2'"):
        question_accuracy("yes", ["yes"], rule="vqa2")
    with pytest.raises(ValueError, match="answers"):
        question_accuracy("yes", [])


def _annotation(question_id: int, question_type: str, answer_type: str, answers: list[str]) -> dict:
    return {
        "question_id": question_id,
        "question_type": question_type,
        "answer_type": answer_type,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


ANNOTATIONS = [
    _annotation(1, "is the", "yes/no", ["yes"] * 10),
    _annotation(2, "is the", "yes/no", ["yes"] * 10),
    _annotation(3, "how many", "number", ["2"] + ["3"] * 9),
]


@pytest.mark.parametrize("rule", RULES)
def test_vqa_scores(rule):
    # q1 1.0 (exact), q2 0.0 ("no" vs "yes"), q3 0.3 ("two" -> "2", one annotator agrees)
    scores = vqa_scores({1: "yes", 2: "no", 3: "two"}, ANNOTATIONS, rule)
    assert scores == {
        "accuracy": 43.33,  # 100 x 1.3 / 3
        "per_answer_type": {"yes/no": 50.0, "number": 30.0},
        "per_question_type": {"is the": 50.0, "how many": 30.0},
        "questions": 3,
        "rule": rule,
    }


def test_vqa_scores_default_rule_is_official():
    # "Yes." against unanimous "yes" scores 0 only under the official rule
    scores = vqa_scores({1: "Yes.", 2: "yes", 3: "2"}, ANNOTATIONS)
    assert scores["rule"] == "official"
    assert scores["per_answer_type"] == {"yes/no": 50.0, "number": 30.0}


def test_vqa_scores_rounding_ties():
    # 401 of 800 right: 100 x 401 / 800 = 50.125 exactly; Python 2 (official) rounds the half up, Python 3 (LAVIS)
    # rounds it to even
    annotations = [_annotation(i, "is the", "yes/no", ["yes"] * 10) for i in range(800)]
    predictions = {i: "yes" if i < 401 else "no" for i in range(800)}
    assert vqa_scores(predictions, annotations, "official")["accuracy"] == 50.13
    assert vqa_scores(predictions, annotations, "lavis")["accuracy"] == 50.12


def test_vqa_scores_id_mismatch():
    with pytest.raises(ValueError, match=r"no prediction for 1 question ids \(first: \[3\]\)"):
        vqa_scores({1: "yes", 2: "no"}, ANNOTATIONS)
    with pytest.raises(ValueError, match=r"predictions for 2 question ids \(first: \[7, 8\]\) that are not"):
        vqa_scores({1: "yes", 2: "no", 3: "2", 7: "x", 8: "y"}, ANNOTATIONS)


def test_vqa_scores_errors():
    with pytest.raises(ValueError, match="'vqa2'"):
        vqa_scores({1: "yes", 2: "no", 3: "2"}, ANNOTATIONS, rule="vqa2")
    with pytest.raises(ValueError, match="empty"):
        vqa_scores({}, [])
    with pytest.raises(ValueError, match="repeat"):
        vqa_scores({1: "yes"}, [ANNOTATIONS[0], ANNOTATIONS[0]])

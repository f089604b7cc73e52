"""VQA accuracy exactly as the official VQA evaluation code computes it, plus LAVIS's variant.

Sources: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` (master, a013f00, Python 2) for the
"official" rule, and salesforce/LAVIS ``lavis/common/vqa_tools/vqa_eval.py`` (Python 3) for the "lavis" rule. LAVIS
copied the official file before the official fix of March 2021 (a013f00), which changed which strings get normalized
and when; see ``question_accuracy``. Both rules share the tables below.
"""

from __future__ import annotations

import re
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal

RULES = ("official", "lavis")

# The 120-entry table of the original, quirks included: the keys "Id've", "I'dve", "Im" and "Ive" hold capitals and
# so never match the lowercased words they are compared with, "somebody'd" maps to "somebodyd", and "let's" and
# "she's" map to themselves.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# 21 marks; apostrophe, colon and period are not among them (periods have their own rule below).
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# re.ASCII: the official code ran under Python 2, where these patterns (compiled without re.UNICODE) match only the
# digits 0-9. LAVIS under Python 3 would also treat other Unicode digits as digits; we do not model that difference.
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)", re.ASCII)
# The original meant a look-behind "(?<=\d)" but wrote a look-ahead "(?!<=\d)", which always holds in front of a
# period; so in effect any period not followed by a digit is removed.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# The original calls periodStrip.sub("", text, re.UNICODE): the flag lands in the `count` argument, so at most
# re.UNICODE == 32 periods are removed per text. Kept on purpose.
_PERIOD_STRIP_COUNT = 32


def process_punctuation(text: str) -> str:
    """The original ``processPunctuation``: drop or space out the 21 marks, then drop periods not before a digit."""
    out = text
    # Both conditions look at the input text, not at the partly processed one, exactly as in the original.
    delete_marks = _COMMA_STRIP.search(text) is not None
    for mark in _PUNCTUATION:
        if delete_marks or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The original ``processDigitArticle``: lowercase, number words to digits, drop articles, add apostrophes."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    # The original looks up the contraction table only after the number map and the article filter.
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Full normalization of one answer; BLIP-2's GQA scoring applies it to both prediction and answer."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")


def _sequential_sum(values: list[float]) -> float:
    # Left-to-right addition as in the original; sum() uses compensated summation from Python 3.12 on, which can
    # change the last bit and, rarely, a rounded score.
    total = 0.0
    for value in values:
        total += value
    return total


def question_accuracy(prediction: str, answers: list[str], rule: str = "official") -> float:
    """Accuracy in [0, 1] of one prediction against the annotators' answers (10 in VQAv2).

    official: prediction and answers lose newlines/tabs and outer spaces; only when the answers are not all the same
    string do both also go through ``process_punctuation`` and ``process_digit_article``. So against ten identical
    answers "yes", the prediction "Yes." scores 0.
    lavis: the prediction is always fully normalized; the answers are left raw, except that ``process_punctuation``
    alone is applied to them when they are not all the same string.
    Then, for each answer j, acc_j = min(1, matches among the other answers / 3), and the result is the mean of acc_j.
    """
    _check_rule(rule)
    if not answers:
        raise ValueError("answers is empty")
    if rule == "official":
        prediction = _clean_whitespace(prediction)
        answers = [_clean_whitespace(answer) for answer in answers]
        if len(set(answers)) > 1:
            prediction = process_digit_article(process_punctuation(prediction))
            answers = [process_digit_article(process_punctuation(answer)) for answer in answers]
    else:
        prediction = normalize_answer(prediction)
        if len(set(answers)) > 1:
            answers = [process_punctuation(answer) for answer in answers]
    # The original leaves out the held-out answer by dict inequality; VQA answer dicts differ by answer_id, so this
    # is the same as leaving out by position.
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return _sequential_sum([min(1.0, (total - held_out) / 3) for held_out in matches]) / len(answers)


def _percent(accuracies: list[float], rule: str) -> float:
    value = 100 * _sequential_sum(accuracies) / len(accuracies)
    if rule == "official":
        # The official code runs under Python 2, whose round() takes exact halves away from zero.
        return float(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    # LAVIS runs under Python 3, whose round() takes exact halves to the even neighbour.
    return round(value, 2)


def _describe_ids(ids: list[int]) -> str:
    return f"{len(ids)} question ids (first: {ids[:5]})"


def vqa_scores(predictions: dict[int, str], annotations: list[dict], rule: str = "official") -> dict:
    """Score predictions against official VQA annotation dicts.

    annotations: dicts with question_id, question_type, answer_type and answers ([{answer, answer_id, ...}]).
    Like the official ``loadRes``, the predicted and annotated question ids must be the same set.
    Returns {"accuracy", "per_answer_type", "per_question_type", "questions", "rule"}; every accuracy is 100 x the
    mean of the unrounded per-question accuracies of its group, rounded to 2 decimals, as in ``setAccuracy``.
    """
    _check_rule(rule)
    if not annotations:
        raise ValueError("annotations is empty")
    annotated = [annotation["question_id"] for annotation in annotations]
    annotated_set = set(annotated)
    if len(annotated_set) != len(annotated):
        raise ValueError("annotations repeat a question_id")
    missing = [qid for qid in annotated if qid not in predictions]
    if missing:
        raise ValueError(f"no prediction for {_describe_ids(missing)}")
    extra = [qid for qid in predictions if qid not in annotated_set]
    if extra:
        raise ValueError(f"predictions for {_describe_ids(extra)} that are not in the annotations")

    overall: list[float] = []
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for annotation in annotations:
        answers = [answer["answer"] for answer in annotation["answers"]]
        accuracy = question_accuracy(predictions[annotation["question_id"]], answers, rule)
        overall.append(accuracy)
        by_answer_type[annotation["answer_type"]].append(accuracy)
        by_question_type[annotation["question_type"]].append(accuracy)
    return {
        "accuracy": _percent(overall, rule),
        "per_answer_type": {kind: _percent(values, rule) for kind, values in by_answer_type.items()},
        "per_question_type": {kind: _percent(values, rule) for kind, values in by_question_type.items()},
        "questions": len(overall),
        "rule": rule,
    }

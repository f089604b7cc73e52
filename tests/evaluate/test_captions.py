"""Caption scores against pycocoevalcap's own COCOEvalCap (PTB tokenizer, BLEU 1-4, METEOR, ROUGE-L,
CIDEr), the Python fallback without Java, SPICE's availability, NoCaps's per-domain scoring and COCO's
agg_metrics (REFERENCE.md 3.5, 3.6).

METEOR's Java process takes ~10 s to start (it loads its paraphrase table), so one METEOR process is
shared by every scorer in this module: its -stdio mode scores each EVAL line on its own."""
import json
import shutil
from pathlib import Path

import pycocoevalcap.eval as coco_eval_module
import pycocoevalcap.meteor.meteor as meteor_module
import pycocoevalcap.spice.spice as spice_module
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.eval import COCOEvalCap
from pycocoevalcap.rouge.rouge import Rouge
from pycocotools.coco import COCO

from vlfast.evaluate import captions
from vlfast.evaluate.captions import caption_scores, python_tokenize, score_coco, score_nocaps, spice_problem
from vlfast.evaluate.common import Benchmark, Sample

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

# Six images, 2 to 5 references each, with the punctuation, case, hyphens, apostrophes, brackets and
# numbers that the PTB tokenizer splits or drops.
REFERENCES = {
    9: ["A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground of a verdant area.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side."],
    25: ["A young girl inhales with the intent of blowing out a candle.",
         "A young girl is preparing to blow out her candle!",
         "A kid is to blow out the single candle in a bowl of birthday goodness."],
    42: ["TWO dogs playing (with a frisbee) in the park...", "Two dogs, one brown & one white, chase a disc."],
    77: ["The woman's umbrella isn't open; it's raining.", "A woman holds a closed umbrella in the rain.",
         "\"Rainy day\" -- a lady with an umbrella.", "Someone walking in the rain with an umbrella?"],
    108: ["A double-decker bus parked at the curb.", "A red double decker bus on a city street.",
          "An old-fashioned, two-story bus: parked near 3 cars."],
    300: ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate.",
          "A healthy meal: rice, broccoli, and meat."],
}
PREDICTIONS = {
    9: "A MAN riding a motorcycle, on a dirt road!",
    25: "a girl blowing out the candle on her cake...",
    42: "two dogs play with a frisbee in the park",
    77: "A woman's umbrella in the rain.",
    108: "a red double-decker bus parked on the street",
    300: "A plate of food (rice & broccoli).",
}
DOMAINS = {9: "in-domain", 25: "near-domain", 42: "out-domain", 77: "in-domain", 108: "near-domain",
           300: "near-domain"}


class _NoSpice:
    """COCOEvalCap's SPICE would download CoreNLP: stood in for (SPICE is not compared)."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


@pytest.fixture(scope="module")
def java(tmp_path_factory):
    """Java scoring with one shared METEOR process and no SPICE jars (an empty pycocoevalcap spice/lib)."""
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH: the PTB tokenizer and METEOR cannot run")
    spice_dir = tmp_path_factory.mktemp("spice")
    (spice_dir / "lib").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        meteor = meteor_module.Meteor()
        patch.setattr(meteor_module, "Meteor", lambda: meteor)
        patch.setattr(coco_eval_module, "Meteor", lambda: meteor)
        patch.setattr(coco_eval_module, "Spice", _NoSpice)
        patch.setattr(spice_module, "__file__", str(spice_dir / "spice.py"))
        yield spice_dir / "lib"


@pytest.fixture(scope="module")
def official(java, tmp_path_factory) -> dict:
    """pycocoevalcap's COCOEvalCap on a COCO-format GT file and a results file, as LAVIS runs it."""
    folder = tmp_path_factory.mktemp("coco")
    ids = sorted(REFERENCES)
    gt = {"info": {}, "licenses": [], "type": "captions", "images": [{"id": i} for i in ids],
          "annotations": [{"image_id": i, "id": 100 * i + k, "caption": c}
                          for i in ids for k, c in enumerate(REFERENCES[i])]}
    (folder / "gt.json").write_text(json.dumps(gt))
    (folder / "results.json").write_text(json.dumps([{"image_id": i, "caption": PREDICTIONS[i]} for i in ids]))
    coco = COCO(str(folder / "gt.json"))
    evaluator = COCOEvalCap(coco, coco.loadRes(str(folder / "results.json")))
    evaluator.evaluate()
    return evaluator.eval


@pytest.fixture(scope="module")
def ours(java) -> dict:
    return caption_scores(REFERENCES, PREDICTIONS)


def test_matches_coco_eval_cap(official, ours):
    assert {m: ours[m] for m in METRICS} == {m: official[m] for m in METRICS}
    assert ours["tokenizer"].startswith("PTB")
    assert ours["images"] == 6 and "METEOR" not in ours["unavailable"]
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] < 1 and 0 < ours["METEOR"] < 1 and ours["CIDEr"] > 0


def test_spice_unavailable_names_the_missing_jars(java, ours):
    reason = ours["unavailable"]["SPICE"]
    assert all(jar in reason for jar in JARS) and str(java) in reason
    assert "SPICE" not in ours


def test_spice_problem_none_with_both_jars(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(spice_module, "__file__", str(tmp_path / "spice.py"))
    (tmp_path / "lib" / JARS[0]).touch()
    assert JARS[1] in spice_problem()
    (tmp_path / "lib" / JARS[1]).touch()
    assert spice_problem() is None


def test_coco_agg_metrics(java, ours):
    benchmark = Benchmark([Sample(i, Path(f"{i}.jpg")) for i in REFERENCES], REFERENCES)
    scores = score_coco(benchmark, PREDICTIONS)
    assert {m: scores[m] for m in METRICS} == {m: ours[m] for m in METRICS}
    assert scores["agg_metrics"] == scores["CIDEr"] + scores["Bleu_4"]


def _nocaps() -> Benchmark:
    return Benchmark([Sample(i, Path(f"{i}.jpg")) for i in REFERENCES], REFERENCES, groups=DOMAINS)


def test_nocaps_domains_scored_on_their_own(java, ours):
    scores = score_nocaps(_nocaps(), PREDICTIONS)
    assert list(scores) == ["in-domain", "near-domain", "out-domain", "overall"]
    for domain in ("in-domain", "near-domain", "out-domain"):
        alone = {i: r for i, r in REFERENCES.items() if DOMAINS[i] == domain}
        assert scores[domain] == caption_scores(alone, PREDICTIONS), domain
        assert scores[domain]["images"] == len(alone)
    assert scores["overall"] == ours


# ---------------------------------------------------------------------------------------------------------------
# Without Java
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def no_java(monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)


def _python_tokenized(references: dict) -> tuple[dict, dict]:
    ids = sorted(references)
    return ({i: [python_tokenize(c) for c in references[i]] for i in ids},
            {i: [python_tokenize(PREDICTIONS[i])] for i in ids})


@pytest.mark.parametrize(("text", "tokens"), [
    ("A MAN, riding a Horse!", "a man riding a horse"),
    ("The woman's umbrella isn't open; it's raining.", "the woman's umbrella isn't open it's raining"),
    ("TWO dogs (with a frisbee) & a cat...", "two dogs ( with a frisbee ) & a cat"),
    ("\"Rainy day\" -- a lady?", "rainy day a lady"),  # PTB's `` and '' are dropped
    ("a double-decker bus: parked near 3 cars.", "a double decker bus parked near 3 cars"),
])
def test_python_tokenize(text, tokens):
    assert python_tokenize(text) == tokens


def test_fallback_without_java(no_java):
    scores = caption_scores(REFERENCES, PREDICTIONS)
    assert "python fallback" in scores["tokenizer"] and "not comparable" in scores["tokenizer"]
    assert scores["unavailable"] == {"METEOR": "needs java on PATH", "SPICE": "needs java on PATH"}
    assert "METEOR" not in scores and "SPICE" not in scores
    gts, res = _python_tokenized(REFERENCES)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [scores[f"Bleu_{n}"] for n in range(1, 5)] == bleu
    assert scores["ROUGE_L"] == Rouge().compute_score(gts, res)[0]
    assert scores["CIDEr"] == Cider().compute_score(gts, res)[0]
    assert scores["images"] == 6


def test_fallback_nocaps_idf_per_domain(no_java):
    """Each domain's CIDEr has its IDF from that domain's references alone: not the mean of the overall
    run's per-image scores over the domain."""
    scores = score_nocaps(_nocaps(), PREDICTIONS)
    gts, res = _python_tokenized(REFERENCES)
    _, per_image = Cider().compute_score(gts, res)
    overall = dict(zip(sorted(REFERENCES), per_image, strict=True))
    for domain in ("in-domain", "near-domain", "out-domain"):
        ids = [i for i in sorted(REFERENCES) if DOMAINS[i] == domain]
        alone_gts, alone_res = _python_tokenized({i: REFERENCES[i] for i in ids})
        assert scores[domain]["CIDEr"] == Cider().compute_score(alone_gts, alone_res)[0]
        assert scores[domain]["CIDEr"] != pytest.approx(sum(overall[i] for i in ids) / len(ids))
    assert scores["overall"]["CIDEr"] == Cider().compute_score(gts, res)[0]


def test_fallback_nocaps_leaves_out_absent_domains(no_java):
    near = {i: r for i, r in REFERENCES.items() if DOMAINS[i] == "near-domain"}
    benchmark = Benchmark([Sample(i, None) for i in near], near, groups={i: "near-domain" for i in near})
    scores = score_nocaps(benchmark, PREDICTIONS)
    assert list(scores) == ["near-domain", "overall"]
    assert scores["near-domain"] == scores["overall"]

"""Caption benchmarks: COCO (Karpathy split, as BLIP-2 / LAVIS evaluate it) and NoCaps, read from
their official files, scored by pycocoevalcap as COCOEvalCap does (REFERENCE.md 3.5, 3.6).

Scoring: every reference and prediction goes through pycocoevalcap's Stanford PTB tokenizer (Java),
then BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) and SPICE. Without Java, texts are tokenised in Python
(lower case, punctuation dropped; labelled in the scores) and METEOR and SPICE are reported
unavailable. SPICE also needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on
first use; where they are absent it is reported unavailable with that reason instead of downloading.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from vlfast.evaluate.common import Benchmark, Sample, load_json, read_records, require, write_records

KARPATHY = {"test": "coco_karpathy_test.json", "val": "coco_karpathy_val.json"}
NOCAPS = {"val": "nocaps_val_4500_captions.json"}
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
# What the PTB tokenizer's output is stripped of (pycocoevalcap tokenizer/ptbtokenizer.py).
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                   "...", ";"}


def coco_image_id(file_name: str) -> int:
    """LAVIS's rule: the digits after the last '_' of COCO_val2014_000000391895.jpg."""
    return int(Path(file_name).stem.rsplit("_", 1)[-1])


def load_coco_karpathy(root: Path, split: str, image_dir: Path | None = None) -> Benchmark:
    """`coco_karpathy_{split}.json`: a list of {image: 'val2014/COCO_val2014_...jpg', caption: [str, ...]};
    images under `image_dir` (default: root)."""
    path = root / KARPATHY[split]
    entries = load_json(path, list)
    samples, references = [], {}
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        require(isinstance(entry, dict) and isinstance(entry.get("image"), str), where, "'image', a file name")
        require(re.fullmatch(r"[0-9]+", Path(entry["image"]).stem.rsplit("_", 1)[-1]) is not None, where,
                "'image', a COCO file name ending in _<image id>.jpg")
        captions = entry.get("caption")
        captions = [captions] if isinstance(captions, str) else captions
        require(isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions), where,
                "'caption', a list of strings")
        image_id = coco_image_id(entry["image"])
        samples.append(Sample(image_id, (image_dir or root) / entry["image"]))
        references[image_id] = captions
    return Benchmark(samples, references)


def load_nocaps(root: Path, split: str, image_dir: Path | None = None) -> Benchmark:
    """`nocaps_val_4500_captions.json` (COCO format; images carry `domain`); images under `image_dir`
    (default: root/val)."""
    path = root / NOCAPS[split]
    data = load_json(path, dict)
    require(isinstance(data.get("images"), list), str(path), "a list 'images'")
    require(isinstance(data.get("annotations"), list), str(path), "a list 'annotations'")
    samples, domains = [], {}
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        require(isinstance(image, dict) and isinstance(image.get("id"), int), where, "an integer 'id'")
        require(isinstance(image.get("file_name"), str), where, "'file_name'")
        require(image.get("domain") in NOCAPS_DOMAINS, where, f"'domain', one of {NOCAPS_DOMAINS}")
        samples.append(Sample(image["id"], (image_dir or root / split) / image["file_name"]))
        domains[image["id"]] = image["domain"]
    references: dict[int, list[str]] = {}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        require(isinstance(annotation, dict) and annotation.get("image_id") in domains, where,
                "an 'image_id' of one of the images")
        require(isinstance(annotation.get("caption"), str), where, "a string 'caption'")
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    missing = [s.id for s in samples if s.id not in references]
    require(not missing, str(path), f"captions for every image (none for image ids {missing[:5]})")
    return Benchmark(samples, references, groups=domains)


def python_tokenize(text: str) -> str:
    """The fallback tokenisation: lower case, words and numbers kept, PTB's dropped punctuation gone
    (a double quote too: PTB writes it `` or '', which it drops)."""
    return " ".join(t for t in re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", text.lower())
                    if t not in PTB_PUNCTUATION and t != '"')


def spice_problem() -> str | None:
    """Why SPICE cannot run here, or None."""
    import pycocoevalcap.spice.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    needed = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    if not all(p.is_file() for p in needed):
        return (f"needs {needed[0].name} and {needed[1].name} in {lib} (pycocoevalcap downloads them from "
                "nlp.stanford.edu on first use; put them there to enable SPICE)")
    return None


def _tokenize(references: dict, predictions: dict, java: bool) -> tuple[dict, dict, str]:
    """(references, predictions, how): every text tokenised as COCOEvalCap does, or by the fallback."""
    ids = sorted(references)
    if not java:
        return ({i: [python_tokenize(c) for c in references[i]] for i in ids},
                {i: [python_tokenize(predictions[i])] for i in ids},
                "python fallback (no java on PATH): not comparable with published scores")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    return (tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids}),
            tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids}),
            "PTB (Stanford CoreNLP 3.4.1, pycocoevalcap)")


def _metrics(gts: dict, res: dict, how: str, meteor, spice: bool) -> dict:
    """COCOEvalCap's scorers on tokenised texts; meteor: a running METEOR scorer, None without Java."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict = {"images": len(gts), "unavailable": {}, "tokenizer": how}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores |= {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    if meteor is not None:
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    else:
        scores["unavailable"]["METEOR"] = "needs java on PATH"
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    problem = "needs java on PATH" if meteor is None else spice_problem() if spice else "not asked for"
    if problem is None:
        from pycocoevalcap.spice.spice import Spice

        try:
            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except (subprocess.CalledProcessError, OSError, ValueError) as error:
            problem = f"SPICE failed: {error}"
    if problem is not None:
        scores["unavailable"]["SPICE"] = problem
    return scores


def grouped_caption_scores(references: dict, predictions: dict, groups: dict[str, list] | None = None, *,
                           spice: bool = True) -> dict:
    """COCOEvalCap's metrics (fractions, as pycocoevalcap reports them) of one prediction per id
    against that id's references, for all ids and for each group of ids on its own (CIDEr's IDF from
    the group's references). Texts are tokenised once and METEOR started once. 'tokenizer' says how
    texts were tokenised, 'unavailable' names the metrics that could not run and why."""
    java = shutil.which("java") is not None
    gts, res, how = _tokenize(references, predictions, java)
    meteor = None
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
    scores = {}
    for group, ids in (groups or {}).items():
        if ids:
            scores[group] = _metrics({i: gts[i] for i in ids}, {i: res[i] for i in ids}, how, meteor, spice)
    scores["overall"] = _metrics(gts, res, how, meteor, spice)
    return scores


def caption_scores(references: dict, predictions: dict, *, spice: bool = True) -> dict:
    """grouped_caption_scores of all ids together."""
    return grouped_caption_scores(references, predictions, spice=spice)["overall"]


def score_coco(benchmark: Benchmark, predictions: dict) -> dict:
    scores = caption_scores(benchmark.references, predictions)
    scores["agg_metrics"] = scores["CIDEr"] + scores["Bleu_4"]  # LAVIS's model-selection score
    return scores


def score_nocaps(benchmark: Benchmark, predictions: dict) -> dict:
    """Each domain scored on its own (CIDEr's IDF from that domain's references, as VPGTrans's
    nocaps task does), then all images together."""
    domains = {domain: [i for i, d in benchmark.groups.items() if d == domain] for domain in NOCAPS_DOMAINS}
    return grouped_caption_scores(benchmark.references, predictions, domains)


def write_captions(predictions: dict, path: Path) -> None:
    """COCO's results format: a list of {image_id, caption}."""
    write_records(predictions, path, "image_id", "caption")


def read_captions(path: Path) -> dict:
    return read_records(path, "image_id", int, "caption")

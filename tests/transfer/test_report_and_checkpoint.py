"""The speed-up arithmetic, CIDEr-D, and atomic checkpoints."""
from __future__ import annotations

import pytest
import torch

from vlfast.training import checkpoint
from vlfast.transfer.evaluate import cider, tokenize_for_cider
from vlfast.transfer.report import build, first_reaching, table


def history(scores, metric="val_loss", seconds=10.0, every=4, steps_per_epoch=4):
    """A run validated every `every` steps, `seconds` of training apart."""
    entries = [{"epoch": (i + 1) * every // steps_per_epoch if (i + 1) * every % steps_per_epoch == 0
                else (i + 1) * every / steps_per_epoch, "step": (i + 1) * every, metric: s, "wall_s": seconds * (i + 1)}
               for i, s in enumerate(scores)]
    return {"history": entries, "wall_s": seconds * len(scores), "steps": every * len(scores)}


def test_speedup_is_scratch_best_epoch_over_transfer_epoch_to_reach_it():
    results = {"scratch": history([0.9, 0.8, 0.7, 0.65, 0.66, 0.65]),
               "transfer": history([0.8, 0.66, 0.64, 0.6], seconds=5)}
    report = build(results, "val_loss", 1, {})
    assert report["runs"]["scratch"]["best"] == 0.65 and report["runs"]["scratch"]["epochs_to_target"] == 4
    assert report["runs"]["transfer"]["epochs_to_target"] == 3
    assert report["speedup"] == pytest.approx(4 / 3)
    assert report["speedup_wall"] == pytest.approx(40 / 15)
    assert report["runs"]["transfer"]["seconds_per_step"] == pytest.approx(20 / 16)
    assert report["unit"] == "epoch" and report["runs"]["transfer"]["steps_to_target"] == 12
    lines = table(report).splitlines()
    assert lines[1].startswith(" step  epoch ") and lines[2].startswith("    4      1 ")
    assert "reaches it at step 12, epoch 3 (15 s): speed-up 1.33x in epochs" in table(report)
    assert report["speedup_epochs"] == pytest.approx(4 / 3) and "epoch ends only (VPGTrans's count; " in table(report)


def test_validations_between_epoch_ends_refine_the_speedup_and_the_epoch_count_stays_the_papers():
    # Validated every half epoch: scratch's best (0.65) is first reached at epoch 3; the transfer run
    # reaches it half-way through epoch 2 (step 6), but at an epoch end only at epoch 3.
    results = {"scratch": history([0.9, 0.8, 0.75, 0.7, 0.66, 0.65], every=2),
               "transfer": history([0.8, 0.7, 0.66, 0.64, 0.6, 0.59], seconds=5, every=2)}
    report = build(results, "val_loss", 1, {})
    assert report["runs"]["transfer"]["epochs_to_target"] == pytest.approx(2.0) and report["speedup"] == 12 / 8
    results["transfer"] = history([0.8, 0.66, 0.64, 0.6, 0.6, 0.59], seconds=5, every=2)
    report = build(results, "val_loss", 1, {})
    assert report["speedup"] == pytest.approx(12 / 6) and report["runs"]["transfer"]["epochs_to_target"] == 1.5
    assert report["speedup_epochs"] == pytest.approx(3 / 2)
    text = table(report)
    assert "    6   1.50 " in text and "speed-up 2.00x in epochs" in text
    assert "count; stage 1 is an epoch): 1.50x" in text


def test_a_step_based_report_counts_in_steps_with_the_epochs_alongside():
    results = {"scratch": history([0.9, 0.8, 0.7, 0.65, 0.66, 0.65], every=3),
               "transfer": history([0.8, 0.66, 0.64, 0.6], seconds=5, every=3)}
    report = build(results, "val_loss", 1, {}, unit="step")
    assert report["unit"] == "step" and report["speedup"] == pytest.approx(12 / 9)
    scratch, transfer = report["runs"]["scratch"], report["runs"]["transfer"]
    assert (scratch["best_step"], scratch["best_epoch"], transfer["steps_to_target"]) == (12, 3, 9)
    assert transfer["epochs_to_target"] == pytest.approx(2.25)
    text = table(report)
    assert text.splitlines()[1].startswith(" step  epoch ") and "    9   2.25 " in text
    assert "reaches it at step 9, epoch 2.25 (15 s): speed-up 1.33x in steps, 2.67x in wall time" in text


def test_higher_is_better_metrics_and_a_target_never_reached():
    assert first_reaching(history([0.1, 0.5, 0.4], "cider")["history"], "cider", 0.45)["epoch"] == 2
    results = {"scratch": history([0.2, 0.6], "cider"), "transfer": history([0.3, 0.5], "cider")}
    report = build(results, "cider", 2, {})
    assert report["speedup"] is None and report["runs"]["transfer"]["epochs_to_target"] is None
    assert report["runs"]["scratch"]["compute_hours"] == pytest.approx(2 * 20 / 3600)


def test_cider_known_values():
    # Hand-checked: a candidate equal to its only reference has cosine 1 for each n-gram order n = 1..4
    # that it has, and CIDEr-D is 10 x their mean: 10 for four words, 7.5 for three (no 4-grams).
    assert cider([["a big red circle"], ["a small blue square"]], ["a big red circle", "a small blue square"]) \
        == pytest.approx(10.0)
    references = [["a red circle"], ["a blue square"]]
    assert cider(references, ["a red circle", "a blue square"]) == pytest.approx(7.5)
    assert cider(references, ["green triangle", "yellow star"]) == 0.0
    assert 0 < cider(references, ["a red square", "a blue circle"]) < 10
    assert tokenize_for_cider("A Red, circle.") == "a red , circle ."
    with pytest.raises(ValueError, match="2 reference lists for 1 candidates"):
        cider(references, ["a"])


def test_checkpoints_are_atomic_and_the_latest_wins(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    assert checkpoint.load(directory) is None
    checkpoint.save(directory, {"w": torch.ones(2)}, {"step": 1})
    checkpoint.save(directory, {"w": torch.full((2,), 2.0)}, {"step": 2})
    weights, state = checkpoint.load(directory)
    assert state["step"] == 2 and torch.equal(weights["w"], torch.full((2,), 2.0))
    assert len(list(directory.glob("checkpoint-*"))) == 1

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", crash)  # dies half-way through writing the third
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(directory, {"w": torch.zeros(2)}, {"step": 3})
    weights, state = checkpoint.load(directory)
    assert state["step"] == 2 and torch.equal(weights["w"], torch.full((2,), 2.0))

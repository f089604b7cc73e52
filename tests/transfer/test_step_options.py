"""Gradient accumulation, clipping and checkpointing in `python -m vlfast.transfer`."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.transfer.conftest import assert_same_vpgs, run_cli
from vlfast.training import epoch_steps
from vlfast.transfer.__main__ import main

ARGUMENTS = ["--preset", "smoke", "--no-baseline"]


def weights(out, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / run / "vpg" / "model.safetensors"))


def test_steps_of_accumulated_batches_hold_the_large_batches_examples():
    large = epoch_steps(100, 16, 1, world=1, seed=3)
    small = epoch_steps(100, 4, 4, world=1, seed=3)
    assert len(large) == len(small) == 7
    assert [torch.cat(step).tolist() for step in small] == [torch.cat(step).tolist() for step in large]


def test_accumulating_four_batches_equals_one_batch_four_times_as_large(tiny_defaults, tmp_path):
    large = main([*ARGUMENTS, "--batch-size", "16", "--output-dir", str(tmp_path / "large")])
    small = main([*ARGUMENTS, "--batch-size", "4", "--grad-accum", "4", "--output-dir", str(tmp_path / "small")])
    assert small["runs"]["transfer"]["history"][0]["val_loss"] == pytest.approx(
        large["runs"]["transfer"]["history"][0]["val_loss"], rel=1e-5)
    assert_same_vpgs(tmp_path / "large", tmp_path / "small")
    # Without accumulation, batches of 4 take four times the steps and end elsewhere.
    main([*ARGUMENTS, "--batch-size", "4", "--output-dir", str(tmp_path / "alone")])
    steps = {name: json.loads((tmp_path / name / "transfer" / "result.json").read_text())["steps"]
             for name in ("alone", "small", "large")}
    assert steps["alone"] == 4 * steps["small"] == 4 * steps["large"] == 64
    assert not torch.allclose(weights(tmp_path / "alone", "transfer")["projector.weight"],
                              weights(tmp_path / "large", "transfer")["projector.weight"], atol=1e-3)


def test_clipping_changes_the_run_and_bad_values_are_refused(tiny_defaults, tmp_path):
    main([*ARGUMENTS, "--output-dir", str(tmp_path / "free")])
    main([*ARGUMENTS, "--max-grad-norm", "1e-4", "--output-dir", str(tmp_path / "clipped")])
    assert not torch.allclose(weights(tmp_path / "free", "source")["projector.weight"],
                              weights(tmp_path / "clipped", "source")["projector.weight"], atol=1e-4)
    for option, value, message in (("--grad-accum", "0", "grad_accum must be a positive number, got 0"),
                                   ("--max-grad-norm", "-1", "max_grad_norm must be 0 or more, got -1.0")):
        with pytest.raises(SystemExit, match=message):
            main([*ARGUMENTS, option, value, "--output-dir", str(tmp_path / "bad")])


def test_two_processes_accumulating_reach_one_process_with_the_whole_batch(tiny_defaults, tmp_path):
    """DDP skips the gradient all-reduce on all but the last accumulated batch (no_sync)."""
    one = run_cli(tiny_defaults, *ARGUMENTS, "--batch-size", "16", "--output-dir", str(tmp_path / "one"))
    two = run_cli(tiny_defaults, *ARGUMENTS, "--batch-size", "8", "--grad-accum", "2", "--output-dir",
                  str(tmp_path / "two"), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert_same_vpgs(tmp_path / "one", tmp_path / "two")


def test_checkpointing_trains_to_the_same_weights(tiny_defaults, tmp_path):
    main([*ARGUMENTS, "--output-dir", str(tmp_path / "kept")])
    main([*ARGUMENTS, "--grad-checkpointing", "--output-dir", str(tmp_path / "recomputed")])
    assert_same_vpgs(tmp_path / "kept", tmp_path / "recomputed")
    with pytest.raises(SystemExit, match="grad_checkpointing must be off with the memory connector or --mma"):
        main([*ARGUMENTS, "--grad-checkpointing", "--connector", "memory", "--output-dir", str(tmp_path / "bad")])


def test_a_step_budget_with_validations_between_epoch_ends(tiny_defaults, tmp_path, capsys):
    """The smoke preset takes 8 steps an epoch (64 captions + 64 questions in batches of 16)."""
    out = tmp_path / "run"
    report = main(["--preset", "smoke", "--max-steps", "10", "--eval-every", "3", "--output-dir", str(out)])
    assert report["unit"] == "step"
    for run in ("transfer", "scratch"):
        history = report["runs"][run]["history"]
        assert [(h["step"], h["epoch"]) for h in history] == [(3, 0.375), (6, 0.75), (8, 1), (9, 1.125), (10, 1.25)]
        assert json.loads((out / run / "result.json").read_text())["steps"] == 10
    # Stage 1 is 10 x 1/2 epochs = 5 steps; the source run (not compared) keeps its epoch and validates at its end.
    assert [h["stage"] for h in report["runs"]["transfer"]["history"]] == ["stage 1", *["stage 2"] * 4]
    assert [h["step"] for h in report["runs"]["source"]["history"]] == [8]
    assert report["runs"]["scratch"]["best_step"] == report["runs"]["scratch"]["steps_to_target"]
    printed = capsys.readouterr().out
    assert " step  epoch " in printed and ("x in steps" in printed or report["speedup"] is None)
    with pytest.raises(SystemExit, match="max_steps must be at least 2"):
        main(["--preset", "smoke", "--max-steps", "1", "--output-dir", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="eval_every must be a positive number"):
        main(["--preset", "smoke", "--eval-every", "0", "--output-dir", str(tmp_path / "bad")])

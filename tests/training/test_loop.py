"""The shared run machinery (vlfast.training) on a toy regression: stage boundaries, step budgets,
validation points, and resuming after a stop signal to the uninterrupted numbers."""
from __future__ import annotations

import ast
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vlfast.training import Interrupted, Run, Stage, epoch_steps, seed_for
from vlfast.training.distributed import Processes
from vlfast.training.loop import stage_ends

ROOT = Path(__file__).resolve().parents[2]


def test_stage_ends_by_epochs_and_by_a_step_budget():
    assert stage_ends([1, 5], 8) == [8, 48]
    assert stage_ends([1, 5], 8, max_steps=60) == [10, 60]  # in proportion to the epochs
    assert stage_ends([1, 99], 8, max_steps=10) == [1, 10]  # every stage gets a step
    assert stage_ends([99, 1], 8, max_steps=10) == [9, 10]
    assert stage_ends([3], 8, max_steps=7) == [7]
    with pytest.raises(ValueError, match="fewer steps than the run's 2 stages"):
        stage_ends([1, 1], 8, max_steps=1)


class Signals:
    received = None


def toy_run(directory: Path, stop_at: int | None = None, **budget) -> tuple[Run, nn.Module]:
    """A linear regression in two stages (AdamW then SGD with cosine decay) on 40 examples in
    batches of 8 (5 steps an epoch), with noise from the global RNG in every step."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    inputs, targets = torch.randn(40, 4), torch.randn(40, 1)
    signals = Signals()

    def start(stage: Stage, steps: int):
        optimizer = (torch.optim.AdamW(model.parameters(), lr=0.05) if stage.name == "first"
                     else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def step(stage: Stage, batches: list[torch.Tensor]) -> dict[str, float]:
        rows = torch.cat(batches)
        noisy = inputs[rows] + 0.1 * torch.randn(len(rows), 4)
        loss = nn.functional.mse_loss(model(noisy), targets[rows])
        loss.backward()
        if stop_at is not None and step.calls == stop_at:
            signals.received = signal.SIGTERM
        step.calls += 1
        return {"mse_loss": loss.item(), "loss": loss.item()}

    step.calls = 1

    def evaluate(at: int, epoch: int | float) -> dict:
        with torch.no_grad():
            return {"val": nn.functional.mse_loss(model(inputs), targets).item()}

    run = Run("toy", directory, [Stage("first", 1), Stage("second", 3)], 5,
              lambda epoch, first: iter(epoch_steps(40, 8, 1, 1, seed_for(0, "toy", epoch))[first:]),
              dict(model.named_parameters()),
              start, step, evaluate, Processes(0, 1, torch.device("cpu")), signals, checkpoint_every=4, **budget)
    return run, model


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "wall_s"} for h in history]


def test_epochs_give_a_validation_at_each_epoch_end(tmp_path):
    result = toy_run(tmp_path)[0].train()
    assert result["steps"] == 20
    assert [(h["epoch"], h["step"], h["stage"]) for h in result["history"]] == [
        (1, 5, "first"), (2, 10, "second"), (3, 15, "second"), (4, 20, "second")]


def test_max_steps_and_eval_every(tmp_path):
    result = toy_run(tmp_path, max_steps=12, eval_every=4)[0].train()
    assert result["steps"] == 12  # stage "first" ends at 12 x 1/4 = 3
    assert [(h["step"], h["epoch"], h["stage"]) for h in result["history"]] == [
        (4, 0.8, "second"), (5, 1, "second"), (8, 1.6, "second"), (10, 2, "second"), (12, 2.4, "second")]
    short = toy_run(tmp_path / "short", max_steps=3)[0].train()  # shorter than an epoch: validated at its end
    assert [(h["step"], h["epoch"], h["stage"]) for h in short["history"]] == [(3, 0.6, "second")]


@pytest.mark.parametrize("stop_at", [2, 3, 5, 8, 11])  # mid-stage, a stage's end, an epoch's end, validations
def test_a_stopped_run_resumes_to_the_same_numbers(tmp_path, stop_at):
    budget = {"max_steps": 12, "eval_every": 4}
    run, model = toy_run(tmp_path / "whole", **budget)
    whole = run.train()
    run, _ = toy_run(tmp_path / "cut", stop_at=stop_at, **budget)
    with pytest.raises(Interrupted, match="SIGTERM during the toy run"):
        run.train()
    run, resumed_model = toy_run(tmp_path / "cut", **budget)
    resumed = run.train()
    assert without_time(resumed["history"]) == without_time(whole["history"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


def imported_modules(package: str) -> set[str]:
    """The vlfast modules that the source files of vlfast/<package> import."""
    found = set()
    for path in (ROOT / "vlfast" / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
    return found


def test_transfer_and_pformer_do_not_import_each_other():
    assert not {m for m in imported_modules("pformer") if m.startswith("vlfast.transfer")}
    assert not {m for m in imported_modules("transfer") if m.startswith("vlfast.pformer")}
    for package, other in (("pformer", "transfer"), ("transfer", "pformer")):
        code = (f"import sys, vlfast.{package}.__main__; "
                f"sys.exit(any(m.startswith('vlfast.{other}') for m in sys.modules))")
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0, package

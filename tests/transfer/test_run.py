"""`python -m vlfast.transfer --preset smoke` end to end, on tiny stand-ins for the default LMs."""
from __future__ import annotations

import json

import pytest

from vlfast import defaults
from vlfast.transfer.__main__ import main
from vlfast.transfer.run import epochs_to_reach


@pytest.fixture
def tiny_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("VLFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(defaults, "LMS", {
        "source": defaults.LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=3, seed=1),
        "target": defaults.LMSpec(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=96, steps=3, seed=2),
    })


def test_smoke_run_writes_the_report(tiny_defaults, tmp_path, capsys):
    main(["--preset", "smoke", "--output-dir", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["runs"]) == {"source", "transfer", "scratch"}
    assert len(report["runs"]["scratch"]["history"]) == len(report["runs"]["transfer"]["history"]) == 2
    assert "speedup" in report and report["target_metric"].startswith("val caption loss")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["epochs"] == 2 and config["train_images"] == 64
    assert "scratch best" in capsys.readouterr().out


def test_no_baseline(tiny_defaults, tmp_path):
    main(["--preset", "smoke", "--no-baseline", "--output-dir", str(tmp_path / "run")])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "scratch" not in report["runs"] and "speedup" not in report


def test_epochs_to_reach():
    assert epochs_to_reach([0.9, 0.7, 0.5], 0.7) == 2
    assert epochs_to_reach([0.9, 0.8], 0.5) is None

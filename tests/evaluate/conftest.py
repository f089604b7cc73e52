"""A model trained by `python -m vlfast.transfer` on the tiny default stand-ins, the same model with
an untrained VPG, and the shapes scenes exported in every benchmark's format."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_LMS
from vlfast import defaults
from vlfast.data.shapes_benchmarks import export
from vlfast.models import VPG, VisionLanguageModel

SCENES = 16


@pytest.fixture(scope="module")
def models(tiny_cache, tmp_path_factory) -> dict[str, Path]:
    """{'trained': a run directory, 'untrained': a model directory}. The source VPG trains 4 epochs
    instead of the smoke preset's 1: the transfer carries what it learnt, and after 1 epoch on these
    3-step stand-in LMs that was not enough for captions to depend on the image."""
    from vlfast.transfer.__main__ import main

    root = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_CACHE", str(tiny_cache))
        patch.setattr(defaults, "LMS", TINY_LMS)
        main(["--preset", "smoke", "--no-baseline", "--source-epochs", "4", "--output-dir", str(root / "run")])
    model = VisionLanguageModel.from_pretrained(root / "run" / "transfer" / "model")
    torch.manual_seed(0)
    model.vpg = VPG(model.vpg.config)
    model.save_pretrained(root / "untrained")
    return {"trained": root / "run", "untrained": root / "untrained"}


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> dict[str, Path]:
    """task -> its folder of `SCENES` exported test-split scenes."""
    return export(tmp_path_factory.mktemp("benchmarks"), SCENES)

"""The embedded default parts: built once into VLFAST_CACHE, then loaded; interrupted builds leave
nothing behind."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlfast import defaults
from vlfast.data.shapes import vocabulary


@pytest.fixture
def quick(monkeypatch, tmp_path):
    monkeypatch.setenv("VLFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(defaults, "LMS", {
        "source": defaults.LMSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=3, seed=1),
        "target": defaults.LMSpec(hidden_size=48, num_layers=2, num_heads=2, intermediate_size=96, steps=3, seed=2),
    })
    return defaults.cache_root()


def test_builds_once_then_loads(quick):
    manifest = defaults.build_all()
    assert json.loads((quick / "manifest.json").read_text()) == manifest
    assert set(manifest["parts"]) == {"tokenizer", "vision-tower", "lm-source", "lm-target"}
    assert manifest["lms"]["target"]["parameters"] > manifest["lms"]["source"]["parameters"]
    stamp = (quick / "lm-source" / "model.safetensors").stat().st_mtime_ns
    first = defaults.default_lm("source")
    again = defaults.default_lm("source")
    assert (quick / "lm-source" / "model.safetensors").stat().st_mtime_ns == stamp
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b) and not a.requires_grad


def test_tokenizer_covers_the_captions(quick):
    tokenizer = defaults.shapes_tokenizer()
    ids = tokenizer("a small red circle in the top left", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer) == len(vocabulary()) + len(defaults.SPECIAL_TOKENS)
    text = defaults.pretraining_text(np.random.default_rng(0))
    assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]


def test_interrupted_build_leaves_no_part(quick, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(defaults, "_train_lm", crash)
    with pytest.raises(KeyboardInterrupt):
        defaults.default_lm("target")
    assert not (quick / "lm-target").exists()
    assert not list(quick.glob("lm-target.partial-*"))
    with pytest.raises(ValueError, match="name must be one of"):
        defaults.default_lm("teacher")

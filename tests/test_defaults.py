"""The embedded default parts: built once into VLFAST_CACHE, then loaded; interrupted builds leave
nothing behind; the default LMs come from the weights the package ships."""
from __future__ import annotations

import dataclasses
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

    monkeypatch.setattr(defaults, "_pretrain", crash)
    with pytest.raises(KeyboardInterrupt):
        defaults.default_lm("target")
    assert not (quick / "lm-target").exists()
    assert not list(quick.glob("lm-target.partial-*"))
    with pytest.raises(ValueError, match="name must be one of"):
        defaults.default_lm("teacher")


def test_the_default_lms_load_the_shipped_weights_without_pretraining(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    def crash(*args, **kwargs):
        raise AssertionError("pretrained although the package ships the weights")

    monkeypatch.setenv("VLFAST_CACHE", str(tmp_path))
    monkeypatch.setattr(defaults, "_pretrain", crash)
    tokenizer = defaults.shapes_tokenizer()
    for name in defaults.LMS:
        shipped = load_file(defaults.SHIPPED / f"{name}.safetensors")
        lm = defaults.default_lm(name)
        assert lm.state_dict().keys() == shipped.keys()
        for key, value in lm.state_dict().items():
            assert value.dtype == torch.float32 and torch.equal(value, shipped[key].float()), key
        # Pretrained: the captions after the scene's words cost well under a fresh LM's ~ln(vocabulary).
        batch = tokenizer([defaults.pretraining_text(np.random.default_rng(7)) for _ in range(16)], padding=True,
                          return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            loss = lm(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        assert loss < 1.0 < np.log(len(tokenizer)), (name, loss)


def test_pretrain_writes_weights_that_stand_in_only_for_their_spec(quick, monkeypatch, tmp_path):
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(defaults, "SHIPPED", shipped)
    defaults.main(["pretrain", "--output", str(shipped)])
    assert sorted(p.name for p in shipped.iterdir()) == ["source.safetensors", "target.safetensors"]
    pretrained = defaults.default_lm("target")  # loaded from the files just written

    def crash(*args, **kwargs):
        raise AssertionError("pretrained although matching weights were shipped")

    monkeypatch.setattr(defaults, "_pretrain", crash)
    for a, b in zip(defaults.default_lm("source", quick / "elsewhere").parameters(),
                    defaults.default_lm("source").parameters(), strict=True):
        assert torch.equal(a, b)
    # Another spec (another seed) is not what the files hold: it is pretrained, not loaded.
    monkeypatch.setitem(defaults.LMS, "target", dataclasses.replace(defaults.LMS["target"], seed=5))
    with pytest.raises(AssertionError, match="pretrained although"):
        defaults.default_lm("target", quick / "other")
    assert pretrained.config.hidden_size == 48

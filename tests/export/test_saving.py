"""VisionLanguageModel.save_pretrained / from_pretrained: round trips give bit-equal outputs for every
connector, MMA and T5; frozen parts are referred to or copied; wrong directories say what they hold."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Blip2VisionModel

from tests.export.conftest import tiny_llm, tiny_model, tiny_tower, tiny_vpg
from vlfast import defaults
from vlfast.data.collate import CaptionCollator
from vlfast.models import VisionLanguageModel
from vlfast.models.vlm import LLM_DTYPES
from vlfast.patch import merge_mma


def outputs(model: VisionLanguageModel, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on two prompted captions and greedy continuations, for two random images."""
    collate = CaptionCollator(tokenizer, encoder_decoder=model.is_encoder_decoder)
    batch = collate.tokenize(["a red circle", "two shapes : a blue square"], ["what colour is it ?", ""])
    pixels = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    decoder = {"decoder_input_ids": batch["labels"].clamp(min=0)} if model.is_encoder_decoder else {}
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixels, **decoder)
    prefix = torch.tensor([collate.prefix_ids("what colour is it ?")] * 2)
    new = model.generate(prefix, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return logits, new


@pytest.mark.parametrize("kind, connector, mma", [
    ("llama", "input", None), ("opt", "memory", None), ("llama", "memory", {"rank": 4, "scale": 0.5}),
    ("t5", "input", None),
])
def test_round_trip_is_bit_equal(tokenizer, tmp_path, kind, connector, mma):
    model = tiny_model(kind, tokenizer, connector=connector, mma=mma)
    model.save_pretrained(tmp_path / "model")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "model")
    assert not loaded.training and loaded.connector == connector
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["llm"]["copy"] == "llm" and config["vision"]["copy"] == "vision"  # built in memory: copied
    assert config["llm_dtype"] == "fp32"
    if mma:
        assert config["mma"] == {"rank": 4, "groups": 2, "num_experts": 2, "temperature": 10.0, "scale": 0.5,
                                 "dropout_p": 0.1}
    for ours, theirs in zip(outputs(model, tokenizer), outputs(loaded, tokenizer), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind, dtype", [("llama", "bf16"), ("t5", "fp16")])
def test_a_half_precision_llm_round_trips(tokenizer, tmp_path, kind, dtype):
    """Loaded in half precision as vlfast.transfer loads it (transformers keeps T5's wo in fp32), saved
    by reference, and loaded back the same way: bit-equal."""
    tiny_llm(kind, tokenizer).save_pretrained(tmp_path / "llm")
    auto = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    llm = auto.from_pretrained(tmp_path / "llm", dtype=LLM_DTYPES[dtype])
    model = VisionLanguageModel(tiny_tower(), tiny_vpg(llm.get_input_embeddings().embedding_dim), llm,
                                tokenizer=tokenizer, llm_dtype=dtype).eval()
    model.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["llm_dtype"] == dtype
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "model")
    assert {p.dtype for p in loaded.llm.parameters()} == {p.dtype for p in llm.parameters()}
    for ours, theirs in zip(outputs(model, tokenizer), outputs(loaded, tokenizer), strict=True):
        assert torch.equal(ours, theirs)


def test_frozen_parts_with_a_directory_are_referred_to(tokenizer, tmp_path):
    tiny_llm("llama", tokenizer).save_pretrained(tmp_path / "llm")
    tiny_tower().save_pretrained(tmp_path / "tower")
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "llm")
    tower = Blip2VisionModel.from_pretrained(tmp_path / "tower")
    model = VisionLanguageModel(tower, tiny_vpg(40), llm, connector="memory", tokenizer=tokenizer).eval()
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["llm"]["path"] == str((tmp_path / "llm").resolve()) and not (tmp_path / "model" / "llm").exists()
    assert config["vision"]["path"] == str((tmp_path / "tower").resolve())
    assert torch.equal(outputs(model, tokenizer)[0], outputs(VisionLanguageModel.from_pretrained(tmp_path / "model"),
                                                             tokenizer)[0])

    model.save_pretrained(tmp_path / "copied", copy_frozen=True)
    assert json.loads((tmp_path / "copied" / "config.json").read_text())["llm"]["copy"] == "llm"
    # The copy holds the LLM alone, without the MemVP module added to it.
    copied = AutoModelForCausalLM.from_pretrained(tmp_path / "copied" / "llm")
    assert not any("vlfast" in k for k in copied.state_dict())

    changed = tiny_llm("llama", tokenizer)  # the referred directory changes: one weight matrix is fine-tuned
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    changed.save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="LLM loaded from .*llm is not the one this model was saved with"):
        VisionLanguageModel.from_pretrained(tmp_path / "model")
    assert torch.equal(outputs(model, tokenizer)[0],
                       outputs(VisionLanguageModel.from_pretrained(tmp_path / "copied"), tokenizer)[0])
    for path in (tmp_path / "llm").iterdir():
        path.unlink()
    (tmp_path / "llm").rmdir()
    with pytest.raises(FileNotFoundError, match="its LLM, .*llm, is gone .*copy_frozen=True"):
        VisionLanguageModel.from_pretrained(tmp_path / "model")


def test_embedded_default_parts_are_copied(tiny_defaults, tmp_path):
    """They are tiny, and another vlfast version or machine builds them differently."""
    tokenizer, llm, tower = defaults.shapes_tokenizer(), defaults.default_lm("target"), defaults.default_vision_tower()
    model = VisionLanguageModel(tower, tiny_vpg(llm.config.hidden_size, vision_width=96), llm, tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["llm"]["copy"] == "llm" and config["vision"]["copy"] == "vision"
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "model")
    logits = [m(torch.tensor([[1, 20, 30]]), torch.ones(1, 3, dtype=torch.long), pixel_values=torch.randn(
        1, 3, 48, 48, generator=torch.Generator().manual_seed(0))) for m in (model.eval(), loaded)]
    assert torch.equal(*logits)


def test_directories_without_a_model_say_what_they_hold(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory"):
        VisionLanguageModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/config.json not found: expected a directory written by "
                                                "VisionLanguageModel.save_pretrained"):
        VisionLanguageModel.from_pretrained(tmp_path / "empty")
    tiny_vpg(40).save_pretrained(tmp_path / "vpg")
    with pytest.raises(ValueError, match="vpg/config.json holds a VPG \\(VPG.from_pretrained\\)"):
        VisionLanguageModel.from_pretrained(tmp_path / "vpg")
    model = tiny_model("llama", tokenizer)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model/model.safetensors not found"):
        VisionLanguageModel.from_pretrained(tmp_path / "model")


def test_merged_adapters_are_not_saved(tokenizer, tmp_path):
    """Loading applies the adapters: saved after merge_mma they would act twice."""
    model = tiny_model("llama", tokenizer, mma={"rank": 4})
    merge_mma(model.llm, "image")
    with pytest.raises(ValueError, match="the MMA adapters are merged into the LLM's q/k/v weights"):
        model.save_pretrained(tmp_path / "model")

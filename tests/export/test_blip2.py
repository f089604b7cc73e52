"""to_hf_blip2 / from_hf_blip2: the exported Blip2ForConditionalGeneration computes vlfast's logits and
greedy answers on the same images and text (Llama, OPT, T5), its processor prepares images and
prompts as vlfast does, and models BLIP-2's class cannot express are refused with the reason.

Tolerance: the visual prompts agree to 1e-6 (the Q-Former's attention is vlfast's fused op on one
side and Hugging Face's on the other: float rounding, 4e-7 here), the logits to 1e-4 of their
largest magnitude (the tiny LLMs' std-0.2 weights amplify that rounding: T5's logits reach 184 and
differ by 4e-3). A VPG whose ln_vision eps differs from the tower's layer_norm_eps (1e-5 vs 1e-6)
exports with a warning: see test_embedded_default_exports.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor, CLIPVisionConfig, CLIPVisionModel

from tests.export.conftest import QUERIES, tiny_model, tiny_vpg, write_images
from vlfast import defaults
from vlfast.data.coco import image_to_tensor
from vlfast.data.collate import CaptionCollator
from vlfast.export import from_hf_blip2, to_hf_blip2
from vlfast.models import VisionLanguageModel

PROMPTS, TEXTS = ["what colour is the shape in the top left ?", ""], ["red", "two shapes : a blue square"]


def batch(model: VisionLanguageModel, tokenizer) -> dict[str, torch.Tensor]:
    batch = CaptionCollator(tokenizer, encoder_decoder=model.is_encoder_decoder).tokenize(TEXTS, PROMPTS)
    size = model.vision_tower.config.image_size
    batch["pixel_values"] = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return batch


def assert_logits_close(theirs: torch.Tensor, ours: torch.Tensor, relative: float = 1e-4) -> None:
    """HF's logits (with a column for <image> when it is new) equal to vlfast's, to `relative` of the largest."""
    assert theirs.shape[:-1] == ours.shape[:-1]
    torch.testing.assert_close(theirs[..., :ours.shape[-1]], ours, rtol=0, atol=relative * ours.abs().max().item())


@torch.no_grad()
def vlfast_and_hf_logits(model: VisionLanguageModel, hf: Blip2ForConditionalGeneration, b: dict) -> tuple:
    """The same examples through both: HF reads the image tokens first, then what vlfast's LLM reads."""
    torch.testing.assert_close(hf.get_image_features(b["pixel_values"]).pooler_output,
                               model.visual_prompts(b["pixel_values"]), rtol=0, atol=1e-6)
    image_tokens = torch.full((2, QUERIES), hf.config.image_token_index)
    ids, mask = torch.cat([image_tokens, b["input_ids"]], 1), torch.cat([torch.ones_like(image_tokens),
                                                                          b["attention_mask"]], 1)
    if model.is_encoder_decoder:
        decoder = b["labels"].clamp(min=0)
        ours = model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"], decoder_input_ids=decoder)
        theirs = hf(pixel_values=b["pixel_values"], input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
        return ours, theirs.logits
    ours = model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
    return ours, hf(pixel_values=b["pixel_values"], input_ids=ids, attention_mask=mask).logits[:, QUERIES:]


@pytest.mark.parametrize("kind, extra_rows", [("llama", 0), ("opt", 0), ("t5", 3)])
def test_export_computes_vlfasts_logits_and_answers(tokenizer, tmp_path, kind, extra_rows):
    model = tiny_model(kind, tokenizer, extra_rows=extra_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # equal eps: no warning
        to_hf_blip2(model, tmp_path / "hf")
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    vocabulary = len(tokenizer)
    assert hf.config.image_token_index == vocabulary and hf.config.num_query_tokens == QUERIES
    # The new <image> token got a row where there was none (T5's 3 spare rows already covered it).
    assert hf.get_input_embeddings().num_embeddings == vocabulary + max(1, extra_rows)
    assert len(tokenizer) == vocabulary  # the model's own tokenizer is not changed
    b = batch(model, tokenizer)
    assert_logits_close(*reversed(vlfast_and_hf_logits(model, hf, b)))

    prompt = CaptionCollator(tokenizer, encoder_decoder=model.is_encoder_decoder).prefix_ids(PROMPTS[0])
    ids = torch.tensor([prompt] * 2)
    settings = {"max_new_tokens": 5, "do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id, "min_new_tokens": 5}
    ours = model.generate(ids, pixel_values=b["pixel_values"], **settings)
    image_tokens = torch.full((2, QUERIES), hf.config.image_token_index)
    theirs = hf.generate(pixel_values=b["pixel_values"], input_ids=torch.cat([image_tokens, ids], 1),
                         suppress_tokens=[hf.config.image_token_index], **settings)
    # HF returns a causal LM's prompt before the new tokens, and T5's decoder start token.
    assert torch.equal(theirs[:, -5:], ours)


def test_processor_prepares_images_and_prompts_as_vlfast(tokenizer, tmp_path):
    model = tiny_model("llama", tokenizer)
    to_hf_blip2(model, tmp_path / "hf")
    processor = Blip2Processor.from_pretrained(tmp_path / "hf")
    path = write_images(tmp_path / "images", count=1, size=53)[0]  # resized to the tower's 40 pixels
    with Image.open(path) as image:
        inputs = processor(images=image, text=PROMPTS[0], return_tensors="pt")
        expected = image_to_tensor(image, 40)
    assert torch.equal(inputs["pixel_values"][0], expected)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    prefix = CaptionCollator(tokenizer).prefix_ids(PROMPTS[0])
    assert inputs["input_ids"][0].tolist() == [image_id] * QUERIES + prefix


def test_t5_processor_ends_prompts_with_eos(tokenizer, tmp_path):
    to_hf_blip2(tiny_model("t5", tokenizer), tmp_path / "hf")
    processor = Blip2Processor.from_pretrained(tmp_path / "hf")
    prefix = CaptionCollator(tokenizer, encoder_decoder=True).prefix_ids(PROMPTS[0])
    assert processor(text=PROMPTS[0])["input_ids"][0] == prefix


def test_hf_directory_back_into_vlfast_and_out_again(tokenizer, tmp_path):
    model = tiny_model("opt", tokenizer)
    to_hf_blip2(model, tmp_path / "hf")
    back = from_hf_blip2(tmp_path / "hf")
    assert not back.training and back.vpg.config == model.vpg.config
    b = batch(model, tokenizer)
    with torch.no_grad():
        ours = model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
        theirs = back(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"])
    assert_logits_close(theirs, ours)
    to_hf_blip2(back, tmp_path / "again")  # <image> is known now: same id, no new row
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert again.config.image_token_index == len(tokenizer)
    assert again.get_input_embeddings().num_embeddings == len(tokenizer) + 1


@pytest.mark.parametrize("connector, mma, message", [
    ("memory", None, "the memory connector \\(MemVP\\) .* BLIP-2's class cannot express MemVP; "
                     "VisionLanguageModel.save_pretrained .* writes a vlfast model directory instead"),
    ("input", {"rank": 4}, "BLIP-2's class cannot express the mixture-of-modality adapters in the LLM; "
                           "VisionLanguageModel.save_pretrained"),
])
def test_memvp_and_mma_are_refused(tokenizer, tmp_path, connector, mma, message):
    with pytest.raises(ValueError, match=message):
        to_hf_blip2(tiny_model("llama", tokenizer, connector=connector, mma=mma), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_other_towers_are_refused_with_the_reason(tokenizer, tmp_path):
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=36, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=40, patch_size=8))
    model = tiny_model("llama", tokenizer)
    with pytest.raises(ValueError, match="\\(CLIPVisionModel\\) cannot be exported as BLIP-2's: CLIP's ViT normalises "
                                         "the patch embeddings before its encoder .* separately with a key bias"):
        to_hf_blip2(VisionLanguageModel(clip, model.vpg, model.llm, tokenizer=tokenizer), tmp_path / "hf")
    with pytest.raises(ValueError, match="no vision tower .* build it with its tower"):
        to_hf_blip2(VisionLanguageModel(None, model.vpg, model.llm, tokenizer=tokenizer), tmp_path / "hf")


@pytest.mark.parametrize("vpg_eps", [1e-6, 1e-5])
def test_embedded_default_exports(tiny_defaults, tmp_path, vpg_eps):
    """The default tower's layer_norm_eps is 1e-6, which vlfast.transfer gives its VPGs: the export
    is exact to rounding. A VPG with torch's default 1e-5 warns: its export differs by what eps
    changes on features of variance ~0.05."""
    tokenizer, llm, tower = defaults.shapes_tokenizer(), defaults.default_lm("target"), defaults.default_vision_tower()
    model = VisionLanguageModel(tower, tiny_vpg(llm.config.hidden_size, vision_width=96, eps=vpg_eps), llm,
                                tokenizer=tokenizer).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_hf_blip2(model, tmp_path / "hf")
    eps_warnings = [str(w.message) for w in caught if "ln_vision has eps" in str(w.message)]
    assert eps_warnings == ([] if vpg_eps == 1e-6 else [
        "the VPG's ln_vision has eps 1e-05 but BLIP-2's post_layernorm takes the vision config's layer_norm_eps 1e-06, "
        "which the tower's own norms use too: the export's outputs differ slightly from vlfast's"])
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    if vpg_eps == 1e-6:  # with 1e-5 the visual prompts already differ (by ~1%): the warning says so
        assert_logits_close(*reversed(vlfast_and_hf_logits(model, hf, batch(model, tokenizer))))

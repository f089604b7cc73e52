"""VPG against Hugging Face's BLIP-2 (tiny, random weights) and its safetensors round trip. No test calls
`.eval()` on a loaded VPG: every loader returns one in eval mode."""
from __future__ import annotations

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

from vlfast.models import VPG, QFormer


@pytest.fixture(scope="module")
def blip2():
    torch.manual_seed(0)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14),
        qformer_config=Blip2QFormerConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                          intermediate_size=70, encoder_hidden_size=40),
        text_config=OPTConfig(vocab_size=99, hidden_size=36, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                              word_embed_proj_dim=36).to_dict(),
        num_query_tokens=5, image_token_index=98,
    )
    return Blip2ForConditionalGeneration(config).eval()


def hf_prompts(model, features):
    image_embeds = model.vision_model.post_layernorm(features)
    queries = model.query_tokens.expand(features.shape[0], -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    return model.language_projection(out)


def test_matches_blip2(blip2):
    vpg = VPG.from_hf(blip2)
    features = torch.randn(2, 5, 40)  # what the vision encoder gives before its post-layernorm
    with torch.no_grad():
        expected, got = hf_prompts(blip2, features), vpg(features)
    assert got.shape == (2, 5, 36)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_from_hf_directory_and_round_trip(blip2, tmp_path):
    blip2.save_pretrained(tmp_path / "blip2")
    vpg = VPG.from_hf(tmp_path / "blip2")
    vpg.save_pretrained(tmp_path / "vpg")
    again = VPG.from_pretrained(tmp_path / "vpg")
    features = torch.randn(3, 5, 40)
    with torch.no_grad():
        torch.testing.assert_close(again(features), vpg(features), rtol=0, atol=0)
    assert again.config == vpg.config
    assert not any(module.training for loaded in (vpg, again) for module in loaded.modules())
    blip2_again = VPG.from_pretrained(tmp_path / "blip2")  # a BLIP-2 directory is recognised
    with torch.no_grad():
        torch.testing.assert_close(blip2_again(features), vpg(features), rtol=0, atol=0)


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        VPG.from_pretrained(tmp_path)


def test_path_neither_file_nor_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-vpg: no such file or directory"):
        VPG.from_pretrained(tmp_path / "no-vpg")


def test_loaded_in_eval_mode(blip2):
    """Hidden dropout is 0.1 in the tiny BLIP-2: a module left in training mode gives two different outputs."""
    assert blip2.config.qformer_config.hidden_dropout_prob == 0.1
    features = torch.randn(2, 5, 40)
    with torch.no_grad():
        queries, images = torch.randn(2, 5, 48), blip2.vision_model.post_layernorm(features)
        for ours, inputs, expected in [
            (VPG.from_hf(blip2), (features,), hf_prompts(blip2, features)),
            (QFormer.from_hf(blip2), (queries, images),
             blip2.qformer(query_embeds=queries, encoder_hidden_states=images).last_hidden_state),
        ]:
            first = ours(*inputs)
            torch.testing.assert_close(ours(*inputs), first, rtol=0, atol=0)
            assert ((first - expected).norm() / expected.norm()).item() < 1e-5

"""QFormer against Hugging Face's Blip2QFormerModel on random weights of odd sizes."""
from __future__ import annotations

import pytest
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from vlfast.models import QFormer
from vlfast.ops import use_backend


def hf_qformer(layers=3, hidden=48, heads=3, vision=40, frequency=2):
    torch.manual_seed(0)
    config = Blip2QFormerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=70, encoder_hidden_size=vision, cross_attention_frequency=frequency)
    return Blip2QFormerModel(config).eval()


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("frequency", [1, 2])
def test_matches_hugging_face(backend, frequency):
    hf = hf_qformer(frequency=frequency)
    ours = QFormer.from_hf(hf).eval()
    queries, images = torch.randn(2, 7, 48), torch.randn(2, 19, 40)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 13:] = False
    with torch.no_grad():
        expected = hf(query_embeds=queries, encoder_hidden_states=images,
                      encoder_attention_mask=mask.long()).last_hidden_state
        with use_backend(backend):
            got = ours(queries, images, mask)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 1e-5, relative


def test_image_features_read_by_one_product():
    ours = QFormer.from_hf(hf_qformer(layers=5, frequency=2))
    assert [i for i, layer in enumerate(ours.layers) if layer.has_cross_attention] == [0, 2, 4]
    assert ours.cross_key_value.weight.shape == (2 * 48 * 3, 40)
    assert not any(hasattr(layer, "cross_key") for layer in ours.layers)


def test_bad_image_features():
    ours = QFormer.from_hf(hf_qformer())
    with pytest.raises(ValueError, match=r"image_features must have shape \(B, N, 40\)"):
        ours(torch.randn(1, 7, 48), torch.randn(1, 5, 41))

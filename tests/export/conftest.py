"""Tiny vision-language models of odd sizes (Llama, OPT and T5 LLMs built from configs, a BLIP-2
tower of 40-pixel images, a 3-layer Q-Former) over the shapes vocabulary, and shapes images as
files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

from vlfast import defaults
from vlfast.data.shapes import ShapesDataset
from vlfast.models import VPG, QFormerConfig, VisionLanguageModel, VPGConfig
from vlfast.models.vision import tiny_vision_tower

QUERIES = 5


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokenizer")
    defaults.shapes_tokenizer(root)
    return root


@pytest.fixture
def tokenizer(tokenizer_dir):
    return defaults.shapes_tokenizer(tokenizer_dir)


def _sharpened(llm):
    """Weights of std 0.2 instead of 0.02: an LLM whose output depends on its context."""
    with torch.no_grad():
        for p in llm.parameters():
            if p.ndim == 2:
                p.mul_(10)
    return llm.eval()


def tiny_llm(kind: str, tokenizer, extra_rows: int = 0):
    """A random LLM whose vocabulary is the tokenizer's (+ extra_rows): Llama 40 wide with grouped
    heads, OPT 36 wide with 3 heads, T5 40 wide with 3 heads of 8 and a gated FFN."""
    torch.manual_seed(0)
    ids = {"vocab_size": len(tokenizer) + extra_rows, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    if kind == "llama":
        return _sharpened(LlamaForCausalLM(LlamaConfig(
            hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=96, bos_token_id=tokenizer.bos_token_id, **ids)))
    if kind == "opt":
        return _sharpened(OPTForCausalLM(OPTConfig(
            hidden_size=36, ffn_dim=56, num_hidden_layers=2, num_attention_heads=3, max_position_embeddings=96,
            word_embed_proj_dim=36, bos_token_id=tokenizer.bos_token_id, **ids)))
    # T5 is left at its own init: sharpened, its logits reach the hundreds and greedy answers turn on rounding.
    return T5ForConditionalGeneration(T5Config(
        d_model=40, d_kv=8, d_ff=56, num_layers=2, num_decoder_layers=1, num_heads=3, feed_forward_proj="gated-gelu",
        decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **ids)).eval()


def tiny_tower():
    return tiny_vision_tower(image_size=40, patch_size=8, width=36, layers=1, seed=3)


def tiny_vpg(llm_width: int, vision_width: int = 36, eps: float = 1e-6) -> VPG:
    """eps: the VPG's ln_vision eps; BLIP-2 towers' layer_norm_eps is 1e-6."""
    torch.manual_seed(1)
    qformer = QFormerConfig(hidden_size=24, num_layers=3, num_heads=2, intermediate_size=40,
                            encoder_hidden_size=vision_width, cross_attention_frequency=2, hidden_dropout=0.0)
    vpg = VPG(VPGConfig(qformer, num_query_tokens=QUERIES, llm_hidden_size=llm_width, vision_layer_norm_eps=eps))
    with torch.no_grad():  # a trained-looking ln_vision, so that a wrong mapping of it shows
        vpg.ln_vision.weight.normal_(1.0, 0.3)
        vpg.ln_vision.bias.normal_(0.0, 0.3)
    return vpg.eval()


def tiny_model(kind: str, tokenizer, *, connector: str = "input", mma: dict | None = None,
               extra_rows: int = 0) -> VisionLanguageModel:
    llm = tiny_llm(kind, tokenizer, extra_rows)
    model = VisionLanguageModel(tiny_tower(), tiny_vpg(llm.get_input_embeddings().embedding_dim), llm,
                                connector=connector, mma=mma, tokenizer=tokenizer)
    torch.manual_seed(2)
    with torch.no_grad():  # trained-looking patches: MemVP's value rows and MMA's up projections start at zero
        for module in model.llm_patches():
            for p in module.parameters():
                p.normal_(0.0, 0.1)
    return model.eval()


def write_images(directory: Path, count: int = 2, size: int = 48) -> list[Path]:
    """Shapes scenes as PNG files (48 pixels: the tiny towers resize them)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset("test", count)
    paths = []
    for i in range(count):
        path = directory / f"scene{i}.png"
        array = data[i].image.permute(1, 2, 0).numpy().astype(np.uint8)
        Image.fromarray(array).resize((size, size)).save(path)
        paths.append(path)
    return paths

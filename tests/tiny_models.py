"""Tiny Hugging Face causal LMs built from configs (no hub)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

HIDDEN = 64
VOCAB = 97


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=96, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=HIDDEN)
    return OPTForCausalLM(config).eval()


TINY_MODELS = {"llama": tiny_llama, "opt": tiny_opt}


def tokens(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 90, (batch, length))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits

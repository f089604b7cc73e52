"""Tiny Hugging Face causal LMs built from configs (no hub), one per LLM family vlfast.patch supports.

tiny_llama and tiny_opt keep the sizes other tests were tuned on (hidden HIDDEN = 64). The others are odd on
purpose: hidden 48, intermediate 72, fewer key/value heads than query heads where the family has GQA, and
head_dim * heads != hidden where the family lets head_dim be set, so that attention projections are not square.
"""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

HIDDEN = 64
VOCAB = 97
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)


def _build(config: PretrainedConfig) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_opt(do_layer_norm_before: bool = True) -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=96, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                       do_layer_norm_before=do_layer_norm_before)
    return OPTForCausalLM(config).eval()


TINY_MODELS = {
    "llama": tiny_llama,
    "mistral": lambda: _build(MistralConfig(**_COMMON, num_key_value_heads=2, head_dim=10, sliding_window=6)),
    "qwen2": lambda: _build(Qwen2Config(**_COMMON, num_key_value_heads=2)),  # q/k/v with biases
    "qwen3": lambda: _build(Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=10)),
    "gemma": lambda: _build(GemmaConfig(**_COMMON, num_key_value_heads=1, head_dim=10)),
    "gemma2": lambda: _build(Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=10, query_pre_attn_scalar=10,
                                          sliding_window=6, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "phi3": lambda: _build(Phi3Config(**_COMMON, num_key_value_heads=2, pad_token_id=0, eos_token_id=2)),
    "gpt_neox": lambda: _build(GPTNeoXConfig(**_COMMON, use_parallel_residual=True, rotary_pct=0.5)),
    "gpt2": lambda: _build(GPT2Config(vocab_size=VOCAB, n_embd=48, n_inner=72, n_layer=2, n_head=4,
                                      n_positions=64, bos_token_id=1, eos_token_id=2)),
    "opt": tiny_opt,
    "opt_post_ln": lambda: tiny_opt(do_layer_norm_before=False),  # like opt-350m
}


def tokens(batch: int = 2, length: int = 9) -> torch.Tensor:
    return torch.randint(3, 90, (batch, length))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def snapshot(model) -> dict:
    """What a patch may change: parameters and buffers, requires_grad flags, hooks."""
    return {
        "state": {name: t.detach().clone() for name, t in model.state_dict().items()},
        "flags": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()},
    }


def assert_unchanged(model, before: dict) -> None:
    now = snapshot(model)
    assert list(now["state"]) == list(before["state"])
    for name, tensor in before["state"].items():
        assert torch.equal(now["state"][name], tensor), name
    assert now["flags"] == before["flags"]
    assert now["hooks"] == before["hooks"]

"""Where each supported Hugging Face LLM family keeps what the patchers hook: one row per `config.model_type`.

Paths are dotted submodule paths: `layers` from the *ForCausalLM object, `projections` from the attention
module, the others from a decoder layer. Pre-hooks on `attention` and `ffn_input` see exactly what attention
and the FFN read, whatever the family does around them (pre- or post-LN, parallel residual).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn


@dataclass(frozen=True)
class Family:
    layers: str  # the decoder layers (an nn.ModuleList)
    attention_norm: str  # the norm in front of attention (the table's record; the hooks sit on `attention`)
    attention: str  # MMA adapts this module's `hidden_states` input with a forward pre-hook
    projections: tuple[str, ...]  # the attention's input projections, which merge_mma folds the adapter into
    ffn_input: str  # MemVP reads the FFN input from this module's input (forward pre-hook)
    ffn_output: str  # MemVP adds its branch to this module's output (forward hook)
    activation: str  # the config attribute naming the FFN activation
    projections_in_out: bool = False  # weights stored [in, out] (transformers' Conv1D), not [out, in] (nn.Linear)

    def modules(self, model: nn.Module, path: str) -> list[nn.Module]:
        """The submodule at `path` in every decoder layer of `model`."""
        return [layer.get_submodule(path) for layer in model.get_submodule(self.layers)]


_LLAMA = Family(layers="model.layers", attention_norm="input_layernorm", attention="self_attn",
                projections=("q_proj", "k_proj", "v_proj"), ffn_input="mlp", ffn_output="mlp", activation="hidden_act")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,  # also Llama-3 and Vicuna
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    # Gemma2 normalises the mlp output (post_feedforward_layernorm) before the residual add: the branch goes after
    # that norm, since MemVP adds it to the residual stream in parallel with the (normalised) FFN.
    "gemma2": replace(_LLAMA, ffn_output="post_feedforward_layernorm", activation="hidden_activation"),
    "phi3": replace(_LLAMA, projections=("qkv_proj",)),  # fused q/k/v; the branch joins mlp before resid_mlp_dropout
    # Parallel residual: the mlp's input is already post_attention_layernorm(block input).
    "gpt_neox": Family(layers="gpt_neox.layers", attention_norm="input_layernorm", attention="attention",
                       projections=("query_key_value",), ffn_input="mlp", ffn_output="mlp", activation="hidden_act"),
    # GPT-2's mlp ends with dropout: the branch is added to the mlp output, after it.
    "gpt2": Family(layers="transformer.h", attention_norm="ln_1", attention="attn", projections=("c_attn",),
                   ffn_input="mlp", ffn_output="mlp", activation="activation_function", projections_in_out=True),
    # OPT has no mlp module: fc1 reads the FFN input (normed or not, per do_layer_norm_before), the branch joins
    # fc2's output inside the residual dropout.
    "opt": Family(layers="model.decoder.layers", attention_norm="self_attn_layer_norm", attention="self_attn",
                  projections=("q_proj", "k_proj", "v_proj"), ffn_input="fc1", ffn_output="fc2",
                  activation="activation_function"),
}


def family(model: nn.Module) -> Family:
    """`model`'s row of FAMILIES; TypeError, before anything is changed, for a model the table does not cover."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    row = FAMILIES.get(model_type)
    if row is None:
        raise TypeError(f"vlfast.patch does not support model_type {model_type!r} ({type(model).__name__}); "
                        f"supported: {', '.join(sorted(FAMILIES))}")
    try:
        for attention in row.modules(model, row.attention):
            for projection in row.projections:
                attention.get_submodule(projection)
        for path in (row.attention_norm, row.ffn_input, row.ffn_output):
            row.modules(model, path)
    except AttributeError as error:  # e.g. the bare decoder (LlamaModel) rather than the *ForCausalLM
        raise TypeError(f"{type(model).__name__} (model_type {model_type!r}) lacks the modules vlfast.patch hooks "
                        f"({error}); pass the *ForCausalLM model") from None
    return row

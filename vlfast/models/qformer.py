"""The BLIP-2 Q-Former (queries only, as a visual prompt generator) on vlfast.ops.cross_attention.

Matches Hugging Face's `Blip2QFormerModel` called with `query_embeds` and image features, module for
module, except that the key/value projections of all cross-attention layers are one stacked
Linear: the image features are read once for every layer (SPEC.md section 2). Attention-probability
dropout is not applied (the fused op has none); everything else, hidden dropout included, is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from vlfast.ops import cross_attention


@dataclass
class QFormerConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    encoder_hidden_size: int = 1408  # the vision tower's width
    cross_attention_frequency: int = 2  # cross-attention in layers 0, f, 2f, ...
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")

    @property
    def cross_layers(self) -> list[int]:
        return list(range(0, self.num_layers, self.cross_attention_frequency))

    @classmethod
    def from_hf(cls, config) -> QFormerConfig:
        return cls(config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
                   config.encoder_hidden_size, config.cross_attention_frequency, config.layer_norm_eps,
                   config.hidden_dropout_prob, config.hidden_act)


class AddNorm(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual), BERT's output block."""

    def __init__(self, in_features: int, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


def _heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool) -> None:
        super().__init__()
        h = config.hidden_size
        self.heads = config.num_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attention_output = AddNorm(h, config)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:  # its keys and values come from QFormer.cross_key_value
            self.cross_query = nn.Linear(h, h)
            self.cross_output = AddNorm(h, config)
        self.intermediate = nn.Linear(h, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.output = AddNorm(config.intermediate_size, config)

    def forward(self, x: Tensor, cross_kv: tuple[Tensor, Tensor] | None, image_mask: Tensor | None) -> Tensor:
        attended = cross_attention(_heads(self.query(x), self.heads), _heads(self.key(x), self.heads),
                                   _heads(self.value(x), self.heads))
        x = self.attention_output(_merge_heads(attended), x)
        if self.has_cross_attention:
            keys, values = cross_kv
            attended = cross_attention(_heads(self.cross_query(x), self.heads), keys, values, image_mask)
            x = self.cross_output(_merge_heads(attended), x)
        return self.output(self.act(self.intermediate(x)), x)


class QFormer(nn.Module):
    """Query tokens (B, Q, H) attend to image features (B, N, C) -> (B, Q, H)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        cross = set(config.cross_layers)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(QFormerLayer(config, i in cross) for i in range(config.num_layers))
        # Keys and values of every cross-attention layer from one product over the image features:
        # rows [2 j H, 2 j H + H) are layer j's keys, the next H its values.
        self.cross_key_value = nn.Linear(config.encoder_hidden_size, 2 * config.hidden_size * len(cross))
        self.gradient_checkpointing = False  # recompute each layer in the backward pass instead of keeping it

    def forward(self, query_embeds: Tensor, image_features: Tensor, image_mask: Tensor | None = None) -> Tensor:
        if image_features.dim() != 3 or image_features.shape[-1] != self.config.encoder_hidden_size:
            raise ValueError(f"image_features must have shape (B, N, {self.config.encoder_hidden_size}), "
                             f"got {tuple(image_features.shape)}")
        x = self.dropout(self.layernorm(query_embeds))
        kv = self.cross_key_value(image_features.to(x.dtype))
        heads = self.config.num_heads
        per_layer = iter(_heads(part, heads) for part in kv.split(self.config.hidden_size, dim=-1))
        for layer in self.layers:
            cross_kv = (next(per_layer), next(per_layer)) if layer.has_cross_attention else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cross_kv, image_mask, use_reentrant=False)
            else:
                x = layer(x, cross_kv, image_mask)
        return x

    @classmethod
    def from_hf(cls, model) -> QFormer:
        """From a Hugging Face `Blip2QFormerModel` or `Blip2ForConditionalGeneration` (its `qformer`), in eval
        mode as transformers' `from_pretrained` gives it: call `.train()` to train."""
        qformer = getattr(model, "qformer", model)
        config = QFormerConfig.from_hf(qformer.config)
        ours = cls(config)
        ours.load_state_dict(hf_qformer_state_dict(qformer.state_dict(), config))
        return ours.to(next(qformer.parameters()).dtype).eval()


def hf_qformer_state_dict(hf: dict[str, Tensor], config: QFormerConfig) -> dict[str, Tensor]:
    """Hugging Face Blip2QFormerModel weights (no `qformer.` prefix) in QFormer's names."""
    out = {f"layernorm.{p}": hf[f"layernorm.{p}"] for p in ("weight", "bias")}
    cross_weights, cross_biases = [], []
    for i in range(config.num_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        names = {
            "attention.attention.query": "query", "attention.attention.key": "key",
            "attention.attention.value": "value", "attention.output.dense": "attention_output.dense",
            "attention.output.LayerNorm": "attention_output.LayerNorm", "intermediate_query.dense": "intermediate",
            "output_query.dense": "output.dense", "output_query.LayerNorm": "output.LayerNorm",
        }
        if i in config.cross_layers:
            names.update({"crossattention.attention.query": "cross_query",
                          "crossattention.output.dense": "cross_output.dense",
                          "crossattention.output.LayerNorm": "cross_output.LayerNorm"})
            for part in ("key", "value"):
                cross_weights.append(hf[f"{src}crossattention.attention.{part}.weight"])
                cross_biases.append(hf[f"{src}crossattention.attention.{part}.bias"])
        for theirs, ours in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = hf[f"{src}{theirs}.{p}"]
    out["cross_key_value.weight"] = torch.cat(cross_weights)
    out["cross_key_value.bias"] = torch.cat(cross_biases)
    return out

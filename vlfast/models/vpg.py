"""The visual prompt generator: ln_vision -> Q-Former over learned query tokens -> projector to an
LLM's input width. What VPGTrans moves from one LLM to another.

Every loader returns the VPG in eval mode, as transformers' `from_pretrained` does: call `.train()` to train."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vlfast.models.pretrained import read_pretrained, save_pretrained
from vlfast.models.qformer import QFormer, QFormerConfig, hf_qformer_state_dict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class VPGConfig:
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 32
    llm_hidden_size: int = 2560
    vision_layer_norm_eps: float = 1e-5

    @property
    def vision_width(self) -> int:
        return self.qformer.encoder_hidden_size

    @classmethod
    def from_dict(cls, values: dict) -> VPGConfig:
        return cls(**{**values, "qformer": QFormerConfig(**values["qformer"])})


class VPG(nn.Module):
    """Image features (B, N, C) from a frozen vision tower -> visual prompts (B, Q, LLM width)."""

    def __init__(self, config: VPGConfig) -> None:
        super().__init__()
        self.config = config
        self.ln_vision = nn.LayerNorm(config.vision_width, eps=config.vision_layer_norm_eps)
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_query_tokens, config.qformer.hidden_size) * 0.02)
        self.qformer = QFormer(config.qformer)
        self.projector = nn.Linear(config.qformer.hidden_size, config.llm_hidden_size)

    def forward(self, image_features: Tensor, image_mask: Tensor | None = None) -> Tensor:
        features = self.ln_vision(image_features.to(self.ln_vision.weight.dtype))
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        return self.projector(self.qformer(queries, features, image_mask))

    @classmethod
    def from_hf(cls, model) -> VPG:
        """BLIP-2's whole VPG from a Hugging Face `Blip2ForConditionalGeneration` (or a local
        directory holding one): the vision tower's post-layernorm as ln_vision, the query tokens,
        the Q-Former, and `language_projection` as the projector."""
        if isinstance(model, (str, Path)):
            from transformers import Blip2ForConditionalGeneration

            model = Blip2ForConditionalGeneration.from_pretrained(model)
        hf_config = model.config
        config = VPGConfig(QFormerConfig.from_hf(hf_config.qformer_config), hf_config.num_query_tokens,
                           model.language_projection.out_features, hf_config.vision_config.layer_norm_eps)
        vpg = cls(config)
        qformer_state = hf_qformer_state_dict(model.qformer.state_dict(), config.qformer)
        state = {f"qformer.{k}": v for k, v in qformer_state.items()}
        norm = model.vision_model.post_layernorm
        state.update({
            "ln_vision.weight": norm.weight, "ln_vision.bias": norm.bias, "query_tokens": model.query_tokens,
            "projector.weight": model.language_projection.weight, "projector.bias": model.language_projection.bias,
        })
        vpg.load_state_dict(state)
        return vpg.eval()

    @classmethod
    def from_lavis(cls, path: str | Path, *, vision_layer_norm_eps: float = 1e-5) -> VPG:
        """The VPG of a LAVIS checkpoint (`.pth`): BLIP-2 stage 2 (`blip2_pretrained_opt2.7b.pth`, `_opt6.7b`,
        `_flant5xl`, `_flant5xxl`), InstructBLIP (`instruct_blip_vicuna7b_trimmed.pth`) or VPGTrans's VL-LLaMA /
        VL-Vicuna, its config inferred from the weight shapes (see vlfast.models.lavis).

        `vision_layer_norm_eps`: LAVIS's ln_vision is a torch LayerNorm with the default 1e-5; Hugging Face's
        converted BLIP-2 uses 1e-6 for the same weights. InstructBLIP's Q-Former also reads the instruction
        text, which this query-only VPG does not, so its prompts differ from InstructBLIP's own."""
        from vlfast.models.lavis import read_lavis_vpg  # lavis.py builds on this module's VPGConfig

        config, state = read_lavis_vpg(path, vision_layer_norm_eps)
        vpg = cls(config)
        vpg.load_state_dict(state)
        return vpg.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        save_pretrained(self, directory, CONFIG_NAME, WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VPG:
        """A VPG from a directory written by save_pretrained, a Hugging Face BLIP-2 directory, or a
        LAVIS checkpoint file (see from_lavis)."""
        path = Path(path)
        if path.is_file():
            return cls.from_lavis(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such file or directory; a VPG is read from a directory written by "
                                    f"VPG.save_pretrained, a Hugging Face BLIP-2 directory or a LAVIS .pth checkpoint")
        values, weights = read_pretrained(path, CONFIG_NAME, WEIGHTS_NAME, "neither a directory written by "
                                          "VPG.save_pretrained nor a Hugging Face BLIP-2 model")
        if values.get("model_type") == "blip-2":
            return cls.from_hf(path)
        vpg = cls(VPGConfig.from_dict(values))
        vpg.load_state_dict(weights)
        return vpg.eval()

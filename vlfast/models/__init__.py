"""The lean vlfast model stack."""
from vlfast.models.qformer import QFormer, QFormerConfig
from vlfast.models.vlm import VisionLanguageModel
from vlfast.models.vpg import VPG, VPGConfig

__all__ = ["VPG", "QFormer", "QFormerConfig", "VPGConfig", "VisionLanguageModel"]

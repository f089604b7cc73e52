"""The lean vlfast model stack."""
from vlfast.models.qformer import QFormer, QFormerConfig

__all__ = ["QFormer", "QFormerConfig"]

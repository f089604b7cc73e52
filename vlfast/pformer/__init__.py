"""P-Former: prompts predicted from text alone, as references for VPG training (SPEC.md section 7)."""
from vlfast.pformer.model import PFormer, PFormerConfig, alignment_loss

__all__ = ["PFormer", "PFormerConfig", "alignment_loss"]

"""Patchers that add vlfast's modules to Hugging Face LLMs, each with a way back."""
from vlfast.patch.base import is_patched, patch_module
from vlfast.patch.memvp import VisualMemory, apply_memvp, revert_memvp, set_visual_memory, visual_memory
from vlfast.patch.mma import MixtureOfModalityAdapters, apply_mma, merge_mma, modality, revert_mma, set_modality

__all__ = [
    "MixtureOfModalityAdapters", "VisualMemory", "apply_memvp", "apply_mma", "is_patched", "merge_mma", "modality",
    "patch_module", "revert_memvp", "revert_mma", "set_modality", "set_visual_memory", "visual_memory",
]

"""Patchers that add vlfast's modules to Hugging Face LLMs, each with a way back."""
from vlfast.patch.memvp import VisualMemory, apply_memvp, revert_memvp, set_visual_memory, visual_memory

__all__ = ["VisualMemory", "apply_memvp", "revert_memvp", "set_visual_memory", "visual_memory"]

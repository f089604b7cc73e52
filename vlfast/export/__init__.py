"""Trained vlfast models out to other formats and back: a Hugging Face BLIP-2 directory
(`to_hf_blip2`, `from_hf_blip2`), and loading a model from any directory vlfast writes
(`load_model`). `python -m vlfast.export SOURCE OUT` on the command line."""
from vlfast.export.blip2 import check_exportable, from_hf_blip2, to_hf_blip2
from vlfast.export.load import find_model, load_model

__all__ = ["check_exportable", "find_model", "from_hf_blip2", "load_model", "to_hf_blip2"]

"""Data: the procedural `shapes` set, a COCO-format caption loader, caption collation, and streamed
sources (sources.py, stream.py, feature_shards.py: imported from their modules)."""
from vlfast.data.coco import CocoCaptions
from vlfast.data.collate import IGNORE_INDEX, CaptionCollator

__all__ = ["IGNORE_INDEX", "CaptionCollator", "CocoCaptions", "Scene", "ShapesDataset"]


def __getattr__(name: str):
    # shapes is imported on first use, so that `python -m vlfast.data.shapes` runs it as a fresh module.
    if name in ("Scene", "ShapesDataset"):
        from vlfast.data import shapes

        return getattr(shapes, name)
    raise AttributeError(f"module 'vlfast.data' has no attribute {name!r}")

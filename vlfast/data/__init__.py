"""Data: the procedural `shapes` set, a COCO-format caption loader, and caption collation."""
from vlfast.data.coco import CocoCaptions
from vlfast.data.collate import IGNORE_INDEX, CaptionCollator
from vlfast.data.shapes import Scene, ShapesDataset

__all__ = ["IGNORE_INDEX", "CaptionCollator", "CocoCaptions", "Scene", "ShapesDataset"]

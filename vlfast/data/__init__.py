"""Data: the procedural `shapes` set."""
from vlfast.data.shapes import Scene, ShapesDataset

__all__ = ["Scene", "ShapesDataset"]

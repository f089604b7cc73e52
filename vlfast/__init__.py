"""vlfast: fused kernels and lean training for cheap vision-language models."""
from vlfast import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]

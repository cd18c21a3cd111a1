"""lance-mlx: ByteDance's Lance unified multimodal model on MLX."""

from .config import LanceConfig, build_lance_config
from .lance import Lance

__version__ = "0.1.0"
__all__ = ["Lance", "LanceConfig", "build_lance_config"]

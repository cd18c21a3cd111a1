"""lance-mlx: ByteDance's Lance unified multimodal model on MLX."""

from .config import LanceConfig, SamplingParams, build_lance_config
from .lance import Lance
from .pipeline import LancePipeline
from .tasks import ImageEdit, ImageToVideo, Posterior, TextToImage, TextToVideo, Understand, VideoEdit

__version__ = "0.2.0"
__all__ = [
    "ImageEdit", "ImageToVideo", "Lance", "LanceConfig", "LancePipeline", "Posterior", "SamplingParams",
    "TextToImage", "TextToVideo", "Understand", "VideoEdit", "build_lance_config",
]

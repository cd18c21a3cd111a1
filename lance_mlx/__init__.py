"""lance-mlx: ByteDance's Lance unified multimodal model on MLX."""

__version__ = "0.1.0"

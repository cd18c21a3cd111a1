"""Tiny random checkpoints in the full upstream layout (Lance_3B or Lance_3B_Video, Qwen2.5-VL-ViT, Wan2.2_VAE.pth)."""

from __future__ import annotations

from pathlib import Path

from fixtures import write_golden_lance_folder, write_golden_vit_folder
from vae_reference import load_reference_module, random_reference_vae

TINY_VAE = dict(c_dim=8, dec_dim=10)  # reduced widths; z_dim 48, dim_mult and temporal flags as released


def write_tiny_vae_pth(path, seed: int = 0) -> Path:
    """`Wan2.2_VAE.pth` of the official Wan 2.2 VAE class with random weights, written by torch.save."""
    import torch

    model = random_reference_vae(load_reference_module(), seed=seed, **TINY_VAE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_tiny_upstream_root(dest, video: bool = False) -> Path:
    """The hub layout below `dest`: Lance_3B/ (or Lance_3B_Video/: the same tiny LLM under that name),
    Qwen2.5-VL-ViT/ and Wan2.2_VAE.pth. Returns `dest`."""
    dest = Path(dest)
    write_golden_lance_folder(dest / ("Lance_3B_Video" if video else "Lance_3B"))
    write_golden_vit_folder(dest / "Qwen2.5-VL-ViT")
    write_tiny_vae_pth(dest / "Wan2.2_VAE.pth")
    return dest


def tiny_lance():
    """The golden tiny Lance model (float32) in memory, no other component."""
    import json

    import mlx.core as mx

    from fixtures import GOLDEN, golden_lance_weights
    from lance_mlx.lance import Lance, LanceConfig

    model = Lance(LanceConfig.from_dict(json.loads((GOLDEN / "llm_config.json").read_text())))
    model.load_weights([(k, mx.array(v)) for k, v in Lance.sanitize(golden_lance_weights()).items()], strict=True)
    mx.eval(model.parameters())
    return model


def tiny_pipeline(checkpoint=None):
    """A LancePipeline of the golden tiny Lance with the real tokenizer, the golden tiny ViT and a random MLX tiny
    VAE (no torch needed). `checkpoint` ("image" / "video") marks which upstream checkpoint it stands for."""
    import json

    import mlx.core as mx
    from transformers import AutoTokenizer

    from fixtures import GOLDEN
    from lance_mlx.config import ViTConfig
    from lance_mlx.pipeline import LancePipeline
    from lance_mlx.vae_wan22 import Wan2_2_VAE
    from lance_mlx.vit import load_vit

    mx.random.seed(0)
    vae = Wan2_2_VAE(**TINY_VAE)
    mx.eval(vae.model.parameters())
    vit = load_vit(GOLDEN / "vit_tiny.safetensors",
                   ViTConfig.from_dict(json.loads((GOLDEN / "vit_config.json").read_text())))
    tokenizer = AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))
    return LancePipeline(tiny_lance(), tokenizer, vit, vae, checkpoint=checkpoint)

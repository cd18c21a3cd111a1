"""Conditioning inputs of edits and image-to-video: ViT embeddings and VAE latents of the source, encoded once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from .config import POSTERIOR_SEED
from .sequence import Sequence, edit_sequence


def _as_mx(a) -> mx.array:
    return a.astype(mx.float32) if isinstance(a, mx.array) else mx.array(np.asarray(a, dtype=np.float32))


def posterior_keys(posterior_seed: Optional[int]) -> Tuple[mx.array, mx.array]:
    """(pixel-noise key, posterior-eps key) derived from one seed (upstream draws both from its global RNG)."""
    seed = POSTERIOR_SEED if posterior_seed is None else int(posterior_seed)
    k_pixels, k_eps = mx.random.split(mx.random.key(seed), 2)
    return k_pixels, k_eps


def encode_latent(vae, pixels, sample_posterior: bool = True, key: Optional[mx.array] = None) -> mx.array:
    """VAE latent (1, t, h, w, 48) float32 of pixels (T, H, W, 3) in [-1, 1].

    `sample_posterior` gives upstream's conditioning latent (WanVideoVAE `use_sample=True`): mu_n +
    exp(0.5 * log_var) * eps with the raw log_var; False gives the posterior mean mu_n (deterministic).
    """
    video = _as_mx(pixels)[None]  # (1, T, H, W, 3)
    if sample_posterior:
        return vae.encode(video, key=posterior_keys(None)[1] if key is None else key)
    return vae.encode(video)


def i2v_pixels(image_pixels, num_frames: int, key: mx.array, frame_stride: int = 4) -> mx.array:
    """Upstream ff2v_sample's pixel video (T, H, W, 3): N(0, 1) noise frames with frames 0-3 set to the image
    (validation_dataset.py::ff2v_sample; the VAE's first group of 4 frames after frame 0)."""
    img = _as_mx(image_pixels)
    img = img.reshape(1, *img.shape[-3:])
    _, H, W, C = img.shape
    noise = mx.random.normal((num_frames, H, W, C), key=key)
    k = min(frame_stride, num_frames)
    return mx.concatenate([mx.broadcast_to(img, (k, H, W, C)), noise[k:]], axis=0)


def encode_first_frame(vae, image_pixels, num_frames: int, sample_posterior: bool = True,
                       posterior_seed: Optional[int] = None) -> mx.array:
    """Image-to-video's conditioning latent (1, t, h, w, 48): the pixel video of `i2v_pixels` encoded whole; its
    first latent frame replaces the noise there (upstream inference: ff2v_sample + validation_gen_KVcache)."""
    k_pixels, k_eps = posterior_keys(posterior_seed)
    return encode_latent(vae, i2v_pixels(image_pixels, num_frames, k_pixels), sample_posterior, k_eps)


def vit_embeddings(vit, patches, grid_thw) -> Tuple[mx.array, Tuple[int, int, int]]:
    """ViT embeddings (K, hidden) and the merged token grid (T/2, H/28, W/28) of the ViT block."""
    m = getattr(getattr(vit, "config", None), "spatial_merge_size", 2)
    emb = vit(mx.array(np.asarray(patches)), grid_thw)
    mx.eval(emb)
    gt, gh, gw = (int(v) for v in grid_thw)
    return emb, (gt, gh // m, gw // m)


def first_frame_mask(shape: Tuple[int, int, int]) -> np.ndarray:
    """(t*h*w,) True on the first latent frame's tokens (i2v: kept at t = 0 and never updated)."""
    t, h, w = shape
    m = np.zeros(t * h * w, dtype=bool)
    m[:h * w] = True
    return m


@dataclass
class EditInputs:
    """The encoded source of an edit: ViT embeddings (K, hidden) + merged grid, and the conditioning latent."""

    vit_embeds: mx.array
    vit_grid: Tuple[int, int, int]
    cond_latent: mx.array  # (1, t, h, w, 48) float32

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return tuple(int(v) for v in self.cond_latent.shape[1:4])

    def sequence(self, instruction_ids, vision_type: str = "image", tokenizer=None) -> Sequence:
        """Edit layout: [template] [ViT block] [conditioning latents] [instruction] [assistant] [target]; the
        target grid equals the conditioning grid, so the target reuses the conditioning block's positions."""
        _, t, h, w, c = self.cond_latent.shape
        return edit_sequence(instruction_ids, self.vit_grid, (t, h, w), vision_type=vision_type, tokenizer=tokenizer,
                             vit_data=self.vit_embeds, cond_data=self.cond_latent.reshape(t * h * w, c))


def encode_edit_inputs(vit, vae, visual, sample_posterior: bool = True,
                       posterior_seed: Optional[int] = None) -> EditInputs:
    """Run a preprocessed source (`processing.VisualInput`) through the ViT and the VAE encoder, once; the
    latent is shared by every guidance branch (separate encodes would give each branch its own sample)."""
    emb, grid = vit_embeddings(vit, visual.vit_patches, visual.grid_thw)
    cond = encode_latent(vae, visual.vae_pixels, sample_posterior, posterior_keys(posterior_seed)[1])
    return EditInputs(emb, grid, cond)

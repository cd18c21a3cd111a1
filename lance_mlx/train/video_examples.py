"""Video training features and examples: each item's VAE posterior / ViT features cached once on disk, and each
step's example in upstream's training layout (data/datasets_factory/dataset_x2v_interleave.py and
dataset_x2t_interleave.py, packed by data/dataset_base_train.py::pack_sequence):

- t2v: [system (t2v prompt) + caption] [assistant] [target video latents]; ff2v (image-to-video) is the same layout
  with the target's first latent frame held clean (t = 0) and left out of the MSE;
- video-edit (tv2v, sample_task edit, vision_cond_type vit + vae_Nsplit): USER = [ViT block of the source video,
  source latents (full_noise), instruction], ASSISTANT = target latents (the instruction rotated to the end);
- v2t: [system (a caption prompt, the question-answering prompt, or the row's caption_i)] [ViT block, question?]
  [assistant] [answer] with CE on the answer and its <|im_end|>.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .. import processing as P
from ..errors import InvalidRequestError
from ..sequence import (
    chat_sequence,
    edit_sequence,
    generation_sequence,
    latent_split,
    system_prompt_ids,
    vit_split,
)
from .data import TEXT_DROP, VISION_DROP, cache_each, sample_posterior, understanding_example
from .objective import Example
from .video_data import FF2V_RATE, ClipSettings, VideoItem, read_clip

ARRAYS = ("target_mu", "target_log_var", "source_mu", "source_log_var", "vit")
IDS = ("text_ids", "question_ids", "system_ids")


@dataclass
class VideoFeatures:
    """Cached inputs of one video item: VAE posterior (mu_n, log_var) of the target / source clip, ViT features of
    the source (video-edit) or video (v2t), token ids."""

    text_ids: np.ndarray
    target_mu: Optional[mx.array] = None  # (t*h*w, 48)
    target_log_var: Optional[mx.array] = None
    shape: Optional[tuple] = None  # latent grid (t, h, w)
    source_mu: Optional[mx.array] = None
    source_log_var: Optional[mx.array] = None
    vit: Optional[mx.array] = None  # (K, hidden)
    vit_grid: Optional[tuple] = None  # merged grid (T/2, H/28, W/28)
    question_ids: Optional[np.ndarray] = None
    system_ids: Optional[np.ndarray] = None  # v2t parquet caption_i

    @property
    def bucket(self) -> tuple:
        """Aspect bucket and clip length (a batch holds one)."""
        return self.shape or self.vit_grid


def _posterior(vae, pixels) -> tuple:
    mu, log_var = vae.encode(mx.array(pixels)[None], return_log_var=True)  # (1, t, h, w, 48)
    _, t, h, w, c = mu.shape
    return mu.reshape(-1, c), log_var.reshape(-1, c), (t, h, w)


def _pair_frames(item: VideoItem, clip: ClipSettings, where: str) -> tuple:
    """Source and target clips of a video edit, with the same frame count (the shorter clip's, both spread over
    their whole video): the target must share the source's latent grid, as at inference."""
    src, tgt = read_clip(item.video, where, clip), read_clip(item.target, where, clip)
    n = min(len(src), len(tgt))
    if len(src) != n:
        src = read_clip(item.video, where, clip, count=n)
    if len(tgt) != n:
        tgt = read_clip(item.target, where, clip, count=n)
    return src, tgt


def encode_item(item: VideoItem, pipe, clip: ClipSettings, resolution: int, vit_resolution: int,
                where: str = "") -> VideoFeatures:
    """Run the VAE (and the ViT for video-edit / v2t) on one item's clip(s), once."""
    from ..conditioning import vit_embeddings

    task = clip.task
    tok = (lambda s: np.asarray(pipe.tokenizer(s, add_special_tokens=False)["input_ids"], dtype=np.int64))
    f = VideoFeatures(text_ids=tok(item.text), question_ids=tok(item.question) if item.question else None,
                      system_ids=tok(item.system) if item.system else None)
    where = where or item.name
    if task == "video-edit":
        src, tgt = _pair_frames(item, clip, where)
    else:
        src, tgt = None, read_clip(item.video, where, clip)
        if task == "v2t":
            src, tgt = tgt, None
    vae = pipe.component("vae") if tgt is not None else None
    if tgt is not None:
        f.target_mu, f.target_log_var, f.shape = _posterior(vae, P.prepare_vae_pixels(tgt, resolution))
    if task == "video-edit":
        f.source_mu, f.source_log_var, shape = _posterior(vae, P.prepare_vae_pixels(src, resolution))
        if shape != f.shape:
            raise InvalidRequestError(f"the pair {where} falls in two different aspect buckets ({shape[2] * 16}x"
                                      f"{shape[1] * 16} vs {f.shape[2] * 16}x{f.shape[1] * 16}); give the pair the "
                                      f"same aspect ratio", param="data")
    if src is not None:
        patches, grid = P.prepare_vit_patches(src, vit_resolution, is_image=False)
        f.vit, f.vit_grid = vit_embeddings(pipe.component("vit"), patches, grid)
    mx.eval([getattr(f, k) for k in ARRAYS if getattr(f, k) is not None])
    return f


def save_features(f: VideoFeatures, path: Path) -> None:
    arrays = {k: getattr(f, k) for k in ARRAYS if getattr(f, k) is not None}
    for k in IDS:
        if getattr(f, k) is not None:
            arrays[k] = mx.array(getattr(f, k).astype(np.int32))
    meta = {"shape": json.dumps(f.shape), "vit_grid": json.dumps(f.vit_grid)}
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    tmp.replace(path)


def load_features(path: Path) -> VideoFeatures:
    arrays, meta = mx.load(str(path), return_metadata=True)
    shape, grid = json.loads(meta["shape"]), json.loads(meta["vit_grid"])
    ids = {k: np.asarray(arrays[k]).astype(np.int64) if k in arrays else None for k in IDS}
    return VideoFeatures(**ids, **{k: arrays.get(k) for k in ARRAYS}, shape=tuple(shape) if shape else None,
                         vit_grid=tuple(grid) if grid else None)


def cache_features(items: Sequence[VideoItem], pipe, clip: ClipSettings, cache_dir: Path, resolution: int,
                   vit_resolution: int, progress=None) -> List[VideoFeatures]:
    """Features of every item, read from `cache_dir` when there, else encoded and written there."""
    return cache_each(items, cache_dir, lambda it: encode_item(it, pipe, clip, resolution, vit_resolution),
                      save_features, load_features, progress)


def build_example(f: VideoFeatures, task: str, rng: random.Random, key: mx.array, text_drop: float = TEXT_DROP,
                  vision_drop: float = VISION_DROP, prompts: Optional[Dict[str, List[int]]] = None,
                  ff2v_rate: float = FF2V_RATE) -> Example:
    """One step's example of a video item: the posterior sample, with probability `text_drop` no caption /
    instruction, with `vision_drop` (video-edit) no ViT block and no source latents, as upstream drops them; t2v
    is a first-frame-to-video sample with probability `ff2v_rate` (i2v: always) when the clip has two latent
    frames or more."""
    if task == "v2t":
        return understanding_example(f, rng, prompts, "video")
    k_target, k_source = mx.random.split(key)
    x0 = sample_posterior(f.target_mu, f.target_log_var, k_target)
    drop_text = rng.random() < text_drop
    clean = 0
    if task in ("t2v", "i2v"):
        ff2v = task == "i2v" or rng.random() < ff2v_rate
        clean = 1 if ff2v and f.shape[0] > 1 else 0
        if drop_text:
            seq = chat_sequence(system_prompt_ids("t2v"), [], [latent_split(f.shape, "target")])
        else:
            seq = generation_sequence("t2v", f.text_ids, f.shape)
    elif rng.random() < vision_drop:  # video-edit without its source (ViT and latents dropped together)
        seq = chat_sequence(system_prompt_ids("video_edit"), [] if drop_text else [f.text_ids],
                            [latent_split(f.shape, "target")], prompt_ids=None if drop_text else f.text_ids)
    else:
        cond = sample_posterior(f.source_mu, f.source_log_var, k_source)
        if drop_text:
            user = [vit_split(f.vit_grid, f.vit), latent_split(f.shape, "cond", cond)]
            seq = chat_sequence(system_prompt_ids("video_edit"), user, [latent_split(f.shape, "target")])
        else:
            seq = edit_sequence(f.text_ids, f.vit_grid, f.shape, vision_type="video", vit_data=f.vit,
                                cond_data=cond)
    seq.splits[seq.noise_index].data = x0
    return Example(seq, clean_frames=clean)


__all__ = ["VideoFeatures", "encode_item", "cache_features", "load_features", "save_features", "build_example"]

"""Upstream's 3-D mRoPE position ids (get_rope_index) and sparse attention mask of a packed token sequence."""

from __future__ import annotations

from typing import List, Tuple
from typing import Sequence as Seq

import numpy as np

from .config import IMAGE_PAD, VIDEO_PAD, VISION_START


def _ids(x) -> np.ndarray:
    return np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.int64).reshape(-1)


def get_rope_index(input_ids, grids: Seq[Tuple[int, int, int]], *, spatial_merge_size: int = 2,
                   tokens_per_second: int = 2, second_per_grid_t: float = 1.0,
                   vision_start: int = VISION_START, image_pad: int = IMAGE_PAD,
                   video_pad: int = VIDEO_PAD) -> np.ndarray:
    """3-D mRoPE positions (3, L), a port of upstream modeling/lance/qwen2_navit.py::get_rope_index.

    `grids` lists every visual block in order as passed upstream, i.e. before the 2x2 merge: ViT blocks
    (T/2, H/14, W/14), VAE blocks (t, 2h, 2w). Upstream hands the same list as image and video grids, each
    with its own running index. Body token (ti, hi, wi) of a block whose <|vision_start|> sits at P gets
    (P+1+int(ti*second_per_grid_t*tokens_per_second), P+1+hi, P+1+wi); text continues from the max + 1.
    """
    ids = [int(i) for i in _ids(input_ids)]
    n_tok = len(ids)
    if not grids:
        return np.broadcast_to(np.arange(n_tok, dtype=np.int64), (3, n_tok)).copy()
    starts = [i for i, x in enumerate(ids) if x == vision_start and i + 1 < n_tok]
    nxt = [ids[i + 1] for i in starts]
    remain_images, remain_videos = nxt.count(image_pad), nxt.count(video_pad)
    image_index = video_index = 0
    pieces: List[np.ndarray] = []
    st = 0
    for _ in range(remain_images + remain_videos):
        ed_image = ids.index(image_pad, st) if (image_pad in ids and remain_images > 0) else n_tok + 1
        ed_video = ids.index(video_pad, st) if (video_pad in ids and remain_videos > 0) else n_tok + 1
        if ed_image < ed_video:
            grid, sec = grids[image_index], 0.0
            image_index, remain_images, ed = image_index + 1, remain_images - 1, ed_image
        else:
            grid, sec = grids[video_index], second_per_grid_t
            video_index, remain_videos, ed = video_index + 1, remain_videos - 1, ed_video
        gt, gh, gw = int(grid[0]), int(grid[1]) // spatial_merge_size, int(grid[2]) // spatial_merge_size
        text_len = ed - st
        st_idx = int(pieces[-1].max()) + 1 if pieces else 0
        pieces.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + st_idx, (3, text_len)))
        # upstream forms the temporal product in float32 and truncates
        t_idx = (np.arange(gt, dtype=np.float32) * np.float32(sec) * np.float32(tokens_per_second)).astype(np.int64)
        t_index = np.repeat(t_idx, gh * gw)
        h_index = np.tile(np.repeat(np.arange(gh, dtype=np.int64), gw), gt)
        w_index = np.tile(np.arange(gw, dtype=np.int64), gt * gh)
        pieces.append(np.stack([t_index, h_index, w_index]) + text_len + st_idx)
        st = ed + gt * gh * gw
    if st < n_tok:
        st_idx = int(pieces[-1].max()) + 1 if pieces else 0
        text_len = n_tok - st
        pieces.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + st_idx, (3, text_len)))
    return np.concatenate(pieces, axis=1)


def attention_mask(split_lens: Seq[int], attn_modes: Seq[str]) -> np.ndarray:
    """(L, L) boolean mask of upstream data/data_utils.py::create_sparse_mask (True = may attend).

    Allowed(q, k) = (k <= q or q, k in the same full/noise split) and not (k in a noise split other than q's).
    """
    modes = ["full" if m in ("full_noise", "full_noise_target") else m for m in attn_modes]
    full_id = np.concatenate([np.full(n, i if m in ("full", "noise") else -1) for i, (n, m) in
                              enumerate(zip(split_lens, modes))])
    noise_id = np.concatenate([np.full(n, i if m == "noise" else -1) for i, (n, m) in
                               enumerate(zip(split_lens, modes))])
    n = len(full_id)
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (k <= q) | ((full_id[:, None] == full_id[None, :]) & (full_id[:, None] >= 0))
    blocked = (noise_id[None, :] >= 0) & (noise_id[:, None] != noise_id[None, :])
    return allowed & ~blocked

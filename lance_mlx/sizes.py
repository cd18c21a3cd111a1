"""Sizes and frame counts the model can take: output sizes in 16 px steps, 4k + 1 frame counts, and the bounds of
its 3-D latent position table. The request types (tasks.py) check user input with them, the model (lance.py)
checks latent grids with them."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .config import LanceConfig
from .errors import InvalidRequestError, InvalidTypeError

# The model's geometry (upstream inference_lance.sh: latent patch 1, max_latent_size 64, max_num_frames 121).
_GEOMETRY = LanceConfig()
SIZE_STRIDE = _GEOMETRY.vae_spatial_stride  # output sizes are multiples of 16 px
# Upstream indexes its 3-D latent table (modeling_utils.py::PositionEmbedding3D: 31 frames x 64 x 64 rows) at
# t*64*64 + h*64 + w (data_utils.py::get_flattened_position_ids_extrapolate_video), 64 = max_latent_size whatever
# the grid: a column past 64 takes the next row's entry, a row past 64 the next frame's. Its only size bound is the
# table's end (an index past it fails the lookup): the last latent of the grid must land inside.
TABLE_SIDE = _GEOMETRY.max_latent_size
TABLE_ROWS = _GEOMETRY.max_latent_frames * TABLE_SIDE ** 2  # 126976
FRAME_STRIDE = _GEOMETRY.vae_temporal_stride  # pixel frame counts are 4k + 1
MAX_FRAMES = FRAME_STRIDE * (_GEOMETRY.max_latent_frames - 1) + 1  # 121
MIN_I2V_FRAMES = FRAME_STRIDE + 1  # the image's latent frame, then at least one generated one


def check_size(width, height, num_frames: int = 1) -> Tuple[int, int]:
    """(width, height) as ints: positive multiples of 16 whose latent grid, `num_frames` long, stays inside the
    3-D position table (check_latent_grid)."""
    out = []
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InvalidTypeError(f"{name} must be a whole number of pixels, got {type(v).__name__} {v!r}")
        v = int(v)
        if v <= 0 or v % SIZE_STRIDE:
            lo, hi = max(SIZE_STRIDE, (v // SIZE_STRIDE) * SIZE_STRIDE), (max(v, 0) // SIZE_STRIDE + 1) * SIZE_STRIDE
            raise InvalidRequestError(f"{name} {v} is not a positive multiple of {SIZE_STRIDE}; use e.g. {lo} or {hi}")
        out.append(v)
    w, h = out
    check_latent_grid((latent_frames(num_frames), h // SIZE_STRIDE, w // SIZE_STRIDE))
    return w, h


def check_latent_grid(shape, max_frames: int = _GEOMETRY.max_latent_frames, side: int = TABLE_SIDE,
                      context: int = _GEOMETRY.llm.max_position_embeddings) -> None:
    """Refuse a latent grid (t, h, w) whose last table index (t-1)*side^2 + (h-1)*side + (w-1) is past the table
    (upstream's one bound, see TABLE_ROWS), naming the largest sizes that fit; or whose tokens alone exceed the
    LLM's context (Lance._check_length, checked here before any weights load)."""
    t, h, w = (int(v) for v in shape)
    if min(t, h, w) < 1:
        raise InvalidRequestError(f"latent grid {(t, h, w)} must be positive in every axis")
    px, frame = SIZE_STRIDE, side * side
    in_frame = (h - 1) * side + (w - 1)  # the last latent's index within its frame
    room = (max_frames - t + 1) * frame - 1  # the largest in_frame that t frames leave inside the table
    size = f"size {w * px}x{h * px}" + (f" with {FRAME_STRIDE * (t - 1) + 1} frames" if t > 1 else "")
    if in_frame > room:
        fits = []
        if w - 1 <= room:  # this width, the tallest height
            fits.append(f"{w * px}x{((room - (w - 1)) // side + 1) * px}")
        if (h - 1) * side <= room:  # this height, the widest width
            fits.append(f"{(room - (h - 1) * side + 1) * px}x{h * px}")
        if t > 1 and in_frame < max_frames * frame:  # this size, the most frames
            fits.append(f"{FRAME_STRIDE * ((max_frames * frame - 1 - in_frame) // frame) + 1} frames")
        raise InvalidRequestError(
            f"{size} reaches past the model's 3-D position table ({max_frames} frames x {side} x {side} latents, "
            f"indexed t*{frame} + h*{side} + w as upstream); the largest that fit: "
            f"{' or '.join(fits) or f'{side * px}x{side * px}'}")
    if t * h * w > context:
        raise InvalidRequestError(f"{size} is {t * h * w} latent tokens, more than the model's context of {context} "
                                  "tokens; use a smaller size" + (" or fewer frames" if t > 1 else ""))


def latent_grid(width: int, height: int) -> Tuple[int, int]:
    """Latent rows and columns (h, w) of an output size."""
    w, h = check_size(width, height)
    return h // SIZE_STRIDE, w // SIZE_STRIDE


def nearest_valid_frames(n: int) -> Tuple[int, ...]:
    """The 4k + 1 frame counts next to `n` (one value when `n` is below 5)."""
    n = int(n)
    if n <= 1:
        return (1,)
    lo = (n - 1) // FRAME_STRIDE * FRAME_STRIDE + 1
    return (lo,) if lo == n else (lo, lo + FRAME_STRIDE)


def latent_frames(num_frames, what: str = "frame count") -> int:
    """Latent frames (F - 1) / 4 + 1 of F pixel frames, or an error naming the valid counts (the VAE encodes frame
    0 alone, then groups of 4; the position table has 31 latent frames)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise InvalidRequestError(f"{what} must be a positive integer 4k+1 (1, 5, 9, ...), got {num_frames!r}")
    if (num_frames - 1) % FRAME_STRIDE:
        near = " or ".join(str(v) for v in nearest_valid_frames(num_frames) if v <= MAX_FRAMES)
        raise InvalidRequestError(f"{what} {num_frames} is not of the form 4k+1 (the VAE encodes frame 0 alone, then "
                                  f"groups of 4); use {near}")
    if num_frames > MAX_FRAMES:
        raise InvalidRequestError(f"{what} {num_frames} is too long: the 3-D latent position table has "
                                  f"{_GEOMETRY.max_latent_frames} latent frames, so at most {MAX_FRAMES} frames; use "
                                  f"{MAX_FRAMES} or fewer")
    return (int(num_frames) - 1) // FRAME_STRIDE + 1

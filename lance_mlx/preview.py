"""Live previews of a generation: a `sampler.Step`'s data prediction seen through a linear latent→RGB map (fast)
or the VAE (full), as images, a preview file rewritten as the steps go, or a small JPEG data URL."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import InvalidRequestError
from .media import IMAGE_SUFFIXES, SOFTWARE, check_output, save_image, save_video, to_uint8

MODES = ("fast", "full")
SPATIAL_STRIDE = 16  # output pixels per latent token along each side (vae_wan22.SPATIAL_STRIDE)
TEMPORAL_STRIDE = 4  # output frames per latent frame after the first (vae_wan22.TEMPORAL_STRIDE)

# Latent → RGB map of the Wan 2.2 VAE (z_dim 48), ComfyUI comfy/latent_formats.py, class Wan22
# (`latent_rgb_factors`, rows = latent channels, columns = R, G, B; `latent_rgb_factors_bias`). ComfyUI applies it
# to its model-space latents, (raw - latents_mean) / latents_std with the same per-channel statistics as our
# vae_wan22.LATENTS_MEAN / LATENTS_STD (tests/test_preview.py checks that), i.e. exactly the normalised latents
# Lance samples and our VAE encodes to; the result is RGB in about [-1, 1], the VAE's pixel range.
WAN22_LATENT_RGB = (
    (0.0119, 0.0103, 0.0046), (-0.1062, -0.0504, 0.0165), (0.0140, 0.0409, 0.0491), (-0.0813, -0.0677, 0.0607),
    (0.0656, 0.0851, 0.0808), (0.0264, 0.0463, 0.0912), (0.0295, 0.0326, 0.0590), (-0.0244, -0.0270, 0.0025),
    (0.0443, -0.0102, 0.0288), (-0.0465, -0.0090, -0.0205), (0.0359, 0.0236, 0.0082), (-0.0776, 0.0854, 0.1048),
    (0.0564, 0.0264, 0.0561), (0.0006, 0.0594, 0.0418), (-0.0319, -0.0542, -0.0637), (-0.0268, 0.0024, 0.0260),
    (0.0539, 0.0265, 0.0358), (-0.0359, -0.0312, -0.0287), (-0.0285, -0.1032, -0.1237), (0.1041, 0.0537, 0.0622),
    (-0.0086, -0.0374, -0.0051), (0.0390, 0.0670, 0.2863), (0.0069, 0.0144, 0.0082), (0.0006, -0.0167, 0.0079),
    (0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), (0.0714, 0.0827, 0.0447), (-0.0304, -0.0574, -0.0196),
    (0.0401, 0.0384, 0.0204), (-0.0758, -0.0297, -0.0014), (0.0568, 0.1307, 0.1372), (-0.0055, -0.0310, -0.0380),
    (0.0239, -0.0305, 0.0325), (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), (0.0166, 0.0112, -0.0093),
    (-0.0211, 0.0011, 0.0331), (0.1833, 0.1466, 0.2250), (-0.0368, 0.0370, 0.0295), (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153, 0.0800), (-0.0101, 0.0068, 0.0156), (-0.0690, -0.0452, -0.0927),
    (-0.0145, 0.0041, 0.0015), (0.0421, 0.0451, 0.0373), (0.0504, -0.0483, -0.0356), (-0.0837, 0.0168, 0.0055),
)
WAN22_LATENT_RGB_BIAS = (0.0317, -0.0878, -0.1388)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidRequestError(f"preview mode {mode!r} is not one of {', '.join(MODES)}", "preview_mode")
    return mode


# ------------------------------------------------------------------------------------------------ the maps
def latent_rgb(latents: mx.array) -> mx.array:
    """(..., 48) normalised latents → (..., 3) RGB in about [-1, 1] through the fixed linear map (no VAE)."""
    weight = mx.array(WAN22_LATENT_RGB, dtype=mx.float32)
    return latents.astype(mx.float32) @ weight + mx.array(WAN22_LATENT_RGB_BIAS, dtype=mx.float32)


def fast_rgb(x0: mx.array, grid: Tuple[int, int, int]) -> np.ndarray:
    """(N, 48) latents of a (T, h, w) grid → (T, h, w, 3) uint8: one pixel per latent token."""
    t, h, w = grid
    return to_uint8(np.array(latent_rgb(x0.reshape(t, h, w, -1))))


def full_rgb(x0: mx.array, grid: Tuple[int, int, int], vae) -> np.ndarray:
    """The VAE decode of the first latent frame (the image; a video's first frame) → (1, H, W, 3) uint8."""
    t, h, w = grid
    pixels = vae.decode(x0.reshape(1, t, h, w, -1)[:, :1], clamp=True)
    return to_uint8(np.array(pixels[0].astype(mx.float32)))


def _target_size(grid: Tuple[int, int, int], max_side: Optional[int]) -> Tuple[int, int]:
    """(width, height): the output's size, scaled down to fit `max_side` when given."""
    w, h = SPATIAL_STRIDE * grid[2], SPATIAL_STRIDE * grid[1]
    if max_side is not None and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = max(1, round(w * s)), max(1, round(h * s))
    return w, h


def preview_frames(step, mode: str = "fast", vae=None, max_side: Optional[int] = None) -> List[Image.Image]:
    """The step's data prediction as PIL images at the output size (or within `max_side`): fast, one per latent
    frame through the linear map, each token a 16x16 block; full, the VAE decode of the first latent frame."""
    check_mode(mode)
    if step.grid is None or step.x_t is None:
        raise InvalidRequestError("this step carries no latent grid or prediction: it comes from sampler.denoise "
                                  "without grid")
    x0 = step.prediction()
    if mode == "full":
        if vae is None:
            raise InvalidRequestError("a full preview decodes with the VAE: pass vae= (LancePipeline.preview does)")
        frames = full_rgb(x0, step.grid, vae)
    else:
        frames = fast_rgb(x0, step.grid)
    size = _target_size(step.grid, max_side)
    # fast: each latent token a block of pixels (nearest; a bilinear upsampling to 512² costs 10x the map itself)
    resample = Image.NEAREST if mode == "fast" else Image.LANCZOS
    return [img if img.size == size else img.resize(size, resample) for img in map(Image.fromarray, frames)]


def preview(step, mode: str = "fast", vae=None, max_side: Optional[int] = None):
    """A PIL image of the picture forming at `step`; for a video (more than one latent frame) a list of images:
    one per latent frame in fast mode, the first frame alone in full mode."""
    frames = preview_frames(step, mode, vae, max_side)
    return frames if step.grid[0] > 1 else frames[0]


def jpeg_data_url(image: Image.Image, max_side: int = 384, quality: int = 80) -> str:
    """A small JPEG `data:` URL of `image`, its longest side at most `max_side` (the server's preview events)."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.BILINEAR)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------------------- preview file
def check_preview_path(path, video: bool, force: bool = False, out=None) -> Path:
    """Check a --preview path before any work, with --out's rules (media.check_output): an image name, or for a
    video also a .gif; never the output itself."""
    from .errors import OutputError

    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    allowed = IMAGE_SUFFIXES + ((".gif",) if video else ())
    if suffix not in allowed:
        raise OutputError(f"--preview {path} is not {'an image or .gif' if video else 'an image'} name: use one of "
                          f"{', '.join(allowed)}", "preview")
    if out is not None and path.resolve() == Path(out).expanduser().resolve():
        raise OutputError(f"--preview {path} is the output itself: give the preview another name", "preview")
    try:
        return check_output(path, ("image", "video"), force=force)
    except OutputError as e:
        raise OutputError(f"--preview: {e}", "preview") from None


class PreviewFile:
    """Writes the preview of every `every`-th step (and of the last) to `path`, atomically (media.py), so the
    file is a whole image after every write: for a .gif the prediction's frames (a video: one per latent frame,
    at `fps` / 4), else the image, or a video's middle preview frame (image-to-video's first frame is the given
    image). `vae()` gives the VAE for full previews. An earlier preview at `path` is replaced only with `replace`
    (the user's --force); after its first write the file is this run's own and each write replaces it."""

    def __init__(self, path, every: int = 1, mode: str = "fast", vae=None, fps: float = 12.0, replace: bool = False):
        self.path, self.every, self.mode = Path(path), every, check_mode(mode)
        self.vae, self.fps, self.replace = vae, fps, replace
        self.writes = 0

    def __call__(self, step) -> None:
        if step.index % self.every and step.index != step.total:
            return
        frames = preview_frames(step, self.mode, self.vae() if self.mode == "full" else None)
        meta = {"software": SOFTWARE, "preview": f"step {step.index} of {step.total}", "preview_mode": self.mode}
        replace = self.replace or self.writes > 0
        if self.path.suffix.lower() == ".gif":
            save_video([np.asarray(f) for f in frames], self.path, fps=self.fps / TEMPORAL_STRIDE, metadata=meta,
                       replace=replace)
        else:
            save_image(frames[len(frames) // 2], self.path, meta, replace=replace)
        self.writes += 1


def step_preview_url(step, max_side: int = 384) -> str:
    """The fast preview of a step as a small JPEG data URL (the server's `preview` events); of a video its middle
    frame (image-to-video's first frame is the given image, which does not change)."""
    frames = step.preview("fast", max_side=max_side)
    return jpeg_data_url(frames[len(frames) // 2] if isinstance(frames, list) else frames, max_side)

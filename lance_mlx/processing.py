"""Image/video input preprocessing for Lance: loading, bucket resize, VAE pixels and ViT patch rows."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# Sources: upstream bytedance/Lance data/datasets_custom/validation_dataset.py (presets, crops, mean/std, sampler
# arguments), data/video/transforms/bucket_resize.py (buckets), data/data_utils.py (patch order).
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")  # the input buckets (bucket_table)
BUCKET_STRIDE = 16
VAE_CROP = 16
VIT_CROP = 28  # patch 14 x spatial merge 2
VAE_MEAN = VAE_STD = 0.5  # pixels -> [-1, 1]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_PATCH = 14
VIT_TEMPORAL_PATCH = 2
VIT_MERGE = 2

# Frame sampler (MultiClipsFrameSampler as built by validation_dataset.py: temporal 4, sample_fps 12, kn+1,
# assert_seconds False, truncate False; max_duration falls back to 6.0 because DataConfig has no such field).
SAMPLE_FPS = 12
MAX_DURATION_S = 6.0
TEMPORAL_STRIDE = 4
DEFAULT_FPS = 24  # upstream's fallback when the container reports no average fps

# Our guard, not upstream's: refuse inputs that would cost minutes and gigabytes to decode before being
# downscaled to at most ~1 MP anyway. 64 MP = 8192 x 8192; 16384 px also bounds extreme strips.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_IMAGE_SIDE = 16384
# PIL's decompression-bomb guard set deliberately to the same bound (its default is ~89 MP): PIL warns above it
# and refuses in `Image.open` above twice it, before allocating; `load_image` checks the header's size against
# MAX_IMAGE_PIXELS itself before decoding, so the guard only backs up other PIL uses in this process.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class Preset:
    name: str
    vae_resolution: int  # bucket area = resolution^2 (stride 16), then crop to multiples of 16
    vit_resolution: int  # bucket area = resolution^2 (stride 16), then crop to multiples of 28


PRESETS = {
    p.name: p
    for p in (
        Preset("image_256res", 256, 224),
        Preset("image_512res", 512, 448),
        Preset("image_768res", 768, 672),
        Preset("video_192p", 256, 224),
        Preset("video_360p", 480, 476),
        Preset("video_480p", 640, 616),
    )
}


@dataclass
class VisualInput:
    """One image or video prepared for both branches (either may be None when not requested)."""

    vae_pixels: Optional[np.ndarray]  # (T, H, W, 3) float32 in [-1, 1]
    vit_patches: Optional[np.ndarray]  # (N, 1176) float32, rows (gt, gh/2, gw/2, 2, 2), each (C, tp, 14, 14)
    grid_thw: Optional[Tuple[int, int, int]]  # ViT grid (T/2, H/14, W/14); N = t*h*w, merged tokens N/4


def get_preset(preset: Union[str, Preset]) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown resolution preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


# Output sizes of upstream's app (bytedance/Lance common/gradio_utils/settings.py: ASPECT_RATIO_CHOICES and
# IMAGE_ASPECT_RATIO_TO_SIZE, VIDEO_480P_ASPECT_RATIO_TO_SIZE, VIDEO_360P_ASPECT_RATIO_TO_SIZE), (width, height)
# per aspect ratio, keyed by the side of the area they cover: image_768res 768², video_480p 640², video_360p 480².
# They are not the input buckets above (two more ratios; e.g. 4:3 at 768² is 880x672 here, 896x672 as a bucket).
OUTPUT_ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16")
OUTPUT_SIZES = {
    768: dict(zip(OUTPUT_ASPECT_RATIOS, ((1168, 496), (1024, 576), (944, 624), (880, 672), (768, 768), (672, 880),
                                         (624, 944), (576, 1024)))),
    640: dict(zip(OUTPUT_ASPECT_RATIOS, ((976, 416), (848, 480), (784, 528), (736, 560), (640, 640), (560, 736),
                                         (528, 784), (480, 848)))),
    480: dict(zip(OUTPUT_ASPECT_RATIOS, ((672, 288), (640, 352), (528, 352), (560, 416), (480, 480), (416, 560),
                                         (352, 528), (352, 640)))),
}


def output_size(aspect: str, resolution: int) -> Tuple[int, int]:
    """(width, height) of an output of `aspect` (one of OUTPUT_ASPECT_RATIOS) covering about resolution² pixels:
    upstream's app sizes at its three areas, upstream's bucket rule (bucket_table) at any other."""
    if resolution in OUTPUT_SIZES:
        return OUTPUT_SIZES[resolution][aspect]
    h, w = dict(zip(OUTPUT_ASPECT_RATIOS, bucket_table(resolution, aspect_ratios=OUTPUT_ASPECT_RATIOS)))[aspect]
    return w, h


# ----------------------------------------------------------------------------------------------- loading


def load_image(image: Union[str, Path, Image.Image]) -> Image.Image:
    """Open an image as RGB the way upstream does (validation_dataset.py::get_video_tensor_online): palette ->
    RGBA, RGBA composited on white, else RGB. 16-bit images are scaled to 8 bits first (PIL's own conversion to
    RGB would clip them to white). Gray+alpha (LA) is composited on white like RGBA, where upstream's plain
    convert("RGB") would drop its alpha (docs/upstream-notes.md)."""
    if isinstance(image, Image.Image):
        img, name = image, "image"
    else:
        path = Path(image)
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: file is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                # Our own size check below gives the clearer message.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(_bomb_message(path, e)) from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    check_image_size(img.size, name)
    try:
        img.load()
    except (OSError, SyntaxError) as e:  # truncated or corrupt data surfaces at decode time
        raise ValueError(f"{name}: cannot decode image data ({e})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale: scale to 8 bits, never clip
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("P", "LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _bomb_message(name, error) -> str:
    """Our one line for PIL's refusal at open (an image over twice MAX_IMAGE_PIXELS), naming size and limit."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found[1]) / 1e6:.0f} MP" if found else f"over {2 * MAX_IMAGE_PIXELS / 2**20:.0f} MP"
    return (f"{name}: image is {size}; the limit is {MAX_IMAGE_PIXELS / 2**20:.0f} MP and {MAX_IMAGE_SIDE} px per "
            "side (inputs are bucketed to at most ~1 MP); downscale it first")


def check_image_size(size: Tuple[int, int], name: str = "image") -> None:
    """Raise ValueError for an empty image or one beyond MAX_IMAGE_SIDE / MAX_IMAGE_PIXELS. `size` is (W, H)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"{name}: image has zero width or height ({w}x{h})")
    if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{name}: image is {w}x{h} ({w * h / 1e6:.0f} MP); the limit is {MAX_IMAGE_SIDE} px per side and "
            f"{MAX_IMAGE_PIXELS / 2**20:.0f} MP (inputs are bucketed to at most ~1 MP); downscale it first"
        )


def _to_frames(video) -> List[Image.Image]:
    """A (T, H, W, 3) uint8 array or a sequence of PIL images / (H, W, 3) uint8 arrays -> RGB PIL frames."""
    if isinstance(video, Image.Image):
        video = [video]
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video array must be (T, H, W, 3), got shape {video.shape}")
        video = list(video)
    frames = []
    for i, f in enumerate(video):
        if isinstance(f, Image.Image):
            frames.append(f if f.mode == "RGB" else f.convert("RGB"))
            continue
        f = np.asarray(f)
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[-1] != 3:
            raise ValueError(f"frame {i}: expected (H, W, 3) uint8, got {f.shape} {f.dtype}")
        frames.append(Image.fromarray(f))
    if not frames:
        raise ValueError("video has no frames")
    size = frames[0].size
    check_image_size(size, "video frame")
    if any(f.size != size for f in frames):
        raise ValueError("all video frames must have the same size")
    return frames


# ------------------------------------------------------------------------------------------ bucket resize


@lru_cache(maxsize=None)
def bucket_table(resolution: int, stride: int = BUCKET_STRIDE,
                 aspect_ratios: Tuple[str, ...] = ASPECT_RATIOS) -> Tuple[Tuple[int, int], ...]:
    """(height, width) of each aspect-ratio bucket for area resolution^2 (upstream BucketResize.init_buckets).

    Python's round() is banker's rounding, which upstream relies on (e.g. 616/16 = 38.5 -> 38 => 608, not 624).
    """
    area = resolution * resolution
    buckets = []
    for name in aspect_ratios:
        rw, rh = (int(v) for v in name.split(":"))
        r = rw / rh
        # Option 1 fixes the width first, option 2 the height; keep the one closer to r, then closer in area.
        w1 = round(math.sqrt(area * r) / stride) * stride
        h1 = round(w1 / r / stride) * stride
        h2 = round(math.sqrt(area / r) / stride) * stride
        w2 = round(h2 * r / stride) * stride
        d1, d2 = abs(w1 / h1 - r), abs(w2 / h2 - r)
        if d1 < d2 or (d1 == d2 and abs(w1 * h1 - area) <= abs(w2 * h2 - area)):
            buckets.append((h1, w1))
        else:
            buckets.append((h2, w2))
    return tuple(buckets)


def nearest_bucket(width: int, height: int, resolution: int) -> Tuple[int, int]:
    """The bucket (h, w) whose w/h is nearest to width/height (first one on ties, like numpy argmin)."""
    buckets = bucket_table(resolution)
    ratios = np.array([w / h for h, w in buckets])
    return buckets[int(np.abs(width / height - ratios).argmin())]


def _crop_box(width: int, height: int, ratio: float) -> Tuple[int, int, int, int]:
    """Crop (left, top, right, bottom) of torchvision RandomResizedCrop(scale=(1, 1), ratio=(r, r)).

    torchvision first tries the full area at aspect exp(log r) (float32): that fits only when the input already
    has the bucket's aspect up to rounding; upstream then draws a random offset in the 0..few px slack, we take
    the centred one. Otherwise all 10 tries fail identically and its deterministic fallback applies.
    """
    area = width * height
    r32 = float(np.exp(np.float32(np.log(ratio))))
    w = int(round(math.sqrt(area * r32)))
    h = int(round(math.sqrt(area / r32)))
    if not (0 < w <= width and 0 < h <= height):
        in_ratio = width / height
        if in_ratio < ratio:
            w, h = width, int(round(width / ratio))
        elif in_ratio > ratio:
            w, h = int(round(height * ratio)), height
        else:
            w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def bucket_resize(frames: Sequence[Image.Image], resolution: int) -> np.ndarray:
    """Bucket from the first frame, crop to the bucket's aspect, PIL BICUBIC resize per frame -> (T, h, w, 3) uint8."""
    width, height = frames[0].size
    bh, bw = nearest_bucket(width, height, resolution)
    box = _crop_box(width, height, bw / bh)
    return np.stack([np.asarray(f.crop(box).resize((bw, bh), Image.Resampling.BICUBIC)) for f in frames])


def divisible_crop(video: np.ndarray, factor: int) -> np.ndarray:
    """Centre-crop (T, H, W, C) to multiples of `factor`, offsets as torchvision center_crop (round half to even)."""
    _, H, W, _ = video.shape
    ch, cw = H - H % factor, W - W % factor
    top, left = int(round((H - ch) / 2.0)), int(round((W - cw) / 2.0))
    return video[:, top:top + ch, left:left + cw]


def _normalize(video: np.ndarray, mean, std) -> np.ndarray:
    # float32 throughout, like to_tensor (x / 255) and Normalize ((x - mean) / std) on float32 tensors.
    x = video.astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)


# --------------------------------------------------------------------------------------------- branches


def prepare_vae_pixels(frames, resolution: int) -> np.ndarray:
    """VAE branch: bucket resize (area resolution^2), crop to multiples of 16, scale to [-1, 1] -> (T, H, W, 3)."""
    video = divisible_crop(bucket_resize(_to_frames(frames), resolution), VAE_CROP)
    return _normalize(video, VAE_MEAN, VAE_STD)


def prepare_vit_patches(frames, resolution: int, is_image: bool) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """ViT branch: bucket resize, crop to multiples of 28, CLIP normalize, image -> 2 frames, odd video -> repeat
    the last frame; returns (patch rows (N, 1176), grid_thw)."""
    frames = _to_frames(frames)
    if is_image and len(frames) != 1:
        raise ValueError(f"an image has one frame, got {len(frames)}")
    video = _normalize(divisible_crop(bucket_resize(frames, resolution), VIT_CROP), CLIP_MEAN, CLIP_STD)
    if is_image:
        video = np.concatenate([video, video], axis=0)
    if video.shape[0] % VIT_TEMPORAL_PATCH:
        video = np.concatenate([video, video[-1:]], axis=0)
    return patchify(video)


def patchify(video: np.ndarray, patch: int = VIT_PATCH, temporal_patch: int = VIT_TEMPORAL_PATCH,
             merge: int = VIT_MERGE) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """(T, H, W, C) -> rows ordered (gt, gh/m, gw/m, m, m), each flattened (C, tp, p, p); grid (gt, gh, gw).

    Same order as upstream patchify_video_with_merge and the Hugging Face Qwen2-VL processor.
    """
    T, H, W, C = video.shape
    if T % temporal_patch or H % (patch * merge) or W % (patch * merge):
        raise ValueError(f"video {T}x{H}x{W} must have T % {temporal_patch} == 0 and H, W multiples of {patch * merge}")
    gt, gh, gw = T // temporal_patch, H // patch, W // patch
    x = video.reshape(gt, temporal_patch, gh // merge, merge, patch, gw // merge, merge, patch, C)
    # axes: 0 gt, 1 tp, 2 gh/m, 3 mh, 4 py, 5 gw/m, 6 mw, 7 px, 8 C
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, C * temporal_patch * patch * patch)), (gt, gh, gw)


# ---------------------------------------------------------------------------------------------- sampler


def sample_frame_indices(num_frames: int, fps: float, sample_fps: int = SAMPLE_FPS,
                         max_duration: float = MAX_DURATION_S, temporal: int = TEMPORAL_STRIDE) -> List[int]:
    """Upstream's inference frame sampler: 12 fps over at most 6 s, 4k+1 frames, spread over the WHOLE video.

    `fps` is rounded to an int first, as upstream does with the container's average fps. Examples:
    93 frames @ 24 -> 45, 121 @ 24 -> 57, anything >= 6 s -> 69.
    """
    if num_frames < 1:
        raise ValueError("video has no frames")
    fps = int(round(float(fps))) if fps else DEFAULT_FPS
    if fps <= 0:
        fps = DEFAULT_FPS
    duration = min(num_frames / fps, max_duration)
    n = int(round(duration * sample_fps))
    n = n // temporal * temporal + 1 if n % temporal else n // temporal * temporal + 1 - temporal
    if n < 1:
        raise ValueError(
            f"video too short: {num_frames} frame(s) at {fps} fps is {num_frames / fps:.3f} s; more than "
            f"{0.5 / sample_fps:.3f} s is needed for one sampled frame"
        )
    return np.linspace(0, num_frames - 1, n, dtype=int).tolist()


# -------------------------------------------------------------------------------------------- top level


def preprocess_image(image, preset: Union[str, Preset] = "image_768res", vae: bool = True,
                     vit: bool = True) -> VisualInput:
    """Image (path or PIL) -> VAE pixels (1, H, W, 3) and/or ViT patches + grid for `preset`."""
    p = get_preset(preset)
    img = load_image(image)
    pixels = prepare_vae_pixels([img], p.vae_resolution) if vae else None
    patches, grid = prepare_vit_patches([img], p.vit_resolution, is_image=True) if vit else (None, None)
    return VisualInput(pixels, patches, grid)


def preprocess_video(video, preset: Union[str, Preset] = "video_480p", fps: Optional[float] = None,
                     vae: bool = True, vit: bool = True) -> VisualInput:
    """Video -> VAE pixels (T, H, W, 3) and/or ViT patches + grid for `preset`.

    `video` is a file path (sampled while decoded, by lance_mlx.video_input.read_video), or decoded frames: a
    (T, H, W, 3) uint8 array or a list of PIL images / arrays. Decoded frames are sampled with
    `sample_frame_indices` when `fps` is given and used as they are otherwise.
    """
    p = get_preset(preset)
    if isinstance(video, (str, Path)):
        from .video_input import read_video

        given_fps = fps  # sampled while decoding, so only the sampled frames are kept; then used as they are
        video, _ = read_video(video, frame_indices=lambda n, file_fps: sample_frame_indices(n, given_fps or file_fps))
        fps = None
    frames = _to_frames(video)
    if fps is not None:
        frames = [frames[i] for i in sample_frame_indices(len(frames), fps)]
    pixels = prepare_vae_pixels(frames, p.vae_resolution) if vae else None
    patches, grid = prepare_vit_patches(frames, p.vit_resolution, is_image=False) if vit else (None, None)
    return VisualInput(pixels, patches, grid)


__all__ = [
    "ASPECT_RATIOS", "CLIP_MEAN", "CLIP_STD", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "PRESETS", "Preset",
    "VisualInput", "bucket_resize", "bucket_table", "check_image_size", "divisible_crop", "get_preset",
    "load_image", "nearest_bucket", "patchify", "prepare_vae_pixels", "prepare_vit_patches", "preprocess_image",
    "preprocess_video", "sample_frame_indices",
]

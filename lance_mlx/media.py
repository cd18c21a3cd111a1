"""Reading videos and writing images/videos atomically (PNG with settings metadata, H.264 MP4, GIF, PNG frames)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
from PIL import Image, PngImagePlugin

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@contextlib.contextmanager
def atomic_output(dest, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds.

    An interrupted or failed write therefore never leaves a partial file under the final name.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".partial{dest.suffix}", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create private files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
        if is_dir and dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def to_uint8(pixels) -> np.ndarray:
    """[-1, 1] floats (any leading dims, channels last) → uint8, as upstream: round((x·0.5 + 0.5)·255)."""
    x = np.asarray(pixels, dtype=np.float32)
    x = np.clip(x, -1.0, 1.0)
    return np.round((x * 0.5 + 0.5) * 255.0).astype(np.uint8)


def save_image(image, path, metadata: Optional[Dict[str, object]] = None) -> Path:
    """Save a PIL image or (H, W, 3) uint8 array; PNGs carry `metadata` as text chunks."""
    path = Path(path)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format from {path.name!r}: use a .png, .jpg or .webp name")
    kwargs = {}
    if fmt == "PNG" and metadata:
        info = PngImagePlugin.PngInfo()
        for k, v in metadata.items():
            info.add_text(str(k), str(v))
        kwargs["pnginfo"] = info
    with atomic_output(path) as tmp:
        img.save(tmp, format=fmt, **kwargs)
    return path


def save_video(frames: Iterable[np.ndarray], path, fps: float = 12.0, size: Optional[Tuple[int, int]] = None,
               metadata: Optional[Dict[str, object]] = None) -> Path:
    """Write (H, W, 3) uint8 frames as H.264 MP4 (imageio-ffmpeg), GIF, or a folder of PNG frames.

    The format follows the suffix (`.mp4`/`.mov`/`.mkv` → H.264, `.gif` → GIF, no suffix → PNG frames).
    Frames may come from a generator, so a long video is never held in memory twice.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return _save_gif(frames, path, fps)
    if suffix == "":
        return _save_png_frames(frames, path, metadata)
    if suffix not in (".mp4", ".mov", ".mkv"):
        raise ValueError(f"unsupported video format {suffix!r}: use .mp4, .gif, or a name without a suffix for "
                         "a folder of PNG frames")
    import imageio_ffmpeg

    frames = iter(frames)
    first = np.asarray(next(frames), dtype=np.uint8)
    h, w = first.shape[:2]
    with atomic_output(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None,
            output_params=["-crf", "18", "-movflags", "+faststart"]
            + sum((["-metadata", f"comment={k}={v}"] for k, v in (metadata or {}).items()), []),
            macro_block_size=2, ffmpeg_log_level="error")
        writer.send(None)
        try:
            writer.send(np.ascontiguousarray(first))
            for f in frames:
                writer.send(np.ascontiguousarray(np.asarray(f, dtype=np.uint8)))
        finally:
            writer.close()
    return path


def _save_gif(frames, path: Path, fps: float) -> Path:
    imgs = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    with atomic_output(path) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)),
                     loop=0)
    return path


def _save_png_frames(frames, path: Path, metadata) -> Path:
    with atomic_output(path, is_dir=True) as tmp:
        for i, f in enumerate(frames):
            save_image(f, tmp / f"frame_{i:05d}.png", metadata)
    return path


def read_video(path) -> Tuple[np.ndarray, float]:
    """Decode every frame of a video file → ((T, H, W, 3) uint8, fps). GIFs go through PIL."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"video file is empty: {path}")
    if path.suffix.lower() == ".gif":
        try:
            with Image.open(path) as im:
                fps = 1000.0 / max(im.info.get("duration", 83), 1)
                frames = []
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    frames.append(np.asarray(im.convert("RGB")))
        except Exception as e:
            raise ValueError(f"cannot read GIF {path}: {e}") from None
        return np.stack(frames), fps
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader]
    except (RuntimeError, OSError, StopIteration) as e:
        raise ValueError(f"cannot decode video {path}: {str(e).strip().splitlines()[-1] if str(e) else e}; "
                         "is it a valid video file (mp4/mov/mkv/webm/gif)?") from None
    if not frames:
        raise ValueError(f"video {path} has no decodable frames")
    return np.stack(frames), float(meta.get("fps") or 24.0)

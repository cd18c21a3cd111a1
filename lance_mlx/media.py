"""Reading videos and writing images/videos atomically (PNG with settings metadata, H.264 MP4, GIF, PNG frames)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
from PIL import Image, PngImagePlugin

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


SOFTWARE = "lance-mlx"  # the `software` metadata value that marks an output as this tool's own
VIDEO_OUT_SUFFIXES = (".mp4", ".mov", ".mkv", ".gif", "")  # "" = a folder of PNG frames


# ----------------------------------------------------------------------------------------------- output paths
def output_kind(path) -> str:
    """"image", "video" or "frames" (a suffix-less name: a folder of PNG frames) from an output name."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    return "frames" if suffix == "" else "video"


def free_path(path) -> Path:
    """The first of `path`, `stem-1.ext`, `stem-2.ext`, ... that does not exist."""
    path = Path(path)
    n = 1
    cand = path
    while cand.exists() or cand.is_symlink():
        cand = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return cand


def is_own_output(path) -> bool:
    """Whether `path` is an earlier output of this tool: an image / video whose metadata says software=lance-mlx,
    or a folder holding only such PNG frames (frame_NNNNN.png). Anything else is the user's."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        entries = list(path.iterdir())
        return bool(entries) and all(e.is_file() and e.name.startswith("frame_") and e.suffix == ".png"
                                     and is_own_output(e) for e in entries)
    if not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES + (".gif",):
        try:
            with Image.open(path) as im:
                info = dict(getattr(im, "text", {}) or {})
                comment = im.info.get("comment", b"")
                software = info.get("software") or im.getexif().get(0x0131)
        except (OSError, ValueError):
            return False
        return software == SOFTWARE or SOFTWARE.encode() in (comment if isinstance(comment, bytes) else b"")
    # videos: ffmpeg writes the metadata as plain UTF-8 in the moov box, at the head with +faststart
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return f'"software": "{SOFTWARE}"'.encode() in head


def check_output(path, kinds=("image", "video", "frames"), force: bool = False) -> Path:
    """Check an output path before any work; returns it. Refuses (OutputError, naming a free path):
    an unsupported kind; `.`, `..`, `/` or the home folder; an existing folder other than an earlier PNG-frame
    output; an existing file unless `force` is set and it is an earlier output of this tool (`is_own_output`);
    a parent that is a file or not writable."""
    from .errors import OutputError

    path = Path(path).expanduser()
    kind = output_kind(path)
    if kind not in kinds or (kind == "video" and path.suffix.lower() not in VIDEO_OUT_SUFFIXES):
        if "image" in kinds:
            raise OutputError(f"{path} is not an image name: use one of {', '.join(IMAGE_SUFFIXES)}", "out")
        raise OutputError(f"{path} is not a video name: use .mp4, .mov, .mkv, .gif, or a name without a suffix for "
                          "a folder of PNG frames", "out")
    resolved = path.resolve()
    if str(path) in (".", "..", "") or resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise OutputError(f"refusing to write over {path} (a folder that is not this tool's): name a new output, "
                          f"e.g. {free_path(Path(resolved) / ('out' + ('.png' if kind == 'image' else '.mp4')))}")
    if path.exists() or path.is_symlink():
        what = "folder" if path.is_dir() else "file"
        if not is_own_output(path):
            raise OutputError(f"{path} exists and is not an output of lance-mlx; it is left alone: choose a free "
                              f"name, e.g. {free_path(path)}")
        if not force:
            raise OutputError(f"{path} exists (an earlier lance-mlx {what}): pass --force to replace it, or choose "
                              f"a free name, e.g. {free_path(path)}")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent} (permission denied): choose an output in a writable folder")
    return path


@contextlib.contextmanager
def atomic_output(dest, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; move it onto `dest` only if the block succeeds.

    An interrupted or failed write never leaves a partial file under the final name. An existing folder at
    `dest` is replaced only when it is an earlier output of this tool (`is_own_output`); it is moved aside first
    and deleted once the new one is in place.
    """
    from .errors import OutputError

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".partial{dest.suffix}", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    old = None
    try:
        yield tmp
        # mkstemp/mkdtemp create private files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)
        if dest.is_dir() and not dest.is_symlink():
            if not (is_dir and is_own_output(dest)):
                raise OutputError(f"{dest} is a folder that is not an output of lance-mlx; it is left alone")
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if old is not None and not dest.exists():
            os.replace(old / dest.name, dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
    elif metadata and "software" in metadata:  # JPEG / WebP: the EXIF Software tag marks our own outputs
        exif = Image.Exif()
        exif[0x0131] = str(metadata["software"])
        kwargs["exif"] = exif
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
        return _save_gif(frames, path, fps, metadata)
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
            output_params=["-crf", "18", "-movflags", "+faststart"] + _ffmpeg_metadata(metadata),
            macro_block_size=2, ffmpeg_log_level="error")
        writer.send(None)
        try:
            writer.send(np.ascontiguousarray(first))
            for f in frames:
                writer.send(np.ascontiguousarray(np.asarray(f, dtype=np.uint8)))
        finally:
            writer.close()
    return path


def _ffmpeg_metadata(metadata: Optional[Dict[str, object]]) -> list:
    """Every setting in one `comment` tag as JSON (ffprobe shows it), the prompt also as `title`."""
    if not metadata:
        return []
    meta = {str(k): v if isinstance(v, (int, float, bool)) else str(v) for k, v in metadata.items()}
    out = ["-metadata", "comment=" + json.dumps(meta, ensure_ascii=False)]
    title = meta.get("prompt") or meta.get("instruction")
    return out + (["-metadata", f"title={title}"] if title else [])


def _save_gif(frames, path: Path, fps: float, metadata) -> Path:
    imgs = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    extra = {"comment": json.dumps({str(k): str(v) for k, v in metadata.items()})} if metadata else {}
    with atomic_output(path) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)),
                     loop=0, **extra)
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

"""Writing images/videos atomically (PNG with settings metadata, H.264 MP4, GIF, PNG frames)."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
from PIL import Image, PngImagePlugin

from .publish import free_path, publish, remove  # noqa: F401  (free_path: part of this module's API)

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


def is_own_output(path, like=None) -> bool:
    """Whether `path` is an earlier output of this tool: an image / video / JSON sidecar whose metadata says
    software=lance-mlx, or a folder holding only such PNG frames (frame_NNNNN.png). Anything else is the user's.
    `like`: the name whose suffix tells the format, when `path` is a temporary name (default: `path`)."""
    path = Path(path)
    suffix = Path(like or path).suffix.lower()
    if path.is_symlink():
        return False
    if path.is_dir():
        if suffix:  # PNG-frame outputs are suffix-less names (output_kind)
            return False
        entries = list(path.iterdir())
        return bool(entries) and all(e.is_file() and e.name.startswith("frame_") and e.suffix == ".png"
                                     and is_own_output(e) for e in entries)
    if not path.is_file():
        return False
    if suffix == ".json":  # a --metadata-json sidecar
        return _is_own_json(path)
    if suffix in IMAGE_SUFFIXES + (".gif",):
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
    what = "folder" if path.is_dir() else "file"
    return _check_replaceable(path, force, "out", "an output of lance-mlx", f"an earlier lance-mlx {what}")


def _check_replaceable(path: Path, force: bool, param: str, foreign: str, earlier: str) -> Path:
    """The rules every output path shares: an existing path must be our own (`is_own_output`) and `force` given;
    the nearest existing parent must be a writable folder."""
    from .errors import OutputError

    if path.exists() or path.is_symlink():
        if not is_own_output(path):
            raise OutputError(f"{path} exists and is not {foreign}; it is left alone: choose a free name, e.g. "
                              f"{free_path(path)}", param)
        if not force:
            raise OutputError(f"{path} exists ({earlier}): pass --force to replace it, or choose a free name, e.g. "
                              f"{free_path(path)}", param)
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is a file, not a folder", param)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent} (permission denied): choose an output in a writable folder",
                          param)
    return path


# Size bounds of outputs, for the free-space check before any work: PNG stays within ~1 % of raw RGB (filter byte
# per row, zlib framing); H.264 at CRF 18 and GIF (8-bit palette) stay below raw YUV 4:2:0 (1.5 bytes per pixel).
_BYTES_PER_PIXEL = {"image": 3.03, "frames": 3.03, "video": 1.5}
_SLACK_BYTES = 1 << 20  # container headers, metadata, file-system blocks


def estimate_output_bytes(path, width: int, height: int, frames: int = 1) -> int:
    """An upper bound of the bytes an output of this size takes (`path` tells the format)."""
    return int(_BYTES_PER_PIXEL[output_kind(path)] * width * height * frames) + _SLACK_BYTES


def _mb(n: int) -> str:
    return f"{max(n, 1) / 1e6:.1f} MB" if n < 1e8 else f"{n / 1e9:.2f} GB"


def check_free_space(path, need_bytes: int) -> None:
    """OutputError naming the folder, the need and what is free when `need_bytes` do not fit beside `path`."""
    from .errors import OutputError

    folder = Path(path).expanduser().absolute().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(f"not enough space on {folder} for {Path(path).name}: it needs about {_mb(need_bytes)}, "
                          f"{_mb(free)} are free; free some space or choose an --out on another disk", "out")


def sidecar_path(out) -> Path:
    """Where `--metadata-json` writes by default: beside the output, its name plus `.json`."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def _is_own_json(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("software") == SOFTWARE
    except (OSError, ValueError, AttributeError):
        return False


def check_sidecar(path, force: bool = False) -> Path:
    """Check a metadata sidecar path before any work, with the rules of `check_output`."""
    from .errors import OutputError

    path = Path(path).expanduser()
    if path.suffix.lower() != ".json":
        raise OutputError(f"{path} is not a .json name: name the metadata file NAME.json", "metadata_json")
    return _check_replaceable(path, force, "metadata_json", "a lance-mlx metadata file", "earlier lance-mlx metadata")


def save_metadata_json(metadata: Dict[str, object], path, replace: bool = False) -> Path:
    """Write `metadata` (which carries software=lance-mlx, the marker of our own files) as a JSON sidecar;
    `replace`: as in `atomic_output`."""
    with atomic_output(path, replace=replace) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_output(dest, is_dir: bool = False, size_hint: Optional[int] = None, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; put it under `dest` only if the block succeeds.

    An interrupted or failed write never leaves a partial file under the final name, and nothing this run did not
    create is ever replaced (`publish.publish`): a missing `dest` is created by a rename that fails if the name was
    taken meanwhile; an existing one is replaced only with `replace` (the user's --force) and only if it is still
    an earlier output of this tool at the moment of the swap. Otherwise the result goes to a free name beside it
    and `OutputTakenError` says where. A full disk becomes a `WriteError` naming the folder (and
    `size_hint`, the bytes the output needs, when known).
    """
    from .errors import WriteError

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
        _publish(tmp, dest, is_dir, replace)
    except BaseException as e:
        remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            need = f", it needs about {_mb(size_hint)}" if size_hint else ""
            raise WriteError(f"no space left on {dest.parent} while writing {dest.name}{need}; nothing was saved: "
                             "free some space or choose an --out on another disk") from None
        raise


def _publish(tmp: Path, dest: Path, is_dir: bool, replace: bool) -> None:
    """Move the finished `tmp` to `dest` (see `atomic_output`), or to a free name and raise OutputTakenError."""
    from .errors import OutputTakenError

    def ours(path: Path, like: Path) -> bool:  # an earlier output of this tool, a folder iff the new one is
        try:
            return path.is_dir() == is_dir and is_own_output(path, like=like)
        except OSError:
            return False

    saved = publish(tmp, dest, ours if replace else None)
    if saved is not None:
        raise OutputTakenError(f"{dest} is taken by something this run did not write (it was saved or changed there "
                               f"while the run was working), so it is left alone; the result was saved as {saved} "
                               "instead", saved=saved)


def to_uint8(pixels) -> np.ndarray:
    """[-1, 1] floats (any leading dims, channels last) → uint8, as upstream: round((x·0.5 + 0.5)·255)."""
    x = np.asarray(pixels, dtype=np.float32)
    x = np.clip(x, -1.0, 1.0)
    return np.round((x * 0.5 + 0.5) * 255.0).astype(np.uint8)


def save_image(image, path, metadata: Optional[Dict[str, object]] = None, replace: bool = False) -> Path:
    """Save a PIL image or (H, W, 3) uint8 array atomically; PNGs carry `metadata` as text chunks; `replace`: as
    in `atomic_output`."""
    path = Path(path)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    with atomic_output(path, size_hint=estimate_output_bytes(path, *img.size), replace=replace) as tmp:
        _write_image(img, tmp, path, metadata)
    return path


def _write_image(img: Image.Image, file: Path, dest: Path, metadata: Optional[Dict[str, object]]) -> None:
    """Write `img` to `file` in the format of `dest`'s suffix, then check it decodes."""
    fmt = Image.registered_extensions().get(dest.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format from {dest.name!r}: use a .png, .jpg or .webp name")
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
    img.save(file, format=fmt, **kwargs)
    _check_image(file, dest, img.size)


def _check_image(tmp: Path, dest: Path, size: Tuple[int, int]) -> None:
    """The written file must decode to an image of `size`, or nothing is saved."""
    from .errors import WriteError

    try:
        with Image.open(tmp) as im:
            im.load()
            ok = im.size == size
    except (OSError, ValueError, SyntaxError) as e:
        raise WriteError(f"the image written for {dest} does not decode ({e}); nothing was saved") from None
    if not ok:
        raise WriteError(f"the image written for {dest} is not {size[0]}x{size[1]}; nothing was saved")


def save_video(frames: Iterable[np.ndarray], path, fps: float = 12.0, size: Optional[Tuple[int, int]] = None,
               metadata: Optional[Dict[str, object]] = None, replace: bool = False) -> Path:
    """Write (H, W, 3) uint8 frames as H.264 MP4 (imageio-ffmpeg), GIF, or a folder of PNG frames.

    The format follows the suffix (`.mp4`/`.mov`/`.mkv` → H.264, `.gif` → GIF, no suffix → PNG frames).
    Frames may come from a generator, so a long video is never held in memory twice.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return _save_gif(frames, path, fps, metadata, replace)
    if suffix == "":
        return _save_png_frames(frames, path, metadata, replace)
    if suffix not in (".mp4", ".mov", ".mkv"):
        raise ValueError(f"unsupported video format {suffix!r}: use .mp4, .gif, or a name without a suffix for "
                         "a folder of PNG frames")
    frames = iter(frames)
    first = np.asarray(next(frames), dtype=np.uint8)
    h, w = first.shape[:2]
    with atomic_output(path, size_hint=estimate_output_bytes(path, w, h), replace=replace) as tmp:
        count = _encode_h264(itertools.chain([first], frames), (w, h), tmp, fps, metadata)
        _check_video(tmp, path, count, fps)
    return path


def _encode_h264(frames, size: Tuple[int, int], tmp: Path, fps: float, metadata) -> int:
    """Pipe uint8 RGB frames to the ffmpeg binary imageio-ffmpeg ships; returns the number sent.

    ffmpeg runs directly (not through imageio_ffmpeg.write_frames) because that helper hides ffmpeg's exit status
    and error output, which a full disk or a failed encoder only shows there. ffmpeg runs in its own session, so
    Ctrl-C reaches only us; we stop it and the caller removes the partial file.
    """
    import imageio_ffmpeg

    w, h = size
    even = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"] if (w % 2 or h % 2) else []  # yuv420p needs even sizes
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-nostdin", "-loglevel", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps:.6g}", "-i", "-", "-an", *even,
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18",
           "-movflags", "+faststart+use_metadata_tags", *_ffmpeg_metadata(metadata), "-f", "mp4", str(tmp)]
    if tmp.suffix.lower() in (".mov", ".mkv"):
        cmd[-2] = "mov" if tmp.suffix.lower() == ".mov" else "matroska"
    count = 0
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)
        try:
            for f in frames:
                f = np.ascontiguousarray(np.asarray(f, dtype=np.uint8))
                if f.shape != (h, w, 3):
                    raise ValueError(f"frame {count} is {f.shape}, the video is ({h}, {w}, 3)")
                proc.stdin.write(f.tobytes())
                count += 1
            proc.stdin.close()
            code = proc.wait()
        except BrokenPipeError:  # ffmpeg stopped early: its log says why
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        log.seek(0)
        message = log.read().decode("utf-8", "replace").strip()
    if code != 0:
        if "No space left" in message:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        from .errors import WriteError

        last = message.splitlines()[-1] if message else f"exit status {code}"
        raise WriteError(f"ffmpeg could not write {tmp.name.split('.partial')[0].lstrip('.')}{tmp.suffix}: {last}; "
                         "nothing was saved")
    return count


def _check_video(tmp: Path, dest: Path, count: int, fps: float) -> None:
    """The written file must decode to `count` frames lasting about count/fps seconds, or nothing is saved."""
    import imageio_ffmpeg

    from .errors import WriteError

    try:
        n, secs = imageio_ffmpeg.count_frames_and_secs(str(tmp))
    except (RuntimeError, OSError, ValueError) as e:
        raise WriteError(f"the video written for {dest} does not decode ({str(e).strip()[-200:]}); nothing was "
                         "saved") from None
    if n != count or abs(secs - count / fps) > 1.5 / fps + 0.05:
        raise WriteError(f"the video written for {dest} has {n} frames / {secs:.2f} s instead of {count} / "
                         f"{count / fps:.2f} s; nothing was saved")


def _ffmpeg_metadata(metadata: Optional[Dict[str, object]]) -> list:
    """Every setting as its own tag (ffprobe lists them), all of them again as JSON in `comment` (the marker of
    our own outputs), and the prompt as `title` for players."""
    if not metadata:
        return []
    meta = {str(k): v if isinstance(v, (int, float, bool)) else str(v) for k, v in metadata.items()}
    out = ["-metadata", "comment=" + json.dumps(meta, ensure_ascii=False)]
    for k, v in meta.items():
        if k not in ("comment", "title") and re.fullmatch(r"[a-z_]+", k):
            out += ["-metadata", f"{k}={v}"]
    title = meta.get("prompt") or meta.get("instruction")
    return out + (["-metadata", f"title={title}"] if title else [])


def _save_gif(frames, path: Path, fps: float, metadata, replace: bool) -> Path:
    imgs = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    extra = {"comment": json.dumps({str(k): str(v) for k, v in metadata.items()})} if metadata else {}
    duration = int(round(1000 / fps))
    with atomic_output(path, size_hint=estimate_output_bytes(path, *imgs[0].size, len(imgs)), replace=replace) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=duration, loop=0, **extra)
        _check_gif(tmp, path, imgs[0].size, len(imgs) * duration, len(imgs))
    return path


def _check_gif(tmp: Path, dest: Path, size: Tuple[int, int], total_ms: int, count: int) -> None:
    """The GIF must decode at `size` and last `total_ms` (PIL merges repeated frames, adding their durations; GIF
    stores centiseconds, so each frame may lose up to 10 ms)."""
    from .errors import WriteError

    try:
        with Image.open(tmp) as im:
            ok, shown = im.size == size, 0
            for i in range(im.n_frames):
                im.seek(i)
                shown += im.info.get("duration", 0)
    except (OSError, ValueError, EOFError) as e:
        raise WriteError(f"the GIF written for {dest} does not decode ({e}); nothing was saved") from None
    if not ok or abs(shown - total_ms) > 10 * count:
        raise WriteError(f"the GIF written for {dest} is not the {size[0]}x{size[1]}, {total_ms} ms animation that "
                         "was sent; nothing was saved")


def _save_png_frames(frames, path: Path, metadata, replace: bool) -> Path:
    frames = iter(frames)
    first = np.asarray(next(frames), dtype=np.uint8)
    h, w = first.shape[:2]
    with atomic_output(path, is_dir=True, size_hint=estimate_output_bytes(path, w, h), replace=replace) as tmp:
        for i, f in enumerate(itertools.chain([first], frames)):
            name = f"frame_{i:05d}.png"
            _write_image(Image.fromarray(np.asarray(f, dtype=np.uint8)), tmp / name, path / name, metadata)
    return path

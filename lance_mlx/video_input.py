"""Input videos read as a stream: the header probed first, the pixel limit checked before any frame is decoded,
only the frames the caller needs kept in memory, and decoding stopped after the last of them."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import InputNotFoundError, InvalidRequestError

# Our bounds, not upstream's. Frames are bucketed to at most ~640² pixels before the model sees them, so a larger
# frame only costs memory: DCI 4K (4096x2160, also covers UHD 3840x2160 and portrait 4K) per frame, and a whole
# video decoded without a frame selection (`read_video(path)`) at most 2 GiB of uint8 pixels.
MAX_VIDEO_PIXELS = 4096 * 2160
MAX_VIDEO_SIDE = 4096
MAX_DECODED_BYTES = 2 * 2**30
GIF_DEFAULT_DURATION_MS = 83  # a GIF frame without a duration is shown ~1/12 s (what the reader assumed before)

FrameSelection = Union[Sequence[int], Callable[[int, float], Sequence[int]]]


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame size after rotation, frame rate, frame count and duration (seconds)."""

    width: int
    height: int
    fps: float
    num_frames: int  # frames stored in the container (its video packets; a GIF's frames)
    duration: float


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputNotFoundError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise InvalidRequestError(f"video file is empty: {path}")


def check_frame_size(width: int, height: int, path, max_pixels: int = MAX_VIDEO_PIXELS) -> None:
    """Refuse a frame size over `max_pixels` (or MAX_VIDEO_SIDE per side) before anything is decoded."""
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"{path}: video has zero width or height ({width}x{height})")
    if width * height > max_pixels or max(width, height) > MAX_VIDEO_SIDE:
        raise InvalidRequestError(
            f"{path}: video frames are {width}x{height} ({width * height / 1e6:.1f} MP); the limit is "
            f"{max_pixels / 1e6:.1f} MP and {MAX_VIDEO_SIDE} px per side (frames are bucketed to at most ~0.4 MP): "
            "downscale it first, e.g. ffmpeg -i IN -vf scale=-2:1080 OUT.mp4")


# --------------------------------------------------------------------------------------------------- probe
def _gif_header_size(path: Path) -> Tuple[int, int]:
    """The logical screen size of a GIF from its first 10 bytes (read before PIL allocates anything)."""
    with open(path, "rb") as f:
        head = f.read(10)
    if len(head) < 10 or head[:6] not in (b"GIF87a", b"GIF89a"):
        raise InvalidRequestError(f"cannot read GIF {path}: not a GIF file")
    return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")


def _open_gif(path: Path, max_pixels: int):
    import warnings

    from PIL import Image

    check_frame_size(*_gif_header_size(path), path, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check above came first
            return Image.open(path)
    except Exception as e:
        raise InvalidRequestError(f"cannot read GIF {path}: {e}") from None


def _gif_fps(im) -> float:
    return 1000.0 / max(im.info.get("duration", GIF_DEFAULT_DURATION_MS), 1)


def _ffmpeg_header(path: Path) -> dict:
    """Frame size after rotation, fps and duration as ffmpeg reports them when it decodes the first frame to RGB
    (the same fields, parsed the same way, as imageio-ffmpeg's reader header)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path), "-an", "-sn", "-dn", "-frames:v", "1",
           "-pix_fmt", "rgb24", "-f", "null", "-"]
    text = subprocess.run(cmd, capture_output=True, text=True, errors="replace").stderr
    video = [ln for ln in text.splitlines() if ln.lstrip().startswith("Stream ") and " Video: " in ln]
    size = re.search(r" (\d+)x(\d+)[, ]", video[-1]) if video else None  # the last one: what is decoded
    if size is None:
        raise InvalidRequestError(f"cannot decode video {path}: {_last_line(text)}; is it a valid video file "
                                  "(mp4/mov/mkv/webm/gif)?")
    fps = re.findall(r" ([0-9]+\.?[0-9]*) fps", video[0])
    duration = re.search(r"Duration: (\d+):(\d+):(\d+\.?\d*)", text)
    seconds = 0.0 if duration is None else 3600 * int(duration[1]) + 60 * int(duration[2]) + float(duration[3])
    return {"size": (int(size[1]), int(size[2])), "fps": float(fps[0]) if fps else 0.0, "duration": seconds}


def _last_line(error) -> str:
    """The last line of an ffmpeg error that is not a progress line ("frame= 331 fps=...")."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", str(error)) if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("frame=", "=== stderr"))] or ["no frames"]
    return lines[-1]


def _count_frames(path: Path, decode: bool = False) -> int:
    """Frames of the video stream ffmpeg picks: its packets copied without decoding (fast: no pixels), or with
    `decode` every frame decoded (exact for the rare stream whose packets and frames differ)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-an", "-sn", "-dn"]
    cmd += ["-fps_mode", "passthrough"] + ([] if decode else ["-c:v", "copy"]) + ["-f", "null", "-"]
    run = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    counts = re.findall(r"frame=\s*(\d+)", run.stderr)
    if run.returncode != 0 or not counts:
        raise InvalidRequestError(f"cannot decode video {path}: {_last_line(run.stderr)}")
    return int(counts[-1])


def probe_video(path, max_pixels: Optional[int] = None) -> VideoInfo:
    """Size, fps, frame count and duration from the header (no frame is decoded; the count of an MP4/MOV/MKV/WEBM
    comes from its packets). With `max_pixels`, the frame size is checked against it."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".gif":
        with _open_gif(path, max_pixels or 2**62) as im:
            fps = _gif_fps(im)
            w, h = im.size
            n = getattr(im, "n_frames", 1)  # walks the frame headers; pixels are not decoded
        return VideoInfo(w, h, fps, n, n / fps)
    meta = _ffmpeg_header(path)
    w, h = meta["size"]
    if max_pixels is not None:
        check_frame_size(w, h, path, max_pixels)
    fps = float(meta.get("fps") or 24.0)
    n = _count_frames(path)
    return VideoInfo(w, h, fps, n, float(meta.get("duration") or n / fps))


# ---------------------------------------------------------------------------------------------------- read
def _selection(frame_indices: Optional[FrameSelection], max_frames: Optional[int], num_frames: int,
               fps: float) -> List[int]:
    if callable(frame_indices):
        indices = [int(i) for i in frame_indices(num_frames, fps)]
    elif frame_indices is not None:
        indices = [int(i) for i in frame_indices]
    else:
        indices = list(range(num_frames))
    if max_frames is not None:
        indices = indices[:max(0, int(max_frames))]
    if not indices:
        raise InvalidRequestError("no video frames were asked for")
    if min(indices) < 0 or max(indices) >= num_frames:
        raise InvalidRequestError(f"frame index {max(indices) if max(indices) >= num_frames else min(indices)} is "
                                  f"outside the video's {num_frames} frames")
    return indices


def _check_budget(path: Path, count: int, width: int, height: int) -> None:
    need = count * width * height * 3
    if need > MAX_DECODED_BYTES:
        raise InvalidRequestError(f"{path}: keeping {count} frames of {width}x{height} would take "
                                  f"{need / 2**30:.1f} GiB, over the {MAX_DECODED_BYTES / 2**30:.0f} GiB limit: read "
                                  "a selection of its frames (frame_indices / max_frames)")


def _read_gif(path: Path, frame_indices, max_frames, max_pixels) -> Tuple[np.ndarray, float]:
    with _open_gif(path, max_pixels) as im:
        fps = _gif_fps(im)
        try:
            n = getattr(im, "n_frames", 1)
        except Exception as e:
            raise InvalidRequestError(f"cannot read GIF {path}: {e}") from None
        indices = _selection(frame_indices, max_frames, n, fps)
        wanted = sorted(set(indices))
        w, h = im.size
        _check_budget(path, len(wanted), w, h)
        frames = np.empty((len(wanted), h, w, 3), dtype=np.uint8)
        try:
            for j, i in enumerate(wanted):  # forward seeks only: PIL composes each frame on the previous one
                im.seek(i)
                frames[j] = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise InvalidRequestError(f"cannot read GIF {path}: {e}") from None
    return _in_order(frames, wanted, indices), fps


def _in_order(frames: np.ndarray, wanted: List[int], indices: List[int]) -> np.ndarray:
    """Frames of the sorted distinct `wanted` indices → the frames of `indices` (repeats and order kept)."""
    if indices == wanted:
        return frames
    return frames[np.searchsorted(np.asarray(wanted), np.asarray(indices))]


def _decode_selected(path: Path, wanted: List[int], width: int, height: int) -> np.ndarray:
    """Decode with ffmpeg, which converts to RGB and sends only the `wanted` frames (its select filter, every
    decoded frame once: no frame-rate conversion), and stop it after the last of them."""
    import imageio_ffmpeg

    out = ["-fps_mode", "passthrough", "-frames:v", str(len(wanted))]  # ffmpeg ends after the last wanted frame
    if wanted != list(range(len(wanted))):
        out = ["-vf", "select='" + "+".join(f"eq(n\\,{i})" for i in wanted) + "'"] + out
    frames = np.empty((len(wanted), height, width, 3), dtype=np.uint8)
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24", output_params=out)
    got = 0
    try:
        meta = next(reader)
        if tuple(meta["size"]) != (width, height):
            raise InvalidRequestError(f"cannot decode video {path}: its frame size changed while reading")
        for raw in reader:
            frames[got] = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
            got += 1
            if got == len(wanted):
                break
    except (RuntimeError, OSError, StopIteration) as e:
        raise InvalidRequestError(f"cannot decode video {path}: {_last_line(e)}; is it a valid video file "
                                  "(mp4/mov/mkv/webm/gif)?") from None
    finally:
        reader.close()
    return frames[:got]


def read_video(path, *, frame_indices: Optional[FrameSelection] = None, max_frames: Optional[int] = None,
               max_pixels: int = MAX_VIDEO_PIXELS) -> Tuple[np.ndarray, float]:
    """Decode the frames of a video file that are needed → ((T, H, W, 3) uint8, fps).

    `frame_indices` is a list of frame numbers, or a function of (frame count, fps) giving them, e.g.
    `processing.sample_frame_indices` (upstream's sampler); None means every frame. `max_frames` keeps at most
    the first that many of the selection. The frame size is checked against `max_pixels` from the header before
    anything is decoded; only the selected frames are kept, and decoding stops after the last one. MP4/MOV/MKV/WEBM
    go through ffmpeg (imageio-ffmpeg's binary), GIFs through PIL. Every error is an `InvalidRequestError` (or
    `InputNotFoundError`) with one line naming the file and the problem.
    """
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".gif":
        return _read_gif(path, frame_indices, max_frames, max_pixels)
    info = probe_video(path, max_pixels)
    if info.num_frames < 1:
        raise InvalidRequestError(f"video {path} has no decodable frames")
    for exact in (False, True):
        indices = _selection(frame_indices, max_frames, info.num_frames, info.fps)
        wanted = sorted(set(indices))
        _check_budget(path, len(wanted), info.width, info.height)
        frames = _decode_selected(path, wanted, info.width, info.height)
        if len(frames) == len(wanted):
            return _in_order(frames, wanted, indices), info.fps
        if exact:
            break
        # Fewer frames decoded than packets counted (a stream with frames split over packets): count them exactly.
        info = VideoInfo(info.width, info.height, info.fps, _count_frames(path, decode=True), info.duration)
    if len(frames) == 0:
        raise InvalidRequestError(f"video {path} has no decodable frames")
    raise InvalidRequestError(f"cannot decode video {path}: frame {wanted[len(frames)]} of {info.num_frames} did "
                              "not decode")


__all__ = ["MAX_DECODED_BYTES", "MAX_VIDEO_PIXELS", "MAX_VIDEO_SIDE", "VideoInfo", "check_frame_size",
           "probe_video", "read_video"]

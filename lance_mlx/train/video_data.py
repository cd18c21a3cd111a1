"""Video training data: find and check the items of a video dataset (a folder, a JSONL manifest or upstream's
parquet rows), and read each item's clip with upstream's training frame sampler through the bounded video reader.

Layouts (docs/training.md):
- t2v / i2v: a folder of videos with same-named `.txt` captions (`wave.mp4` + `wave.txt`);
- video-edit: `NAME.mp4` (source) + `NAME_target.mp4` + `NAME.txt` (instruction);
- v2t: videos with `.txt` answers (the caption task);
- any task: a JSONL manifest, one object per line: {"video", "caption"} / {"source", "target", "instruction"} /
  {"video", "answer", "question"?}, paths relative to the manifest;
- upstream's local parquet format (train_dataset.md), media as bytes: text2video_general (caption, video_bytes),
  video2video (caption, input_video_bytes, output_video_bytes), x2t_general (video_bytes, caption_i, caption_q,
  caption_a: instruction used as the system prompt, question (may be empty), answer).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

import numpy as np

from .. import processing as P
from ..errors import InputNotFoundError, InvalidRequestError, LanceError
from ..media import VIDEO_SUFFIXES
from .data import read_text
from .parquet import read_parquet

VIDEO_TASKS = ("t2v", "i2v", "video-edit", "v2t")
TARGET_SUFFIX = "_target"
# Upstream config/train_local/{t2v,v2v,v2t}_local.yaml, video_frame_sampler_args (MultiClipsFrameSampler): 12 fps,
# temporal stride 4 (4k+1 frames), at most 6 s (t2v, v2v) or 2 s (v2t), the whole video as one clip.
SAMPLE_FPS = P.SAMPLE_FPS
MAX_DURATION_S = {"t2v": 6.0, "i2v": 6.0, "video-edit": 6.0, "v2t": 2.0}
# Our default cap on the frames of a clip (a Mac-sized 1.4 s at 12 fps); upstream's 6 s is --num-frames 69.
DEFAULT_NUM_FRAMES = 17
# Upstream config/train_local/t2v_local.yaml: task_type ["t2v", "ff2v"], task_type_rate [0.8, 0.2].
FF2V_RATE = 0.2
# Our default bucket area of video tasks (video_192p); upstream trains video at 640 (t2v/v2v) and its ViT at 616.
DEFAULT_VIDEO_RESOLUTION = 256
# ViT bucket area per VAE area of the video presets (processing.PRESETS: video_192p, video_360p, video_480p; upstream
# config/train_local/v2v_local.yaml: 640 -> 616).
VIDEO_VIT_FOR = {256: 224, 480: 476, 640: 616}
MANIFEST_KEYS = {"t2v": ("video", "caption"), "i2v": ("video", "caption"),
                 "video-edit": ("source", "target", "instruction"), "v2t": ("video", "answer")}

Media = Union[Path, bytes]


@dataclass
class VideoItem:
    """One video training item as found on disk."""

    name: str
    text: str  # caption / instruction / answer
    video: Media  # t2v target, edit source, v2t video (bytes: a parquet cell)
    target: Optional[Media] = None  # video-edit target
    question: Optional[str] = None  # v2t
    system: Optional[str] = None  # v2t parquet caption_i: the system prompt of the sample


@dataclass(frozen=True)
class ClipSettings:
    """How clips are sampled: upstream's sampler at `fps`, at most `num_frames` frames (4k+1) and the task's
    upstream maximum duration."""

    task: str
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: int = SAMPLE_FPS

    @property
    def max_duration(self) -> float:
        return min(MAX_DURATION_S[self.task], self.num_frames / self.fps)

    def count(self, num_frames: int, file_fps: float) -> int:
        """Frames upstream's sampler takes of a video of `num_frames` frames at `file_fps`."""
        return len(P.sample_frame_indices(num_frames, file_fps, self.fps, self.max_duration))


def check_clip_settings(num_frames: int, fps: int) -> None:
    if num_frames < 1 or (num_frames - 1) % P.TEMPORAL_STRIDE:
        raise InvalidRequestError(f"num_frames must be 4k+1 (1, 5, 9, 13, 17, ...: the VAE's temporal stride is 4), "
                                  f"got {num_frames}", param="num_frames")
    if not 1 <= fps <= 60:
        raise InvalidRequestError(f"fps must be in [1, 60], got {fps}", param="fps")


# ------------------------------------------------------------------------------------------------ scanning
def _videos_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def scan_folder(folder: Path, task: str) -> List[VideoItem]:
    videos = _videos_in(folder)
    if task != "video-edit":
        what = "answer" if task == "v2t" else "caption"
        return [VideoItem(p.stem, read_text(p.with_suffix(".txt"), what, "video"), p) for p in videos]
    items = []
    for src in videos:
        if src.stem.endswith(TARGET_SUFFIX):
            continue
        tgt = [p for p in videos if p.stem == src.stem + TARGET_SUFFIX]
        if not tgt:
            raise InputNotFoundError(f"{src} has no target video: add {src.stem}{TARGET_SUFFIX}{src.suffix} beside it",
                                     param="data")
        items.append(VideoItem(src.stem, read_text(src.with_suffix(".txt"), "instruction", "video"), src, tgt[0]))
    return items


def scan_manifest(path: Path, task: str) -> List[VideoItem]:
    items, base, keys = [], path.parent, MANIFEST_KEYS[task]
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{where} is not valid JSON ({e.msg})", param="data") from None
        if not isinstance(row, dict):
            raise InvalidRequestError(f"{where} must be a JSON object", param="data")
        missing = [k for k in keys if not isinstance(row.get(k), str) or not row.get(k).strip()]
        if missing:
            raise InvalidRequestError(f"{where} lacks {', '.join(missing)} (a {task} row needs {', '.join(keys)})",
                                      param="data")
        name = f"{n:06d}"
        if task == "video-edit":
            items.append(VideoItem(name, row["instruction"].strip(), base / row["source"], base / row["target"]))
        elif task == "v2t":
            q = row.get("question")
            items.append(VideoItem(name, row["answer"].strip(), base / row["video"],
                                   question=q.strip() if isinstance(q, str) and q.strip() else None))
        else:
            items.append(VideoItem(name, row["caption"].strip(), base / row["video"]))
    return items


def scan_parquet(path: Path, task: str) -> List[VideoItem]:
    """Rows of an upstream-format local parquet file (media as bytes; `parquet.read_parquet`)."""
    return [VideoItem(video=row.pop("media"), **row) for row in read_parquet(path, task)]


# ------------------------------------------------------------------------------------------------ reading
@contextlib.contextmanager
def media_path(src: Media) -> Iterator[Path]:
    """A path to read `src` from: the file itself, or parquet bytes in a temporary file removed afterwards (the
    reader decodes files; a GIF is recognised by its signature, any other container by ffmpeg)."""
    if not isinstance(src, (bytes, bytearray)):
        yield Path(src)
        return
    suffix = ".gif" if bytes(src[:4]) == b"GIF8" else ".mp4"
    with tempfile.TemporaryDirectory(prefix="lance-train-") as d:
        p = Path(d) / f"clip{suffix}"
        p.write_bytes(src)
        yield p


def _where(src: Media, where: str) -> str:
    return where if isinstance(src, (bytes, bytearray)) else str(src)


def _reader_message(error: Exception, path: Path, src: Media, where: str) -> str:
    """The reader's one-line message, naming the parquet row instead of the temporary file it read the bytes from
    (a file's message already names the file)."""
    msg = str(error)
    if isinstance(src, (bytes, bytearray)):
        msg = msg.replace(str(path), where)
    return msg if where in msg or str(src) in msg else f"training video {_where(src, where)}: {msg}"


def probe(src: Media, where: str, clip: ClipSettings) -> int:
    """Check a video from its header (size limit, frame count) and return how many frames its clip has."""
    from ..video_input import MAX_VIDEO_PIXELS, probe_video

    with media_path(src) as p:
        try:
            info = probe_video(p, max_pixels=MAX_VIDEO_PIXELS)
        except InputNotFoundError:
            raise InputNotFoundError(f"training video {_where(src, where)} does not exist", param="data") from None
        except LanceError as e:  # no `param`: the reader's text is not to be rewritten into flag names
            raise InvalidRequestError(_reader_message(e, p, src, where)) from None
    try:
        return clip.count(info.num_frames, info.fps)
    except ValueError as e:
        raise InvalidRequestError(f"training video {_where(src, where)}: {e}", param="data") from None


def read_clip(src: Media, where: str, clip: ClipSettings, count: Optional[int] = None) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of a video's clip, sampled while decoded (upstream's sampler: `clip`'s fps over
    the whole video, up to its maximum duration). `count` takes that many frames spread the same way instead."""
    from ..video_input import read_video

    def select(n: int, file_fps: float) -> List[int]:
        if count is not None:
            return np.linspace(0, n - 1, count, dtype=int).tolist()
        return P.sample_frame_indices(n, file_fps, clip.fps, clip.max_duration)

    with media_path(src) as p:
        try:
            frames, _ = read_video(p, frame_indices=select)
        except LanceError as e:
            raise InvalidRequestError(_reader_message(e, p, src, where)) from None
        except ValueError as e:  # the sampler's "too short"
            raise InvalidRequestError(f"training video {_where(src, where)}: {e}", param="data") from None
    return frames


def find_items(data, clip: ClipSettings) -> List[VideoItem]:
    """Every item of a folder, JSONL manifest or parquet file, each video checked from its header (one clear
    error): it opens, fits the size limit and gives a clip (i2v: of at least 5 frames, two latent frames)."""
    task = clip.task
    if task not in VIDEO_TASKS:
        raise InvalidRequestError(f"unknown video training task {task!r}: use one of {', '.join(VIDEO_TASKS)}",
                                  param="task")
    path = Path(data).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"training data {path} does not exist", param="data")
    if path.is_dir():
        items = scan_folder(path, task)
    elif path.suffix.lower() == ".parquet":
        items = scan_parquet(path, task)
    else:
        items = scan_manifest(path, task)
    if not items:
        raise InvalidRequestError(f"no {task} training items in {path} (videos: {', '.join(VIDEO_SUFFIXES)}; see "
                                  f"docs/training.md for the layout)", param="data")
    for it in items:
        for src in (it.video, it.target):
            if src is None:
                continue
            n = probe(src, f"{path} {it.name}", clip)
            if task == "i2v" and n < 1 + P.TEMPORAL_STRIDE:
                raise InvalidRequestError(f"training video {_where(src, f'{path} {it.name}')} gives a clip of {n} "
                                          f"frame(s); image-to-video needs at least {1 + P.TEMPORAL_STRIDE} (a first "
                                          f"frame and one more latent frame): use a longer video", param="data")
    return items


__all__ = ["VIDEO_TASKS", "VIDEO_SUFFIXES", "VideoItem", "ClipSettings", "check_clip_settings", "find_items",
           "read_clip", "FF2V_RATE", "DEFAULT_NUM_FRAMES", "DEFAULT_VIDEO_RESOLUTION", "VIDEO_VIT_FOR"]

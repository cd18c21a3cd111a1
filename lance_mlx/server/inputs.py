"""Input media of a request (uploads, base64 data URLs, local files when allowed) decoded and checked."""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple, Union
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InvalidRequestError, InvalidTypeError
from ..media import VIDEO_SUFFIXES
from ..processing import check_image_size, sample_frame_indices
from ..video_input import read_video

# Content types of video data URLs and uploads -> the suffix the decoder is told.
VIDEO_TYPES = {"video/mp4": ".mp4", "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/webm": ".webm",
               "image/gif": ".gif"}


class Media:
    """Raw bytes of an input (or a local path) with what is known of its type."""

    def __init__(self, data: Optional[bytes] = None, content_type: str = "", name: str = "",
                 path: Optional[Path] = None):
        self.data, self.content_type, self.name, self.path = data, content_type.lower(), name, path

    @property
    def is_video(self) -> bool:
        suffix = Path(self.name or (self.path.name if self.path else "")).suffix.lower()
        if self.content_type.startswith("video/"):
            return True
        return suffix in VIDEO_SUFFIXES and suffix != ".gif" or (suffix == ".gif" and self.content_type == "")

    def describe(self) -> str:
        return str(self.path) if self.path else (self.name or self.content_type or "upload")


def from_url(url, param: str, allow_local: bool) -> Media:
    """A `data:` URL, or with `allow_local` a `file://` URL or a plain local path."""
    if not isinstance(url, str):
        raise InvalidTypeError(f"{param} must be a string URL, got {type(url).__name__}", param)
    if url.startswith("data:"):
        head, sep, payload = url[5:].partition(",")
        if not sep or not head.endswith(";base64"):
            raise InvalidRequestError(f"{param} must be a base64 data URL (data:<type>;base64,<data>)", param)
        return Media(b64decode(payload, param), head[: -len(";base64")])
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise InvalidRequestError(f"{param}: this server does not fetch remote URLs; send the file as a base64 data "
                                  "URL", param)
    if parsed.scheme not in ("file", "") or (parsed.scheme == "" and not url):
        raise InvalidRequestError(f"{param}: unsupported URL scheme {parsed.scheme[:20]!r}; use a data URL", param)
    if not allow_local:
        raise InvalidRequestError(f"{param}: local files are refused (start the server with --allow-local-files to "
                                  "read them); send the file as a base64 data URL", param)
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"{param}: no such file {path}", param)
    return Media(path=path, name=path.name)


def b64decode(payload, param: str) -> bytes:
    if not isinstance(payload, str):
        raise InvalidTypeError(f"{param} must be base64 text, got {type(payload).__name__}", param)
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{param} is not valid base64", param) from None


def image(media: Media, param: str) -> Union[Image.Image, Path]:
    """A lazily decoded PIL image (its header checked now), or a local path left to the request type to read."""
    if media.path is not None:
        return media.path
    if not media.data:
        raise InvalidRequestError(f"{param} is empty", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(media.data))
        check_image_size(img.size, param)
    except Image.DecompressionBombError as e:
        raise InvalidRequestError(f"{param}: image too large ({e})", param) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidRequestError(f"{param} is not a readable image ({e})", param) from None
    return img


def video(media: Media, param: str, scratch: Path) -> Tuple[np.ndarray, Optional[float]]:
    """(sampled frames (T, H, W, 3) uint8, None) of a video input, decoded from a private scratch file."""
    if media.path is not None:
        return _read(media.path, param)
    if not media.data:
        raise InvalidRequestError(f"{param} is empty", param)
    suffix = VIDEO_TYPES.get(media.content_type) or Path(media.name).suffix.lower() or ".mp4"
    if suffix not in VIDEO_SUFFIXES:
        suffix = ".mp4"
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".input-", suffix=suffix, dir=scratch)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(media.data)
        return _read(Path(name), param)
    finally:
        Path(name).unlink(missing_ok=True)


def _read(path: Path, param: str) -> Tuple[np.ndarray, Optional[float]]:
    """Frames sampled while decoding (upstream's sampler; only those are kept), with None for their fps: the request
    uses them as they are."""
    try:
        frames, _ = read_video(path, frame_indices=sample_frame_indices)
    except ValueError as e:
        raise InvalidRequestError(f"{param}: {e}", param) from None
    return frames, None

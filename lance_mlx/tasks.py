"""One request type per task, each validating every user input on construction, before any weights load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .config import (
    DEFAULT_SAMPLING,
    MAX_ANSWER_TOKENS,
    OUTPUT_FPS,
    POSTERIOR_SEED,
    SamplingParams,
    check_number,
)
from .errors import InputNotFoundError, InvalidRequestError, InvalidTypeError

# The size and frame-count rules live in sizes.py (the model checks its latent grids with them too); re-exported
# here because every request checks them.
from .sizes import (  # noqa: F401
    FRAME_STRIDE,
    MAX_FRAMES,
    MIN_I2V_FRAMES,
    SIZE_STRIDE,
    TABLE_ROWS,
    TABLE_SIDE,
    check_latent_grid,
    check_size,
    latent_frames,
    latent_grid,
    nearest_valid_frames,
)

# Defaults: t2i 768² (upstream README), t2v the video_480p 16:9 bucket 848x480 and 49 frames (what upstream's
# NUM_FRAMES=50 becomes), i2v/video presets as upstream's validation_dataset.py.
IMAGE_SIZE = (768, 768)
VIDEO_SIZE = (848, 480)
VIDEO_FRAMES = 49
I2V_RESOLUTION = 640  # video_480p's VAE resolution: the first frame is bucketed to about 640² pixels
IMAGE_EDIT_PRESET, VIDEO_PRESET = "image_768res", "video_480p"
IMAGE_X2T_PRESET = "image_768res"

# Our bounds, not upstream's: upstream does not bound text; MLX's CPU attention crashes near 27k tokens, and a
# prompt of this length is already far beyond anything the model was trained on.
MAX_PROMPT_TOKENS = 4096
MAX_PROMPT_CHARS = 16 * MAX_PROMPT_TOKENS  # a cheap first bound before tokenizing (tokens rarely pass 16 chars)
MAX_FPS = 240.0
MIN_RESOLUTION, MAX_RESOLUTION = 16, 1024

# The added (special) tokens of the Qwen2.5-VL tokenizer, in id order 151643..151664 (Lance_3B/tokenizer_config.json
# `added_tokens_decoder`; upstream data/data_utils.py::add_special_tokens adds none). The tokenizer turns each into
# its control id wherever it appears in text, so user text holding one would rewrite the chat template (or, for
# the vision markers, claim an image that is not there); tests/test_input_policy.py checks this list against
# the tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)


# ------------------------------------------------------------------------------------------------- helpers
def check_text(text, what: str, example: str) -> str:
    """A non-empty string of valid Unicode without special tokens, or an error naming `what` and the fix. Every
    request type checks each of its text fields with it (the command-line scripts and the server build them)."""
    if text is not None and not isinstance(text, str):
        raise InvalidTypeError(f"the {what} must be text, got {type(text).__name__}")
    if text is None or not text.strip():
        raise InvalidRequestError(f"the {what} is empty; {example}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"the {what} is not valid text (it holds unpaired surrogates, e.g. from invalid "
                                  "UTF-8 input); pass it as UTF-8") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequestError(f"the {what} is {len(text)} characters long; keep it under about "
                                  f"{MAX_PROMPT_TOKENS} tokens")
    token = next((t for t in SPECIAL_TOKENS if t in text), None)
    if token is not None:
        raise InvalidRequestError(f"the {what} contains '{token}', a special token of the model's tokenizer (it "
                                  "would be read as a control token, not as text): remove it")
    return text


def check_token_count(n_tokens: int, what: str) -> None:
    """Refuse text longer than MAX_PROMPT_TOKENS tokens (checked with the model's tokenizer, before weights)."""
    if n_tokens > MAX_PROMPT_TOKENS:
        raise InvalidRequestError(f"the {what} is {n_tokens} tokens long; the limit is {MAX_PROMPT_TOKENS} tokens: "
                                  "shorten it")


def check_negative_prompt(text) -> str:
    """The negative prompt: "" (none: upstream's unconditional branch) or text checked as a prompt."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return ""
    return check_text(text, "negative prompt", "say what to steer away from, or leave it empty")


def check_fps(fps, what: str = "fps") -> float:
    return check_number(what, fps, 0.0, MAX_FPS, lo_open=True)


def check_preset(preset):
    from .processing import get_preset

    try:
        return get_preset(preset)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


def load_image_input(image, what: str = "the image", param: str = "image") -> Image.Image:
    """A path, PIL image or (H, W, 3) uint8 array → RGB PIL image, decoded and checked now."""
    from .processing import load_image

    if image is None:
        raise InvalidTypeError(f"no {param} given ({what}): pass a file path, a PIL image or an (H, W, 3) uint8 "
                               "array", param)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InvalidRequestError(f"{what} array must be (H, W, 3) uint8, got {image.shape} {image.dtype}", param)
        image = Image.fromarray(image)
    elif not isinstance(image, (str, Path, Image.Image)):
        raise InvalidTypeError(f"{what} must be a file path, PIL image or (H, W, 3) uint8 array, got "
                               f"{type(image).__name__}")
    try:
        return load_image(image)
    except FileNotFoundError as e:
        raise InputNotFoundError(f"cannot read {what}: {e}", param) from None
    except ValueError as e:
        raise InvalidRequestError(f"cannot read {what}: {e}", param) from None


def load_video_input(video, input_fps: Optional[float]):
    """(frames, fps) of a video. A path is sampled now like upstream (12 fps over at most 6 s, at `input_fps` or
    the file's rate) while it is decoded, so only the sampled frames are kept: (sampled frames, None), None meaning
    "use as given". Decoded frames come back as they are, with `input_fps` (sampled later when it is given)."""
    from .processing import sample_frame_indices
    from .video_input import read_video

    if video is None:
        raise InvalidTypeError("no video given: pass a file path or (T, H, W, 3) uint8 frames")
    try:
        if isinstance(video, (str, Path)):
            frames, _ = read_video(video, frame_indices=lambda n, fps: sample_frame_indices(n, input_fps or fps))
            return frames, None
        elif isinstance(video, (np.ndarray, list, tuple)):
            frames, fps = video, input_fps
        else:
            raise InvalidTypeError(f"the video must be a file path or (T, H, W, 3) uint8 frames, got "
                                   f"{type(video).__name__}")
        if fps is not None:
            sample_frame_indices(len(frames), fps)  # too short a clip fails here
    except InputNotFoundError as e:
        raise InputNotFoundError(f"cannot read the input video: {e}", "video") from None
    except InvalidRequestError as e:
        raise InvalidRequestError(str(e), e.param or "video") from None
    except FileNotFoundError as e:
        raise InputNotFoundError(f"cannot read the input video: {e}", "video") from None
    except ValueError as e:
        raise InvalidRequestError(f"cannot read the input video: {e}", "video") from None
    return frames, fps


def _describe(media) -> str:
    return str(media) if isinstance(media, (str, Path)) else type(media).__name__


def _sampling(value) -> SamplingParams:
    if not isinstance(value, SamplingParams):
        raise InvalidTypeError(f"sampling must be a SamplingParams, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Posterior:
    """How a VAE-encoded conditioning input is drawn: upstream samples the posterior with its global seed 2025
    (`sample=True`); `sample=False` takes the posterior mean (deterministic)."""

    sample: bool = True
    seed: int = POSTERIOR_SEED

    def __post_init__(self):
        object.__setattr__(self, "seed", check_number("posterior seed", self.seed, 0, 2**63 - 1, integer=True))

    def describe(self) -> str:
        return f"sample (seed {self.seed})" if self.sample else "mean"


# ---------------------------------------------------------------------------------------------------- requests
class Request:
    """Common surface of the request types: `task`, `checkpoint` ("image" or "video" weights) and `text`."""

    task: ClassVar[str]
    checkpoint: ClassVar[str]
    text_field: ClassVar[str] = "prompt"
    negative_prompt: str = ""  # the generation requests' field (docs/steering.md); none for understanding

    @property
    def text(self) -> Optional[str]:
        return getattr(self, self.text_field)

    def _set(self, **values: Any) -> None:
        for k, v in values.items():
            object.__setattr__(self, k, v)


def _reject_image_guidance(params: SamplingParams, task: str) -> None:
    if params.cfg_image != 1.0:
        raise InvalidRequestError(f"image guidance (cfg-img {params.cfg_image:g}) applies to edits only; {task} has "
                                  "no input image to guide by: leave it at 1")


@dataclass(frozen=True)
class TextToImage(Request):
    """Text → image (upstream t2i)."""

    task: ClassVar[str] = "t2i"
    checkpoint: ClassVar[str] = "image"
    prompt: str = ""
    width: int = IMAGE_SIZE[0]
    height: int = IMAGE_SIZE[1]
    sampling: SamplingParams = DEFAULT_SAMPLING
    negative_prompt: str = ""

    def __post_init__(self):
        check_text(self.prompt, "prompt", "describe the image to generate")
        self._set(negative_prompt=check_negative_prompt(self.negative_prompt))
        w, h = check_size(self.width, self.height)
        self._set(width=w, height=h, sampling=_sampling(self.sampling))
        _reject_image_guidance(self.sampling, "text-to-image")

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return (1, self.height // SIZE_STRIDE, self.width // SIZE_STRIDE)


@dataclass(frozen=True)
class TextToVideo(Request):
    """Text → video (upstream t2v); `fps` is the output frame rate."""

    task: ClassVar[str] = "t2v"
    checkpoint: ClassVar[str] = "video"
    prompt: str = ""
    num_frames: int = VIDEO_FRAMES
    width: int = VIDEO_SIZE[0]
    height: int = VIDEO_SIZE[1]
    fps: float = OUTPUT_FPS
    sampling: SamplingParams = DEFAULT_SAMPLING
    negative_prompt: str = ""

    def __post_init__(self):
        check_text(self.prompt, "prompt", "describe the video to generate")
        self._set(negative_prompt=check_negative_prompt(self.negative_prompt))
        latent_frames(self.num_frames, "frame count")
        w, h = check_size(self.width, self.height, self.num_frames)
        self._set(width=w, height=h, fps=check_fps(self.fps), sampling=_sampling(self.sampling))
        _reject_image_guidance(self.sampling, "text-to-video")

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return (latent_frames(self.num_frames), self.height // SIZE_STRIDE, self.width // SIZE_STRIDE)


@dataclass(frozen=True)
class ImageToVideo(Request):
    """Image + text → video (upstream i2v): the video takes the image's size bucketed to about `resolution`²."""

    task: ClassVar[str] = "i2v"
    checkpoint: ClassVar[str] = "video"
    prompt: str = ""
    image: Any = None
    num_frames: int = VIDEO_FRAMES
    resolution: int = I2V_RESOLUTION
    fps: float = OUTPUT_FPS
    sampling: SamplingParams = DEFAULT_SAMPLING
    posterior: Posterior = field(default_factory=Posterior)
    source: str = field(default="", compare=False)
    negative_prompt: str = ""

    def __post_init__(self):
        check_text(self.prompt, "prompt", "describe the video to generate")
        self._set(negative_prompt=check_negative_prompt(self.negative_prompt))
        if latent_frames(self.num_frames, "frame count") < 2:
            raise InvalidRequestError(f"image-to-video needs at least {MIN_I2V_FRAMES} frames (the image, then 4k "
                                      f"more), got {self.num_frames}; use 5, 9, ... (4k+1)")
        res = check_number("resolution", self.resolution, MIN_RESOLUTION, MAX_RESOLUTION, integer=True)
        self._set(resolution=res, fps=check_fps(self.fps), sampling=_sampling(self.sampling),
                  source=self.source or _describe(self.image), image=load_image_input(self.image, "image"))
        _reject_image_guidance(self.sampling, "image-to-video")

    @property
    def preset(self):
        from .processing import Preset

        return Preset(f"{self.resolution}px", self.resolution, self.resolution)  # only its VAE branch is used


@dataclass(frozen=True)
class ImageEdit(Request):
    """Image + instruction → edited image (upstream image_edit); the output has the source's bucketed size."""

    task: ClassVar[str] = "image_edit"
    checkpoint: ClassVar[str] = "image"
    text_field: ClassVar[str] = "instruction"
    image: Any = None
    instruction: str = ""
    preset: Any = IMAGE_EDIT_PRESET
    sampling: SamplingParams = DEFAULT_SAMPLING
    posterior: Posterior = field(default_factory=Posterior)
    source: str = field(default="", compare=False)
    negative_prompt: str = ""

    def __post_init__(self):
        check_text(self.instruction, "instruction", 'say what to change, e.g. "make the sky pink"')
        self._set(negative_prompt=check_negative_prompt(self.negative_prompt))
        self._set(preset=check_preset(self.preset), sampling=_sampling(self.sampling),
                  source=self.source or _describe(self.image), image=load_image_input(self.image, "the input image"))


@dataclass(frozen=True)
class VideoEdit(Request):
    """Video + instruction → edited video (upstream video_edit). A file is sampled like upstream (12 fps, at most
    6 s, 4k+1 frames); decoded frames are used as given (4k+1 of them) unless `input_fps` is passed."""

    task: ClassVar[str] = "video_edit"
    checkpoint: ClassVar[str] = "video"
    text_field: ClassVar[str] = "instruction"
    video: Any = None
    instruction: str = ""
    preset: Any = VIDEO_PRESET
    input_fps: Optional[float] = None
    fps: float = OUTPUT_FPS
    sampling: SamplingParams = DEFAULT_SAMPLING
    posterior: Posterior = field(default_factory=Posterior)
    source: str = field(default="", compare=False)
    negative_prompt: str = ""

    def __post_init__(self):
        check_text(self.instruction, "instruction", 'say what to change, e.g. "make the sky pink"')
        self._set(negative_prompt=check_negative_prompt(self.negative_prompt))
        if self.input_fps is not None:
            check_fps(self.input_fps, "input fps")
        frames, fps = load_video_input(self.video, self.input_fps)
        if fps is None:  # decoded frames used as given: the VAE needs 4k + 1 of them
            latent_frames(len(frames), "source frame count")
        self._set(preset=check_preset(self.preset), fps=check_fps(self.fps), sampling=_sampling(self.sampling),
                  source=self.source or _describe(self.video), video=frames, input_fps=fps)


@dataclass(frozen=True)
class Understand(Request):
    """Image or video + optional question → text (upstream x2t_image / x2t_video). Without a question the model
    describes the input. Greedy decoding up to 256 tokens, as upstream; temperature > 0 samples (top_p, seed)."""

    text_field: ClassVar[str] = "question"
    media: Any = None
    question: Optional[str] = None
    video: bool = False
    preset: Any = None
    input_fps: Optional[float] = None
    max_tokens: int = MAX_ANSWER_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    system_prompt: Optional[str] = None
    source: str = field(default="", compare=False)

    @property
    def task(self) -> str:
        return "x2t_video" if self.video else "x2t_image"

    @property
    def checkpoint(self) -> str:
        return "video" if self.video else "image"

    def __post_init__(self):
        if self.question is not None:
            check_text(self.question, "question", "leave it out to get a description")
        if self.system_prompt is not None:
            check_text(self.system_prompt, "system prompt", "leave it out for upstream's")
        if isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive number of tokens, got {self.max_tokens}",
                                      "max_tokens")
        self._set(max_tokens=check_number("max_tokens", self.max_tokens, 1, 32768, integer=True),
                  temperature=check_number("temperature", self.temperature, 0.0, 10.0),
                  top_p=check_number("top-p", self.top_p, 0.0, 1.0, lo_open=True),
                  seed=check_number("seed", self.seed, 0, 2**63 - 1, integer=True),
                  source=self.source or _describe(self.media))
        video = self.video or _looks_like_video(self.media)
        preset = check_preset(self.preset or (VIDEO_PRESET if video else IMAGE_X2T_PRESET))
        if self.input_fps is not None:
            check_fps(self.input_fps, "input fps")
        if video:
            frames, fps = load_video_input(self.media, self.input_fps)
            self._set(video=True, media=frames, input_fps=fps, preset=preset)
        else:
            self._set(media=load_image_input(self.media), preset=preset)


def _looks_like_video(media) -> bool:
    from .media import VIDEO_SUFFIXES

    if isinstance(media, (str, Path)):
        return Path(media).suffix.lower() in VIDEO_SUFFIXES
    if isinstance(media, np.ndarray):
        if media.ndim not in (3, 4):
            raise InvalidRequestError(f"an image array is (H, W, 3) and a video array (T, H, W, 3); got shape "
                                      f"{media.shape}")
        return media.ndim == 4
    return isinstance(media, (list, tuple))


GenerationRequest = Union[TextToImage, TextToVideo, ImageToVideo, ImageEdit, VideoEdit]
REQUEST_TYPES = (TextToImage, TextToVideo, ImageToVideo, ImageEdit, VideoEdit, Understand)

__all__ = [
    "GenerationRequest", "ImageEdit", "ImageToVideo", "MAX_FRAMES", "MAX_PROMPT_TOKENS", "Posterior", "Request",
    "SPECIAL_TOKENS", "TextToImage", "TextToVideo", "Understand", "VideoEdit", "check_latent_grid",
    "check_negative_prompt", "check_size", "check_text", "check_token_count", "latent_frames", "latent_grid",
    "nearest_valid_frames",
]

"""Request bodies (JSON or multipart, OpenAI's field names) parsed into `lance_mlx.tasks` requests."""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..config import DEFAULT_SAMPLING, OUTPUT_FPS, POSTERIOR_SEED, SAMPLERS, SamplingParams
from ..errors import InvalidRequestError, InvalidTypeError
from ..processing import OUTPUT_ASPECT_RATIOS, PRESETS, nearest_bucket, output_size
from ..tasks import (
    FRAME_STRIDE,
    I2V_RESOLUTION,
    IMAGE_EDIT_PRESET,
    IMAGE_SIZE,
    SIZE_STRIDE,
    VIDEO_FRAMES,
    VIDEO_PRESET,
    VIDEO_SIZE,
    ImageEdit,
    ImageToVideo,
    Posterior,
    TextToImage,
    TextToVideo,
    VideoEdit,
    check_fps,
    check_latent_grid,
)
from . import inputs
from .fields import IGNORED, ApiError, Fields, Parsed, Upload, build, form_number, parse_json  # noqa: F401
from .jobs import OUTPUT_FORMATS
from .redact import clip as shown
from .settings import ServerConfig

SAMPLING_FIELDS = ("steps", "num_inference_steps", "guidance_scale", "image_guidance_scale", "timestep_shift",
                   "cfg_interval", "renorm_min", "seed", "sampler", "negative_prompt")
ENHANCE_TASKS = ("t2i", "t2v", "i2v")  # lance_mlx/enhance.py TASKS
POSTERIOR_FIELDS = ("posterior_seed", "posterior_mean")
RESPONSE_FORMATS = ("b64_json", "url")
MIN_FPS = 1.0  # our serving limit (vLLM-Omni's too): below it a video's time base and duration make no sense
MAX_SIDE = 16384  # a bound for the width/height fields only; the real limits are max_pixels and tasks.check_size
# vLLM-Omni's /v1/videos fields (vllm_omni/entrypoints/openai/protocol/videos.py, VideoGenerationRequest): width and
# height (its `size` wins when both are given, as in its resolve_video_params), a `video_params` block of the same,
# and `image_reference` {"image_url": ...} for the first frame.
VLLM_VIDEO_FIELDS = ("width", "height", "video_params", "image_reference")
PRESET_SLACK = 1.1  # buckets round sides to multiples of 16, so their area may pass resolution² by a few percent
DEFAULT_RESOLUTION = {"image": IMAGE_SIZE[0], "video": I2V_RESOLUTION}  # presets' area when only an aspect is given


# ------------------------------------------------------------------------------------------------ settings
def sampling(f: Fields, config: ServerConfig) -> SamplingParams:
    """SamplingParams from OpenAI-style names (guidance_scale, steps) plus Lance's (timestep_shift, cfg_interval,
    image_guidance_scale, which the request types refuse above 1 for tasks without an input to guide by)."""
    d = DEFAULT_SAMPLING
    steps = f.integer("steps", f.integer("num_inference_steps", d.steps, 1, config.max_steps), 1, config.max_steps)
    interval = f.values.get("cfg_interval", d.cfg_interval)
    if isinstance(interval, str):
        interval = tuple(float(form_number(v, "cfg_interval")) for v in interval.split(","))
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval):
        raise InvalidTypeError(f"cfg_interval must be two numbers [LO, HI], got {shown(repr(interval))}",
                               "cfg_interval")
    try:
        return SamplingParams(
            steps=steps, shift=f.number("timestep_shift", d.shift), cfg_text=f.number("guidance_scale", d.cfg_text),
            cfg_image=f.number("image_guidance_scale", d.cfg_image),
            cfg_interval=tuple(interval), renorm_min=f.number("renorm_min", d.renorm_min),
            seed=f.integer("seed", d.seed, 0, 2**63 - 1), sampler=f.choice("sampler", SAMPLERS, d.sampler))
    except (InvalidRequestError, InvalidTypeError) as e:
        raise type(e)(str(e), e.param or _sampling_param(str(e))) from None


def _sampling_param(message: str) -> Optional[str]:
    for key, param in (("timestep shift", "timestep_shift"), ("text guidance", "guidance_scale"),
                       ("image guidance", "image_guidance_scale"), ("guidance interval", "cfg_interval"),
                       ("renorm", "renorm_min")):
        if key in message:
            return param
    return None


def sampling_settings(s: SamplingParams) -> Dict[str, Any]:
    """The settings as the request fields that reproduce them (what "reuse settings" sends back)."""
    return {"steps": s.steps, "guidance_scale": s.cfg_text, "image_guidance_scale": s.cfg_image,
            "timestep_shift": s.shift, "cfg_interval": list(s.cfg_interval), "renorm_min": s.renorm_min,
            "seed": s.seed, "sampler": s.sampler}


def posterior(f: Fields) -> Posterior:
    return Posterior(sample=not f.boolean("posterior_mean"), seed=f.integer("posterior_seed", POSTERIOR_SEED))


def size(f: Fields, config: ServerConfig, kind: str) -> Tuple[int, int]:
    """(width, height) from `size` "WxH", else upstream's size of `aspect_ratio` at `resolution`²."""
    default = IMAGE_SIZE if kind == "image" else VIDEO_SIZE
    text = f.text("size")
    given = [f.integer(k, None, 16, MAX_SIDE) for k in ("width", "height")]  # checked even when size wins
    if text not in (None, "auto") and (f.has("aspect_ratio") or f.has("resolution")):
        raise InvalidRequestError("give size, or aspect_ratio and resolution, not both", "size")
    if text not in (None, "auto"):
        w, h = parse_size(text)
    elif f.has("width") or f.has("height"):
        if not (f.has("width") and f.has("height")):
            raise InvalidRequestError("give both width and height (or size WIDTHxHEIGHT)", "width")
        w, h = given
    elif f.has("aspect_ratio"):
        aspect = f.choice("aspect_ratio", OUTPUT_ASPECT_RATIOS)
        resolution = f.integer("resolution", DEFAULT_RESOLUTION[kind], 64, 1024)
        w, h = output_size(aspect, resolution)
    else:
        w, h = default
    if w * h > config.max_pixels:
        raise InvalidRequestError(f"size {w}x{h} is above this server's limit of {config.max_pixels} pixels", "size")
    return w, h


def bucketed_size(image, resolution: int, config: ServerConfig, param: str) -> Tuple[int, int]:
    """(width, height) an input of `image`'s aspect becomes at bucket area `resolution`² (processing.bucket_resize),
    refused now when it passes the position table (tasks.check_latent_grid) or this server's area limit (an extreme
    aspect at a large area)."""
    from PIL import Image

    if isinstance(image, np.ndarray):  # (T, H, W, 3) frames
        width, height = image.shape[2], image.shape[1]
    elif isinstance(image, Image.Image):
        width, height = image.size
    else:  # a local path: its header only
        try:
            with Image.open(image) as img:
                width, height = img.size
        except (OSError, ValueError, SyntaxError):
            raise InvalidRequestError(f"{param} is not a readable image", param) from None
    h, w = nearest_bucket(width, height, resolution)
    try:
        check_latent_grid((1, h // SIZE_STRIDE, w // SIZE_STRIDE))
        too_large = w * h > config.max_pixels * PRESET_SLACK
    except InvalidRequestError:
        too_large = True
    if too_large:
        raise InvalidRequestError(f"a {width}x{height} input at resolution {resolution} makes {w}x{h} outputs: past "
                                  f"the model's position table or this server's limit of {config.max_pixels} pixels; "
                                  "use a lower resolution or an input closer to square", param)
    return w, h

SIZE = re.compile(r"\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*")


def parse_size(text: str) -> Tuple[int, int]:
    m = SIZE.fullmatch(text)
    if m is None:
        raise InvalidRequestError(f"size must be WIDTHxHEIGHT in ASCII digits, e.g. 768x768, got {shown(repr(text))}",
                                  "size")
    return int(m.group(1)), int(m.group(2))


def edit_preset(f: Fields, config: ServerConfig, kind: str, default: str) -> str:
    """An edit's input preset; its bucket area (about resolution² pixels) is the output size, held to the limit."""
    preset = f.choice("preset", [p for p in PRESETS if p.startswith(kind)], default)
    if PRESETS[preset].vae_resolution ** 2 > config.max_pixels * PRESET_SLACK:
        raise InvalidRequestError(f"preset {preset} makes outputs of about {PRESETS[preset].vae_resolution}² pixels, "
                                  f"above this server's limit of {config.max_pixels}", "preset")
    return preset


def frames(f: Fields, config: ServerConfig, fps: float) -> int:
    """`num_frames` (4k+1), else OpenAI's `seconds` at `fps` rounded to the nearest 4k+1."""
    seconds = None
    if f.has("seconds"):  # checked even when num_frames decides
        seconds = f.number("seconds") if not isinstance(f.values["seconds"], str) else _seconds(f.values["seconds"])
        if not 0 < seconds <= 3600:
            raise InvalidRequestError(f"seconds must be in (0, 3600], got {seconds:g}", "seconds")
    if f.has("num_frames"):
        n = f.integer("num_frames", VIDEO_FRAMES, 1, 10**6)
    elif seconds is not None:
        n = FRAME_STRIDE * round(seconds * fps / FRAME_STRIDE) + 1
        if n > config.max_frames:
            longest = (config.max_frames - 1) / fps
            raise InvalidRequestError(f"{seconds:g} s at {fps:g} fps is {n} frames, above this server's limit of "
                                      f"{config.max_frames} ({longest:g} s); ask for fewer seconds or a lower fps",
                                      "seconds")
    else:
        n = VIDEO_FRAMES
    if n > config.max_frames:
        raise InvalidRequestError(f"{n} frames is above this server's limit of {config.max_frames}", "num_frames")
    return n


def _seconds(text: str) -> float:
    v = float(form_number(text, "seconds"))
    if not math.isfinite(v):
        raise InvalidRequestError("seconds must be a finite number", "seconds")
    return v


# -------------------------------------------------------------------------------------------------- routes
def image_generation(f: Fields, config: ServerConfig) -> Parsed:
    f.check_known(("prompt", "size", "aspect_ratio", "resolution", "n", "response_format", "output_format",
                   "enhance_prompt", *SAMPLING_FIELDS))
    w, h = size(f, config, "image")
    n = f.integer("n", 1, 1, config.max_images)
    fmt = f.choice("response_format", RESPONSE_FORMATS, "b64_json")
    output_format = f.choice("output_format", OUTPUT_FORMATS, "png")
    s = sampling(f, config)
    req = build(lambda: TextToImage(f.values.get("prompt"), w, h, s, f.values.get("negative_prompt")), "prompt")
    return Parsed("image", req, {"task": "t2i", "prompt": req.prompt, "size": f"{w}x{h}", "n": n,
                                 "output_format": output_format, **sampling_settings(s), **steering(f, req)}, n, fmt)


def image_edit(f: Fields, files: Dict[str, Upload], config: ServerConfig) -> Parsed:
    f.check_known(("prompt", "image", "image[]", "n", "size", "response_format", "output_format", "preset",
                   "image_guidance_scale", *POSTERIOR_FIELDS, *SAMPLING_FIELDS, "mask", "enhance_prompt"))
    if f.has("mask") or "mask" in files:
        raise InvalidRequestError("masks are not supported: Lance edits the whole image from the instruction", "mask")
    if f.text("size", "auto") != "auto":
        raise InvalidRequestError("an edit keeps the input's size (bucketed as upstream); leave size unset or auto",
                                  "size")
    n = f.integer("n", 1, 1, config.max_images)
    fmt = f.choice("response_format", RESPONSE_FORMATS, "b64_json")
    output_format = f.choice("output_format", OUTPUT_FORMATS, "png")
    preset = edit_preset(f, config, "image", IMAGE_EDIT_PRESET)
    media = media_input(f, files, ("image", "image[]"), config)
    if media is None:
        raise InvalidRequestError("no image: send the image to edit as the multipart file `image`", "image")
    source = inputs.image(media, "image")
    w, h = bucketed_size(source, PRESETS[preset].vae_resolution, config, "image")
    s = sampling(f, config)
    post = posterior(f)
    req = build(lambda: ImageEdit(source, f.values.get("prompt"), preset, s, post, source=media.describe(),
                                  negative_prompt=f.values.get("negative_prompt")), "prompt")
    return Parsed("image", req, {"task": "image_edit", "prompt": req.instruction, "preset": preset, "n": n,
                                 "size": f"{w}x{h}", "output_format": output_format, "input": media.describe(),
                                 "posterior_mean": not post.sample, "posterior_seed": post.seed,
                                 **sampling_settings(s), **steering(f, req)}, n, fmt)


def video_job(f: Fields, files: Dict[str, Upload], config: ServerConfig, task: Optional[str] = None) -> Parsed:
    """POST /v1/videos: text-to-video, image-to-video with `input_reference`, video edit with `video`."""
    f.check_known(("prompt", "size", "aspect_ratio", "resolution", "seconds", "num_frames", "fps", "input_reference",
                   "video", "preset", "image_guidance_scale", *POSTERIOR_FIELDS, *SAMPLING_FIELDS, "task",
                   *VLLM_VIDEO_FIELDS, "enhance_prompt"))
    f = video_params(f)
    fps = f.number("fps", OUTPUT_FPS)
    if fps is not None and fps < MIN_FPS:
        raise InvalidRequestError(f"fps must be at least {MIN_FPS:g}, got {fps:g}", "fps")
    fps = check_fps(fps)
    reference = media_input(f, files, ("input_reference", "image_reference"), config)
    clip = media_input(f, files, ("video",), config)
    if reference is not None and clip is not None:
        raise InvalidRequestError("send either input_reference (image-to-video) or video (video edit), not both",
                                  "video")
    task = task or ("video_edit" if clip is not None else "i2v" if reference is not None else "t2v")
    if task == "i2v" and reference is None:
        raise InvalidRequestError("image-to-video needs the first frame as input_reference", "input_reference")
    if task == "video_edit" and clip is None:
        raise InvalidRequestError("a video edit needs the video to edit as `video`", "video")
    if task == "t2v" and (reference is not None or clip is not None):
        raise InvalidRequestError("text-to-video takes no input media", "input_reference")
    prompt, negative = f.values.get("prompt"), f.values.get("negative_prompt")
    s = sampling(f, config)
    settings: Dict[str, Any] = {"task": task, "prompt": prompt, "fps": fps, **sampling_settings(s)}
    if task == "video_edit":
        preset = edit_preset(f, config, "video", VIDEO_PRESET)
        video_frames, source_fps = inputs.video(clip, "video", config.scratch)
        w, h = bucketed_size(video_frames, PRESETS[preset].vae_resolution, config, "video")
        post = posterior(f)
        req = build(lambda: VideoEdit(video_frames, prompt, preset, source_fps, fps, s, post,
                                      source=clip.describe(), negative_prompt=negative), "prompt")
        settings.update(steering(f, req))
        settings.update(preset=preset, size=f"{w}x{h}", input=clip.describe(), posterior_mean=not post.sample,
                        posterior_seed=post.seed)
        return Parsed("video", req, settings)
    n = frames(f, config, fps)
    settings.update(num_frames=n, seconds=f"{(n - 1) / fps:g}")
    if task == "i2v":
        resolution = f.integer("resolution", I2V_RESOLUTION, 16, 1024)
        if resolution ** 2 > config.max_pixels * PRESET_SLACK:
            raise InvalidRequestError(f"resolution {resolution} is above this server's pixel limit", "resolution")
        first = inputs.image(reference, "input_reference")
        w, h = bucketed_size(first, resolution, config, "resolution")
        post = posterior(f)
        req = build(lambda: ImageToVideo(prompt, first, n, resolution, fps, s, post, source=reference.describe(),
                                         negative_prompt=negative), "prompt")
        settings.update(steering(f, req))
        settings.update(resolution=resolution, size=f"{w}x{h}", input=reference.describe(),
                        posterior_mean=not post.sample, posterior_seed=post.seed)
        return Parsed("video", req, settings)
    w, h = size(f, config, "video")
    req = build(lambda: TextToVideo(prompt, n, w, h, fps, s, negative), "prompt")
    settings.update(size=f"{w}x{h}", **steering(f, req))
    return Parsed("video", req, settings)


def video_params(f: Fields) -> Fields:
    """vLLM-Omni's `video_params` block: its width, height, num_frames and fps where the body has none of its own."""
    block = f.values.get("video_params")
    if block is None:
        return f
    if not isinstance(block, dict) or set(block) - {"width", "height", "num_frames", "fps"}:
        raise InvalidRequestError("video_params must be an object of width, height, num_frames and fps",
                                  "video_params")
    merged = {**{k: v for k, v in block.items() if v is not None}, **f.values}
    merged.pop("video_params")
    return Fields(merged, f.form)


def steering(f: Fields, request) -> Dict[str, Any]:
    """The settings of docs/steering.md a job keeps: its negative prompt and whether its prompt is enhanced (the
    worker rewrites it and adds `revised_prompt`)."""
    out: Dict[str, Any] = {"negative_prompt": request.negative_prompt} if request.negative_prompt else {}
    # "fallback" (as the command line's --enhance-prompt fallback): a failed rewrite keeps the original prompt
    value = f.values.get("enhance_prompt")
    try:
        mode = "fallback" if value == "fallback" else f.boolean("enhance_prompt")
    except InvalidTypeError:
        raise InvalidTypeError(f'enhance_prompt must be true, false or "fallback", got {shown(repr(value))}',
                               "enhance_prompt") from None
    if mode:
        if request.task not in ENHANCE_TASKS:
            raise InvalidRequestError(f"enhance_prompt applies to {', '.join(ENHANCE_TASKS)}, not {request.task}",
                                      "enhance_prompt")
        out["enhance_prompt"] = mode
    return out


def media_input(f: Fields, files: Dict[str, Upload], names: Tuple[str, ...], config: ServerConfig):
    """The first of `names` present as an upload or as a data URL (or allowed local path) field."""
    for name in names:
        if name in files:
            up = files[name]
            return inputs.Media(up.data, up.content_type, up.filename)
        value = f.values.get(name)
        if isinstance(value, dict):  # {"image_url": "data:..."} / {"url": "data:..."}
            if "file_id" in value:
                raise InvalidRequestError(f"{name}: file ids are not supported; send the file as a data URL", name)
            value = value.get("image_url", value.get("url"))
        if value is not None:
            return inputs.from_url(value, name, config.allow_local_files)
    return None


def job(f: Fields, files: Dict[str, Upload], config: ServerConfig) -> Parsed:
    """POST /v1/jobs: any generation task named by `task`, answered at once with the job (the web page's route)."""
    task = f.choice("task", ("t2i", "t2v", "i2v", "image_edit", "video_edit"))
    if task is None:
        raise InvalidRequestError("task is required: t2i, t2v, i2v, image_edit or video_edit", "task")
    rest = Fields({k: v for k, v in f.values.items() if k != "task"}, f.form)
    if task == "t2i":
        return image_generation(rest, config)
    if task == "image_edit":
        return image_edit(rest, files, config)
    return video_job(rest, files, config, task)

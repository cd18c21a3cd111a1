"""Request bodies (JSON or multipart, OpenAI's field names) parsed into `lance_mlx.tasks` requests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

from ..config import DEFAULT_SAMPLING, OUTPUT_FPS, POSTERIOR_SEED, SAMPLERS, SamplingParams
from ..errors import InvalidRequestError, InvalidTypeError
from ..processing import ASPECT_RATIOS, PRESETS, bucket_table
from ..tasks import (
    FRAME_STRIDE,
    I2V_RESOLUTION,
    IMAGE_EDIT_PRESET,
    IMAGE_SIZE,
    VIDEO_FRAMES,
    VIDEO_PRESET,
    VIDEO_SIZE,
    ImageEdit,
    ImageToVideo,
    Posterior,
    TextToImage,
    TextToVideo,
    Understand,
    VideoEdit,
    check_fps,
)
from . import inputs
from .settings import ServerConfig

# OpenAI fields accepted and ignored (they select hosted models or styles this server does not have).
IGNORED = ("model", "user", "quality", "style", "background", "moderation", "output_format", "output_compression",
           "stream_options", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
           "parallel_tool_calls")
SAMPLING_FIELDS = ("steps", "num_inference_steps", "guidance_scale", "image_guidance_scale", "timestep_shift",
                   "cfg_interval", "renorm_min", "seed", "sampler", "negative_prompt")
ENHANCE_TASKS = ("t2i", "t2v", "i2v")  # lance_mlx/enhance.py TASKS
POSTERIOR_FIELDS = ("posterior_seed", "posterior_mean")
RESPONSE_FORMATS = ("b64_json", "url")
PRESET_SLACK = 1.1  # buckets round sides to multiples of 16, so their area may pass resolution² by a few percent
DEFAULT_RESOLUTION = {"image": IMAGE_SIZE[0], "video": I2V_RESOLUTION}  # presets' area when only an aspect is given


class ApiError(Exception):
    """An HTTP error with OpenAI's error body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Upload:
    """A file part of a multipart body."""

    filename: str
    content_type: str
    data: bytes


class Fields:
    """The fields of one body, JSON-typed or (multipart) text, read with the type and bounds each one needs."""

    def __init__(self, values: Dict[str, Any], form: bool = False):
        if not isinstance(values, dict):
            raise InvalidTypeError(f"the request body must be a JSON object, got {type(values).__name__}")
        self.values, self.form = values, form

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None

    def check_known(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed) | set(IGNORED)
        for name in self.values:
            if name not in allowed:
                raise InvalidRequestError(f"unknown field {name!r}: this route takes {', '.join(sorted(allowed))}",
                                          name)

    def text(self, name: str, default: Optional[str] = None) -> Optional[str]:
        v = self.values.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise InvalidTypeError(f"{name} must be a string, got {type(v).__name__}", name)
        return v

    def integer(self, name: str, default: Optional[int] = None, lo: int = 0, hi: int = 2**63 - 1) -> Optional[int]:
        v = self._number(name)
        if v is None:
            return default
        if isinstance(v, float) and not v.is_integer():
            raise InvalidRequestError(f"{name} must be a whole number, got {v!r}", name)
        v = int(v)
        if not lo <= v <= hi:
            raise InvalidRequestError(f"{name} {v} is out of range: use a value in [{lo}, {hi}]", name)
        return v

    def number(self, name: str, default: Optional[float] = None) -> Optional[float]:
        v = self._number(name)
        return default if v is None else float(v)

    def boolean(self, name: str, default: bool = False) -> bool:
        v = self.values.get(name)
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        if self.form and isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "on", "off"):
            return v.lower() in ("true", "1", "on")
        raise InvalidTypeError(f"{name} must be true or false, got {v!r}", name)

    def choice(self, name: str, options: Iterable[str], default: Optional[str] = None) -> Optional[str]:
        v = self.text(name, default)
        options = tuple(options)
        if v is not None and v not in options:
            raise InvalidRequestError(f"{name} {v!r} is not one of {', '.join(options)}", name)
        return v

    def _number(self, name: str):
        v = self.values.get(name)
        if v is None:
            return None
        if self.form and isinstance(v, str):
            try:
                v = float(v) if any(c in v for c in ".eE") or v.strip().lower() in ("nan", "inf", "-inf") else int(v)
            except ValueError:
                raise InvalidTypeError(f"{name} must be a number, got {v!r}", name) from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidTypeError(f"{name} must be a number, got {type(v).__name__}", name)
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequestError(f"{name} must be a finite number, got {v!r}", name)
        if abs(v) > 2**63:  # far beyond every bound, and beyond what a float holds exactly
            raise InvalidRequestError(f"{name} is out of range", name)
        return v


def parse_json(body: bytes) -> Fields:
    try:
        values = json.loads(body)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, over-long integers, too deep nesting
        raise InvalidRequestError(f"the request body is not valid JSON: {str(e)[:200]}") from None
    return Fields(values)


# ------------------------------------------------------------------------------------------------ settings
def sampling(f: Fields, config: ServerConfig) -> SamplingParams:
    """SamplingParams from OpenAI-style names (guidance_scale, steps) plus Lance's (timestep_shift, cfg_interval,
    image_guidance_scale, which the request types refuse above 1 for tasks without an input to guide by)."""
    d = DEFAULT_SAMPLING
    steps = f.integer("steps", f.integer("num_inference_steps", d.steps, 1, config.max_steps), 1, config.max_steps)
    interval = f.values.get("cfg_interval", d.cfg_interval)
    if isinstance(interval, str):
        try:
            interval = tuple(float(v) for v in interval.split(","))
        except ValueError:
            raise InvalidTypeError(f"cfg_interval must be two numbers LO,HI, got {interval!r}",
                                   "cfg_interval") from None
    if not isinstance(interval, (list, tuple)) or len(interval) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval):
        raise InvalidTypeError(f"cfg_interval must be two numbers [LO, HI], got {interval!r}", "cfg_interval")
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
    """(width, height) from `size` "WxH", else the upstream bucket of `aspect_ratio` at `resolution`²."""
    default = IMAGE_SIZE if kind == "image" else VIDEO_SIZE
    text = f.text("size")
    if text not in (None, "auto") and (f.has("aspect_ratio") or f.has("resolution")):
        raise InvalidRequestError("give size, or aspect_ratio and resolution, not both", "size")
    if text not in (None, "auto"):
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InvalidRequestError(f"size must be WIDTHxHEIGHT in pixels, e.g. 768x768, got {text!r}", "size")
        w, h = (int(p) for p in parts)
    elif f.has("aspect_ratio"):
        aspect = f.choice("aspect_ratio", ASPECT_RATIOS)
        resolution = f.integer("resolution", DEFAULT_RESOLUTION[kind], 64, 1024)
        h, w = dict(zip(ASPECT_RATIOS, bucket_table(resolution)))[aspect]
    else:
        w, h = default
    if w * h > config.max_pixels:
        raise InvalidRequestError(f"size {w}x{h} is above this server's limit of {config.max_pixels} pixels", "size")
    return w, h


def edit_preset(f: Fields, config: ServerConfig, kind: str, default: str) -> str:
    """An edit's input preset; its bucket area (about resolution² pixels) is the output size, held to the limit."""
    preset = f.choice("preset", [p for p in PRESETS if p.startswith(kind)], default)
    if PRESETS[preset].vae_resolution ** 2 > config.max_pixels * PRESET_SLACK:
        raise InvalidRequestError(f"preset {preset} makes outputs of about {PRESETS[preset].vae_resolution}² pixels, "
                                  f"above this server's limit of {config.max_pixels}", "preset")
    return preset


def frames(f: Fields, config: ServerConfig, fps: float) -> int:
    """`num_frames` (4k+1), else OpenAI's `seconds` at `fps` rounded to the nearest 4k+1."""
    if f.has("num_frames"):
        n = f.integer("num_frames", VIDEO_FRAMES, 1, 10**6)
    elif f.has("seconds"):
        seconds = f.number("seconds") if not isinstance(f.values["seconds"], str) else _seconds(f.values["seconds"])
        if not 0 < seconds <= 3600:
            raise InvalidRequestError(f"seconds must be in (0, 3600], got {seconds:g}", "seconds")
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
    try:
        v = float(text)
    except ValueError:
        raise InvalidTypeError(f"seconds must be a number, got {text!r}", "seconds") from None
    if not math.isfinite(v):
        raise InvalidRequestError("seconds must be a finite number", "seconds")
    return v


# -------------------------------------------------------------------------------------------------- routes
@dataclass
class Parsed:
    """A request ready for the queue: its task request, the settings the history keeps, and response options."""

    object: str  # "image", "video" or "chat.completion"
    request: Any
    settings: Dict[str, Any]
    n: int = 1
    response_format: str = "b64_json"
    stream: bool = False


# Words of the task layer's messages -> the request field they are about, for errors that name no `param`.
MESSAGE_PARAMS = (("image guidance", "image_guidance_scale"), ("width", "size"), ("height", "size"),
                  ("frame count", "num_frames"), ("frames", "num_frames"),
                  ("input fps", "video"), ("fps", "fps"), ("input video", "video"), ("input image", "image"))


def build(make, text_param: str):
    """Construct a request type; an error without a `param` gets the field its message is about."""
    try:
        return make()
    except (InvalidRequestError, InvalidTypeError) as e:
        if e.param is None:
            message = str(e)
            if "negative prompt" in message:
                e.param = "negative_prompt"
            elif any(w in message for w in ("prompt", "instruction", "question", "tokens long", "system prompt")):
                e.param = text_param
            else:
                e.param = next((p for w, p in MESSAGE_PARAMS if w in message), None)
        raise


def image_generation(f: Fields, config: ServerConfig) -> Parsed:
    f.check_known(("prompt", "size", "aspect_ratio", "resolution", "n", "response_format", "enhance_prompt",
                   *SAMPLING_FIELDS))
    w, h = size(f, config, "image")
    n = f.integer("n", 1, 1, config.max_images)
    fmt = f.choice("response_format", RESPONSE_FORMATS, "b64_json")
    s = sampling(f, config)
    req = build(lambda: TextToImage(f.values.get("prompt"), w, h, s, f.values.get("negative_prompt")), "prompt")
    return Parsed("image", req, {"task": "t2i", "prompt": req.prompt, "size": f"{w}x{h}", "n": n,
                                 **sampling_settings(s), **steering(f, req)}, n, fmt)


def image_edit(f: Fields, files: Dict[str, Upload], config: ServerConfig) -> Parsed:
    f.check_known(("prompt", "image", "image[]", "n", "size", "response_format", "preset", "image_guidance_scale",
                   *POSTERIOR_FIELDS, *SAMPLING_FIELDS, "mask", "enhance_prompt"))
    if f.has("mask") or "mask" in files:
        raise InvalidRequestError("masks are not supported: Lance edits the whole image from the instruction", "mask")
    if f.text("size", "auto") != "auto":
        raise InvalidRequestError("an edit keeps the input's size (bucketed as upstream); leave size unset or auto",
                                  "size")
    n = f.integer("n", 1, 1, config.max_images)
    fmt = f.choice("response_format", RESPONSE_FORMATS, "b64_json")
    preset = edit_preset(f, config, "image", IMAGE_EDIT_PRESET)
    media = media_input(f, files, ("image", "image[]"), config)
    if media is None:
        raise InvalidRequestError("no image: send the image to edit as the multipart file `image`", "image")
    source = inputs.image(media, "image")
    s = sampling(f, config)
    post = posterior(f)
    req = build(lambda: ImageEdit(source, f.values.get("prompt"), preset, s, post, source=media.describe(),
                                  negative_prompt=f.values.get("negative_prompt")), "prompt")
    return Parsed("image", req, {"task": "image_edit", "prompt": req.instruction, "preset": preset, "n": n,
                                 "input": media.describe(), "posterior_mean": not post.sample,
                                 "posterior_seed": post.seed, **sampling_settings(s), **steering(f, req)}, n, fmt)


def video_job(f: Fields, files: Dict[str, Upload], config: ServerConfig, task: Optional[str] = None) -> Parsed:
    """POST /v1/videos: text-to-video, image-to-video with `input_reference`, video edit with `video`."""
    f.check_known(("prompt", "size", "aspect_ratio", "resolution", "seconds", "num_frames", "fps", "input_reference",
                   "video", "preset", "image_guidance_scale", *POSTERIOR_FIELDS, *SAMPLING_FIELDS, "task",
                   "enhance_prompt"))
    fps = check_fps(f.number("fps", OUTPUT_FPS))
    reference = media_input(f, files, ("input_reference",), config)
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
        post = posterior(f)
        req = build(lambda: VideoEdit(video_frames, prompt, preset, source_fps, fps, s, post,
                                      source=clip.describe(), negative_prompt=negative), "prompt")
        settings.update(steering(f, req))
        settings.update(preset=preset, input=clip.describe(), posterior_mean=not post.sample,
                        posterior_seed=post.seed)
        return Parsed("video", req, settings)
    n = frames(f, config, fps)
    settings.update(num_frames=n, seconds=f"{(n - 1) / fps:g}")
    if task == "i2v":
        resolution = f.integer("resolution", I2V_RESOLUTION, 16, 1024)
        if resolution ** 2 > config.max_pixels * PRESET_SLACK:
            raise InvalidRequestError(f"resolution {resolution} is above this server's pixel limit", "resolution")
        first = inputs.image(reference, "input_reference")
        post = posterior(f)
        req = build(lambda: ImageToVideo(prompt, first, n, resolution, fps, s, post, source=reference.describe(),
                                         negative_prompt=negative), "prompt")
        settings.update(steering(f, req))
        settings.update(resolution=resolution, input=reference.describe(), posterior_mean=not post.sample,
                        posterior_seed=post.seed)
        return Parsed("video", req, settings)
    w, h = size(f, config, "video")
    req = build(lambda: TextToVideo(prompt, n, w, h, fps, s, negative), "prompt")
    settings.update(size=f"{w}x{h}", **steering(f, req))
    return Parsed("video", req, settings)


def steering(f: Fields, request) -> Dict[str, Any]:
    """The settings of docs/steering.md a job keeps: its negative prompt and whether its prompt is enhanced (the
    worker rewrites it and adds `revised_prompt`)."""
    out: Dict[str, Any] = {"negative_prompt": request.negative_prompt} if request.negative_prompt else {}
    if f.boolean("enhance_prompt"):
        if request.task not in ENHANCE_TASKS:
            raise InvalidRequestError(f"enhance_prompt applies to {', '.join(ENHANCE_TASKS)}, not {request.task}",
                                      "enhance_prompt")
        out["enhance_prompt"] = True
    return out


def media_input(f: Fields, files: Dict[str, Upload], names: Tuple[str, ...], config: ServerConfig):
    """The first of `names` present as an upload or as a data URL (or allowed local path) field."""
    for name in names:
        if name in files:
            up = files[name]
            return inputs.Media(up.data, up.content_type, up.filename)
        value = f.values.get(name)
        if isinstance(value, dict):  # {"image_url": "data:..."} / {"url": "data:..."}
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


# ---------------------------------------------------------------------------------------------------- chat
CHAT_ROLES = ("system", "developer", "user", "assistant")
MEDIA_PARTS = {"image_url": False, "input_image": False, "video_url": True, "input_video": True}


def chat(f: Fields, config: ServerConfig) -> Parsed:
    """Image/video understanding from OpenAI chat messages: one image or video part, the last user text as the
    question (none: describe), system messages as the system prompt."""
    f.check_known(("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream",
                   "preset", "n", "stop"))
    if f.integer("n", 1, 1, 1) != 1:
        raise InvalidRequestError("n must be 1", "n")
    messages = f.values.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", "messages")
    system, question, media = [], None, []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise InvalidRequestError(f"{where} must be an object with role one of {', '.join(CHAT_ROLES)}", "messages")
        texts = []
        for part in _parts(m.get("content"), where):
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidTypeError(f"{where}: a text part needs a string `text`", "messages")
                texts.append(part["text"])
            elif kind in MEDIA_PARTS:
                url = part.get(kind) or part.get("image_url") or part.get("video_url")
                url = url.get("url") if isinstance(url, dict) else url
                media.append((inputs.from_url(url, "messages", config.allow_local_files), MEDIA_PARTS[kind]))
            else:
                raise InvalidRequestError(f"{where}: unsupported content part type {kind!r}; use text, image_url or "
                                          "video_url", "messages")
        if m["role"] in ("system", "developer"):
            system.extend(texts)
        elif m["role"] == "user":
            question = "\n".join(t for t in texts if t.strip()) or None
    if len(media) != 1:
        raise InvalidRequestError(f"send exactly one image_url or video_url part (got {len(media)}): Lance answers "
                                  "about one image or video", "messages")
    item, is_video = media[0]
    is_video = is_video or item.is_video
    preset = f.choice("preset", list(PRESETS))
    if is_video:
        clip, fps = inputs.video(item, "messages", config.scratch)
        visual: Any = clip
    else:
        visual, fps = inputs.image(item, "messages"), None
    max_tokens = f.integer("max_completion_tokens", f.integer("max_tokens", None, 1, 32768), 1, 32768)
    options = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", f.number("temperature")),
                                 ("top_p", f.number("top_p")), ("seed", f.integer("seed"))) if v is not None}
    req = build(lambda: Understand(visual, question, video=is_video, preset=preset, input_fps=fps,
                                   system_prompt="\n".join(system) or None, source=item.describe(), **options),
                "messages")
    settings = {"task": req.task, "question": question, "input": item.describe(), "max_tokens": req.max_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
    return Parsed("chat.completion", req, settings, stream=f.boolean("stream"))


def _parts(content, where: str) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", "messages")
    return content

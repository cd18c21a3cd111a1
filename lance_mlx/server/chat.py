"""POST /v1/chat/completions bodies: image and video understanding from OpenAI chat messages."""

from __future__ import annotations

from typing import Optional, Tuple

from ..errors import InvalidRequestError, InvalidTypeError
from ..processing import PRESETS
from ..tasks import Understand
from . import inputs
from .fields import Fields, Parsed, build
from .redact import clip
from .settings import ServerConfig

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MEDIA_PARTS = {"image_url": False, "input_image": False, "video_url": True, "input_video": True}
# OpenAI chat fields accepted and ignored: tools and functions (Lance answers in text, never calls one), storage,
# routing and billing options of a hosted service, and sampling penalties the upstream decoder does not have.
CHAT_IGNORED = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store",
                "service_tier", "logit_bias", "modalities", "audio", "prediction", "reasoning_effort",
                "web_search_options", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "verbosity",
                "user", "stream_options", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty")
MAX_STOP = 4  # OpenAI's limit on `stop` sequences


def chat(f: Fields, config: ServerConfig) -> Parsed:
    """Image/video understanding from OpenAI chat messages: one image or video part, the last user text as the
    question (none: describe), system messages as the system prompt."""
    f.check_known(("messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream",
                   "preset", "n", "stop", "response_format", *CHAT_IGNORED))
    if f.integer("n", 1, 1, 1) != 1:
        raise InvalidRequestError("n must be 1", "n")
    _response_format(f.values.get("response_format"))
    stop = _stop(f.values.get("stop"))
    messages = f.values.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", "messages")
    system, question, media, every_text = [], None, [], []
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
                every_text.append(part["text"])
            elif kind in MEDIA_PARTS:
                url = part.get(kind) or part.get("image_url") or part.get("video_url")
                url = url.get("url") if isinstance(url, dict) else url
                media.append((inputs.from_url(url, "messages", config.allow_local_files), MEDIA_PARTS[kind]))
            else:
                raise InvalidRequestError(f"{where}: unsupported content part type {clip(repr(kind), 60)}; use "
                                          "text, image_url or video_url", "messages")
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
        visual, fps = inputs.video(item, "messages", config.scratch)
    else:
        visual, fps = inputs.image(item, "messages"), None
    max_tokens = f.integer("max_completion_tokens", f.integer("max_tokens", None, 1, 32768), 1, 32768)
    options = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", f.number("temperature")),
                                 ("top_p", f.number("top_p")), ("seed", f.integer("seed"))) if v is not None}
    req = build(lambda: Understand(visual, question, video=is_video, preset=preset, input_fps=fps,
                                   system_prompt="\n".join(system) or None, source=item.describe(), **options),
                "messages")
    settings = {"task": req.task, "question": question, "input": item.describe(), "max_tokens": req.max_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "stop": list(stop)}
    return Parsed("chat.completion", req, settings, stream=f.boolean("stream"), texts=tuple(every_text),
                  stop=stop)


def _response_format(value) -> None:
    """Only free text: a JSON mode the model cannot keep is refused, not silently ignored."""
    kind = value.get("type") if isinstance(value, dict) else value
    if value is not None and kind != "text":
        raise InvalidRequestError(f"response_format {clip(repr(kind), 40)} is not supported: Lance answers in free "
                                  "text; leave response_format unset or {\"type\": \"text\"}", "response_format")


def _stop(value) -> Tuple[str, ...]:
    """OpenAI's `stop`: a string or up to 4 strings; the answer ends before the first one it would contain."""
    stops: Optional[list] = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(v, str) and v for v in stops) or len(stops) > MAX_STOP:
        raise InvalidRequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return tuple(stops)


def _parts(content, where: str) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise InvalidRequestError(f"{where}.content must be a string or a list of parts", "messages")
    return content

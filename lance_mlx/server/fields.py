"""The fields of a request body (JSON or multipart) read with the type and bounds each needs, OpenAI's error
body, and a parsed request on its way to the queue."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Tuple

from ..errors import InvalidRequestError, InvalidTypeError
from .redact import bad_character, clip, redact

# OpenAI fields accepted and ignored (they select hosted models or styles this server does not have).
IGNORED = ("model", "user", "quality", "style", "background", "moderation", "output_compression",
           "stream_options", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty",
           "parallel_tool_calls")

class ApiError(Exception):
    """An HTTP error with OpenAI's error body {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        message = redact(message)
        param = clip(param.encode("utf-8", "backslashreplace").decode(), 64) if param else param
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


INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII only: int() also takes "²", "١٢" and "1_000"
DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class Fields:
    """The fields of one body, JSON-typed or (multipart) text, read with the type and bounds each one needs."""

    def __init__(self, values: Dict[str, Any], form: bool = False):
        if not isinstance(values, dict):
            raise InvalidTypeError(f"the request body must be a JSON object, got {type(values).__name__}")
        check_characters(values)
        self.values, self.form = values, form

    def has(self, name: str) -> bool:
        return self.values.get(name) is not None

    def check_known(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed) | set(IGNORED)
        for name in self.values:
            if name not in allowed:
                raise InvalidRequestError(f"unknown field {clip(repr(name), 60)}: this route takes "
                                          f"{', '.join(sorted(allowed))}", name)

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
            raise InvalidRequestError(f"{name} must be a whole number, got {clip(repr(v))}", name)
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
        raise InvalidTypeError(f"{name} must be true or false, got {clip(repr(v))}", name)

    def choice(self, name: str, options: Iterable[str], default: Optional[str] = None) -> Optional[str]:
        v = self.text(name, default)
        options = tuple(options)
        if v is not None and v not in options:
            raise InvalidRequestError(f"{name} {clip(repr(v))} is not one of {', '.join(options)}", name)
        return v

    def _number(self, name: str):
        v = self.values.get(name)
        if v is None:
            return None
        if self.form and isinstance(v, str):
            v = form_number(v, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidTypeError(f"{name} must be a number, got {type(v).__name__}", name)
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidRequestError(f"{name} must be a finite number, got {clip(repr(v))}", name)
        if abs(v) > 2**63:  # far beyond every bound, and beyond what a float holds exactly
            raise InvalidRequestError(f"{name} is out of range", name)
        return v


def form_number(text: str, name: str):
    """A number written in a form field: ASCII digits only (no "²", no "1_000"), an int unless it has . or e."""
    text = text.strip()
    if INTEGER.fullmatch(text):
        return int(text)
    if DECIMAL.fullmatch(text):
        return float(text)
    raise InvalidTypeError(f"{name} must be a number written in ASCII digits, got {clip(repr(text))}", name)


def check_characters(values: Dict[str, Any]) -> None:
    """Refuse a control character (NUL, ESC, ...; tab and newlines are fine) or a lone surrogate in any key or text
    of a body: they cannot be encoded, tokenized or written into a file's metadata."""
    stack = [(k, k, v) for k, v in values.items()]
    while stack:
        top, key, value = stack.pop()
        for text in (key, value) if isinstance(value, str) else (key,):
            found = bad_character(text) if isinstance(text, str) else None
            if found is not None:
                where = ascii(top)[1:-1] if isinstance(top, str) else str(top)
                raise InvalidRequestError(f"{clip(where, 60)} contains the character U+{ord(found[1]):04X} at "
                                          f"position {found[0]}; remove control characters and invalid Unicode",
                                          top if bad_character(str(top)) is None else None)
        if isinstance(value, dict):
            stack.extend((top, k, v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((top, i, v) for i, v in enumerate(value))


def parse_json(body: bytes) -> Fields:
    try:
        values = json.loads(body)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, over-long integers, too deep nesting
        raise InvalidRequestError(f"the request body is not valid JSON: {str(e)[:200]}") from None
    return Fields(values)


@dataclass
class Parsed:
    """A request ready for the queue: its task request, the settings the history keeps, and response options."""

    object: str  # "image", "video" or "chat.completion"
    request: Any
    settings: Dict[str, Any]
    n: int = 1
    response_format: str = "b64_json"
    stream: bool = False
    texts: Tuple[str, ...] = ()  # every text of the request the token limit counts (chat: all messages' texts)
    stop: Tuple[str, ...] = ()  # chat: where the answer ends


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

"""Error text as clients see it: no absolute paths or memory addresses of this machine, echoed values cut short, and
always encodable as UTF-8."""

from __future__ import annotations

import re

MAX_ECHO = 200  # characters of a value echoed back in an error
MAX_MESSAGE = 1000  # characters of a whole error message
_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\"/]+/)+([^\s'\"/,;:)]*)")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_LONG = re.compile(r"\S{%d,}" % (MAX_ECHO + 1))
_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def clip(text: str, limit: int = MAX_ECHO) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def redact(message: str) -> str:
    """`message` fit to send: paths reduced to their last part, addresses hidden, long runs cut, bounded."""
    message = message[: 8 * MAX_MESSAGE]  # the expressions below then run on a bounded text
    message = _PATH.sub(lambda m: m.group(1) or "<folder>", message)
    message = _ADDRESS.sub("0x…", message)
    message = _LONG.sub(lambda m: clip(m.group(0)), message)
    message = clip(message, MAX_MESSAGE)
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_character(text: str):
    """The first control character or lone surrogate in `text` as (index, character), else None."""
    m = _BAD_TEXT.search(text)
    return None if m is None else (m.start(), m.group(0))

"""What stands in front of every route: the Host allow-list (DNS rebinding), the Origin check of state-changing
requests (other web pages), the API key (or a signed, expiring output link), the body-size limit, and the headers
that keep the page out of other sites' frames."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import time
from typing import Dict, Iterable, Optional, Tuple
from urllib.parse import parse_qs, urlencode, urlsplit

from .fields import ApiError

PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # no API key needed: no data behind them
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # listening on every address: any IP literal may be the Host
STATE_CHANGING = (b"POST", b"PUT", b"PATCH", b"DELETE")
LINK_TTL_S = 3600  # a signed output link lasts an hour, as OpenAI's image URLs do
CONTENT_PATH = re.compile(r"^/v1/(jobs|videos)/([A-Za-z0-9_.-]{1,100})/content$")
PAGE_HEADERS = [  # the web page: never in another site's frame; scripts, styles and media only from this server
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                                 b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
]
EVERY_RESPONSE = [(b"x-content-type-options", b"nosniff")]


class BodyTooLarge(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The name of a Host header or an Origin's netloc, without port or IPv6 brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Signer:
    """HMAC links to a job's output with a per-process secret: a keyed server's `url` outputs can be fetched by an
    <img> tag or a browser tab (which cannot send the key) until they expire, and a restart revokes them all."""

    def __init__(self):
        self._secret = secrets.token_bytes(32)

    def _mac(self, job_id: str, index: int, expires: int) -> str:
        return hmac.new(self._secret, f"{job_id}:{index}:{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, job_id: str, index: int, now: Optional[float] = None) -> str:
        expires = int(now if now is not None else time.time()) + LINK_TTL_S
        return urlencode({"index": index, "expires": expires, "sig": self._mac(job_id, index, expires)})

    def valid(self, path: str, query: bytes) -> bool:
        m = CONTENT_PATH.match(path)
        if m is None:
            return False
        args = parse_qs(query.decode("latin-1"))
        try:
            index = int(args.get("index", ["0"])[0]) if m.group(1) == "jobs" else 0
            expires, sig = int(args["expires"][0]), args["sig"][0]
        except (KeyError, ValueError, IndexError):
            return False
        return expires >= time.time() and hmac.compare_digest(sig, self._mac(m.group(2), index, expires))


class Guard:
    """ASGI middleware in front of every route."""

    def __init__(self, app, api_key: Optional[str], max_body: int, hosts: Iterable[str], any_ip_host: bool,
                 signer: Signer):
        self.app, self.key, self.max_body, self.signer = app, api_key, max_body, signer
        self.hosts, self.any_ip_host = {h.lower().strip("[]") for h in hosts}, any_ip_host

    def host_allowed(self, host: str) -> bool:
        name = split_host(host)
        if name in self.hosts or "*" in self.hosts:
            return True
        if self.any_ip_host:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not self.host_allowed(host):  # DNS rebinding: a web page's name pointed at this address
            return await _reply(send, ApiError(421, "this server does not answer to that Host name; start it with "
                                                    "--allow-host NAME to allow it", code="host_not_allowed"))
        origin = headers.get(b"origin")
        if scope.get("method", "").encode() in STATE_CHANGING and origin is not None and not same_origin(
                origin.decode("latin-1"), host):
            return await _reply(send, ApiError(403, "requests from other web pages are refused (Origin does not "
                                                    "match this server)", code="origin_not_allowed"))
        if self.key and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"")
            signed = scope.get("method") in ("GET", "HEAD") and self.signer.valid(path, scope.get("query_string",
                                                                                                 b""))
            if not signed and not hmac.compare_digest(given, b"Bearer " + self.key.encode()):
                return await _reply(send, ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                                   code="invalid_api_key"))
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, ApiError(400, "bad Content-Length header"))
            if int(length) > self.max_body:
                return await _reply(send, too_large(self.max_body))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge
            return message

        extra = EVERY_RESPONSE + (PAGE_HEADERS if path == "/" else [])

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers") or []) + extra}
            await send(message)

        return await self.app(scope, counted, with_headers)


def same_origin(origin: str, host: str) -> bool:
    """Whether an Origin header names this server as the request reached it (its Host)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(host) and parts.netloc.lower() == host.lower()


def form_allowed(headers: Dict[str, str]) -> bool:
    """A form body (which any web page can send without asking) is taken from this server's own page (same Origin),
    from a client that sends a bearer key (a custom header: a page cannot send one cross-site), or from a client
    that is not a browser (no Origin and no Sec-Fetch-Site: curl, the OpenAI SDK, requests)."""
    if headers.get("authorization", "").startswith("Bearer "):
        return True
    origin, fetch_site = headers.get("origin"), headers.get("sec-fetch-site")
    if origin is not None:
        return same_origin(origin, headers.get("host", ""))
    return fetch_site in (None, "same-origin", "none")


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is above this server's limit of {limit // 2**20} MiB", code="too_large")


async def _reply(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers + EVERY_RESPONSE})
    await send({"type": "http.response.body", "body": body})


def allowed_hosts(host: str, extra: Iterable[str]) -> Tuple[Tuple[str, ...], bool]:
    """The Host names a server on `host` answers to, and whether any IP literal is one (a wildcard `host`)."""
    names = set(LOOPBACK_NAMES) | {h.lower() for h in extra}
    if host not in WILDCARD_HOSTS:
        names.add(host.lower().strip("[]"))
    return tuple(sorted(names)), host in WILDCARD_HOSTS

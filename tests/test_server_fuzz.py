"""Malformed input fuzz: generated bad bodies (wrong types, huge numbers, bad base64, wrong content types, truncated
multipart) to every POST route; none may get a 500 or stop the worker."""

import json
import random
import time

import pytest

import server_helpers as H
from server_helpers import running_client

ROUTES = {
    "/v1/images/generations": {"prompt": "a cat", "size": "32x32", "steps": 1, "n": 1, "seed": 1,
                               "guidance_scale": 4.0, "response_format": "b64_json", "cfg_interval": [0.4, 1.0]},
    "/v1/videos": {"prompt": "waves", "size": "32x32", "num_frames": 5, "steps": 1, "fps": 12, "seconds": "1",
                   "input_reference": H.data_url(H.png_bytes()), "resolution": 32, "posterior_mean": False},
    "/v1/jobs": {"task": "t2i", "prompt": "a cup", "size": "32x32", "steps": 1, "timestep_shift": 3.5},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": H.data_url(H.png_bytes())}}]}],
        "max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "stream": False},
}
BAD_VALUES = [-1, 0, 2**70, -2**70, 1e308, -1e308, 5e-324, 1.5, "nan", "inf", "", " ", "x" * 70000, [], {}, [1, 2, 3],
              {"a": 1}, True, False, "1e999", "\ud800", "0x10", "32x32x32", "-32x32", "99999999999999999999x1"]
BAD_BASE64 = ["data:image/png;base64,!!!", "data:,abc", "data:image/png,abc", "data:image/png;base64,",
              "data:image/png;base64," + "A" * 7, H.data_url(H.png_bytes()[:40]), H.data_url(b"\0" * 64),
              H.data_url(H.png_bytes(), "video/mp4"), H.data_url(H.gif_bytes(2), "image/gif"),
              "file:///etc/passwd", "/etc/passwd", "http://127.0.0.1:1/a.png", "ftp://x/y", 12, None]
RAW = [b"", b"null", b"[]", b"1", b'"text"', b"{", b'{"prompt": "x"', b'{"prompt": "\xff\xfe"}', b"[" * 100000,
       b'{"seed": ' + b"9" * 5000 + b"}", b'{"prompt": "x", "steps": NaN}', b'{"prompt": "x", "steps": Infinity}',
       b'{"prompt": "x", "size": "32x32", "steps": 1e400}', b"\x00\x01\x02", b'{"a":' * 2000]
CONTENT_TYPES = ["text/plain", "application/xml", "image/png", "multipart/form-data",
                 "multipart/form-data; boundary=zzz", "application/x-www-form-urlencoded",
                 "application/json; charset=x"]


def multipart(fields, files, boundary="fuzzboundary"):
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data, ctype) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def cases():
    """(route, body bytes, content type, what) of every generated bad request."""
    rng = random.Random(0)
    out = []
    for route, base in ROUTES.items():
        for field in base:
            for value in rng.sample(BAD_VALUES, 6):
                body = {**base, field: value}
                out.append((route, json.dumps(body).encode(), "application/json", f"{field}={value!r:.40}"))
        for raw in RAW:
            out.append((route, raw, "application/json", f"raw {raw[:20]!r}"))
        for ctype in CONTENT_TYPES:
            out.append((route, b"prompt=x&steps=1", ctype, f"content-type {ctype}"))
    for url in BAD_BASE64:
        chat = json.loads(json.dumps(ROUTES["/v1/chat/completions"]))
        chat["messages"][0]["content"][1]["image_url"]["url"] = url
        out.append(("/v1/chat/completions", json.dumps(chat).encode(), "application/json", f"chat url {url!r:.40}"))
        for field in ("input_reference", "video"):
            body = {"prompt": "x", "steps": 1, "num_frames": 5, "resolution": 32, field: url}
            out.append(("/v1/videos", json.dumps(body).encode(), "application/json", f"{field} {url!r:.40}"))
    edit, ctype = multipart({"prompt": "make it blue", "steps": "1", "preset": "image_256res"},
                            {"image": ("a.png", H.png_bytes(), "image/png")})
    for cut in sorted(rng.sample(range(1, len(edit) - 1), 12)):
        out.append(("/v1/images/edits", edit[:cut], ctype, f"truncated multipart at {cut}/{len(edit)}"))
    for data in (b"", b"GIF89a", H.png_bytes()[:-20], bytes(rng.randrange(256) for _ in range(300))):
        body, ctype = multipart({"prompt": "x", "steps": "1"}, {"image": ("a.png", data, "image/png")})
        out.append(("/v1/images/edits", body, ctype, f"image of {len(data)} bad bytes"))
    for field, value in (("steps", "1.5"), ("steps", "ten"), ("n", "1e9"), ("seed", "-3"), ("posterior_mean", "maybe"),
                         ("image_guidance_scale", "nan"), ("preset", "video_480p"), ("cfg_interval", "1,0,5")):
        body, ctype = multipart({"prompt": "x", "steps": "1", field: value}, {"image": ("a.png", H.png_bytes(),
                                                                                        "image/png")})
        out.append(("/v1/images/edits", body, ctype, f"form {field}={value}"))
    return out


@pytest.fixture(scope="module")
def client(upstream_root, tmp_path_factory):
    # Tight limits: any generated body that happens to be valid stays a few-millisecond job.
    for c, _ in running_client(upstream_root, tmp_path_factory.mktemp("fuzz"), max_pixels=64 * 64, max_steps=2,
                               max_frames=9, max_images=2, max_body_bytes=2**20):
        yield c


def test_generated_bad_bodies_never_get_a_500(client):
    all_cases = cases()
    assert len(all_cases) >= 100
    statuses = {}
    for route, body, ctype, what in all_cases:
        r = client.post(route, content=body, headers={"content-type": ctype})
        assert r.status_code < 500, f"{route} {what}: {r.status_code} {r.text[:300]}"
        if r.status_code >= 400:
            err = r.json()["error"]
            assert err["message"] and err["type"], (route, what, r.text)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert client.get("/health").status_code == 200, (route, what)
    print(f"{len(all_cases)} bodies: {dict(sorted(statuses.items()))}")
    assert statuses.get(400, 0) > 0.8 * len(all_cases)
    assert client.get("/health").json()["status"] == "ok"
    engine = client.app.state.server["engine"]
    assert engine._thread.is_alive()  # the worker survived everything that reached it
    deadline = time.monotonic() + 60
    while (h := client.get("/health").json())["queued"] or h["running"]:  # the valid ones drain
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.post("/v1/images/generations", json={"prompt": "still fine", **H.FAST}).status_code == 200


# ------------------------------------------------------------------------------------ families of known failures
TEXT_FIELDS = {"/v1/images/generations": "prompt", "/v1/videos": "prompt", "/v1/jobs": "prompt",
               "/v1/images/edits": "prompt"}
BAD_CHARS = ["\ud800", "\udfff", "\x00", "\x1b", "\x7f", "a\x00b", "\x08", "\ufeff\ud83d"]
UNICODE_NUMBERS = ["²", "３２", "١٢", "1_0", "1__0", "_1", "1_", "1e1_0", "⁴", "Ⅻ", "٣٢x٣٢", "²x²", "3_2x32", "32x3_2"]
SMALL_FPS = [1e-300, 1e-9, 0.001, 0.5, 0.999, -1, 0]
HOSTILE_HEADERS = [{"host": "evil.example"}, {"host": "evil.example:8000"}, {"host": "127.0.0.1.evil.example"},
                   {"origin": "http://evil.example"}, {"origin": "null"}, {"origin": "http://localhost:1"},
                   {"origin": "file://"}]


def families():
    """(route, request kwargs, statuses allowed, what) of each family the server once failed on."""
    out = []
    for route, field in TEXT_FIELDS.items():
        base = {"task": "t2i"} if route == "/v1/jobs" else {}
        for ch in BAD_CHARS:
            for body in ({**base, field: f"x{ch}y", "size": "32x32"}, {**base, f"k{ch}": 1, field: "x"}):
                raw = json.dumps(body, ensure_ascii=True).encode()  # escapes survive as lone surrogates
                out.append((route, {"content": raw, "headers": {"content-type": "application/json"}}, {400},
                            f"character {ch!r}"))
    chat = json.loads(json.dumps(ROUTES["/v1/chat/completions"]))
    for ch in BAD_CHARS:
        for role, content in (("system", f"be{ch}brief"), ("assistant", f"a{ch}"), ("user", f"q{ch}")):
            body = {**chat, "messages": [{"role": role, "content": content}] + chat["messages"]}
            out.append(("/v1/chat/completions", {"content": json.dumps(body).encode(),
                                                 "headers": {"content-type": "application/json"}}, {400},
                        f"chat {role} {ch!r}"))
    for text in UNICODE_NUMBERS:
        out.append(("/v1/images/generations", {"json": {"prompt": "x", "steps": 1, "size": text}}, {400},
                    f"size {text!r}"))
        for field in ("steps", "seed", "n", "fps", "seconds", "num_frames", "width", "guidance_scale"):
            out.append(("/v1/videos", {"data": {"prompt": "x", "size": "32x32", "num_frames": "5", field: text}},
                        {400}, f"form {field}={text!r}"))
    for fps in SMALL_FPS:
        out.append(("/v1/videos", {"json": {"prompt": "x", "size": "32x32", "num_frames": 5, "steps": 1,
                                            "fps": fps}}, {400}, f"fps {fps}"))
        out.append(("/v1/videos", {"data": {"prompt": "x", "size": "32x32", "num_frames": "5", "fps": repr(fps)}},
                    {400}, f"form fps {fps}"))
    for w, h in ((400, 100), (100, 400), (640, 64), (33, 1000)):
        for resolution in (1024, 1000, 960, 900):
            body = {"prompt": "x", "num_frames": 5, "steps": 1, "resolution": resolution,
                    "input_reference": H.data_url(H.png_bytes(size=(w, h)))}
            out.append(("/v1/videos", {"json": body}, {400}, f"i2v {w}x{h} at {resolution}"))
    for field in ("size", "prompt", "x" * 100000):
        body = {"prompt": "x", "steps": 1, "size": "32x32", field: {"z": "Q" * 300000}} if field != "prompt" else {
            "prompt": ["Q" * 300000]}
        out.append(("/v1/images/generations", {"json": body}, {400}, f"huge {field[:10]}"))
    for headers in HOSTILE_HEADERS:
        for route in ("/v1/images/generations", "/v1/videos", "/v1/chat/completions"):
            out.append((route, {"json": {"prompt": "x", **H.FAST}, "headers": headers}, {403, 421},
                        f"headers {headers}"))
        out.append(("/v1/videos", {"data": {"prompt": "x"}, "headers": {**headers, "sec-fetch-site": "cross-site"}},
                    {403, 421}, f"form {headers}"))
    for route in ("/v1/images/generations", "/v1/chat/completions"):
        out.append((route, {"data": {"prompt": "x", "steps": "1"}}, {415}, "form on a JSON route"))
    vllm = {"prompt": "x", "num_frames": 5, "num_inference_steps": 1}
    for extra in ({"width": 32}, {"height": 32}, {"width": -32, "height": 32}, {"width": 2048, "height": 16},
                  {"width": "32", "height": [32]}, {"video_params": [1]}, {"video_params": {"depth": 3}},
                  {"video_params": {"width": 99999, "height": 1}}, {"image_reference": {"file_id": "f"}},
                  {"image_reference": {"image_url": "file:///etc/passwd"}}, {"image_reference": "x"},
                  {"num_inference_steps": 0}, {"guidance_scale": "high"}, {"seed": -1}):
        out.append(("/v1/videos", {"json": {**vllm, **extra}}, {400}, f"vllm {extra!r:.60}"))
    for extra in ({"stop": [1]}, {"stop": [""]}, {"stop": ["a"] * 5}, {"stop": {"a": 1}},
                  {"response_format": {"type": "json_object"}}, {"response_format": {"type": "json_schema"}},
                  {"response_format": "xml"}, {"n": 2}):
        out.append(("/v1/chat/completions", {"json": {**chat, **extra}}, {400}, f"chat {extra!r:.60}"))
    for fmt in ("gif", "svg", "JPEG", "", 1, None):
        if fmt is not None:
            out.append(("/v1/images/generations", {"json": {"prompt": "x", **H.FAST, "output_format": fmt}}, {400},
                        f"output_format {fmt!r}"))
    long_system = {**chat, "messages": [{"role": "system", "content": "lighthouse " * 4500}] + chat["messages"]}
    out.append(("/v1/chat/completions", {"json": long_system}, {400}, "a long system message"))
    clip = H.data_url(H.png_bytes(), "video/mp4")
    out.append(("/v1/videos", {"json": {"prompt": "x", "num_frames": 5, "steps": 1, "video": clip}}, {400},
                "an image as a video"))
    return out


def test_families_of_known_failures(client):
    all_cases = families()
    assert len(all_cases) >= 300
    for route, kwargs, allowed, what in all_cases:
        r = client.post(route, **kwargs)
        assert r.status_code in allowed, f"{route} {what}: {r.status_code} {r.text[:300]}"
        err = r.json()["error"]
        assert err["message"] and len(r.content) < 3000, (route, what, len(r.content))
        assert "/tmp/" not in r.text and "0x7f" not in r.text.lower(), (route, what, r.text[:300])
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok", (route, what, health.text)
    assert client.app.state.server["engine"]._thread.is_alive()

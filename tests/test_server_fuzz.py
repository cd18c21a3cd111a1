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

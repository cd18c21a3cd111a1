"""Helpers of the server tests: configs on the tiny checkpoints, a cached loader, media as data URLs, SSE parsing."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lance_mlx.server.jobs import default_loader
from lance_mlx.server.settings import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = "32x32"  # 2x2 latents: the smallest output the tiny model makes in a few milliseconds
FAST = {"steps": 1, "size": SIZE}
BASE_URL = "http://localhost"  # a Host name the server answers to (guard.allowed_hosts)
_PIPELINES = {}


def config(upstream_root, output_dir, **overrides) -> ServerConfig:
    """A server on the tiny upstream-layout folder (both checkpoints), float32."""
    return ServerConfig(model=str(upstream_root), output_dir=Path(output_dir), dtype="float32", **overrides)


def make_client(upstream_root, out, **overrides):
    """A TestClient of an app on the tiny checkpoints (enter it to start the worker) and its config."""
    from fastapi.testclient import TestClient

    from lance_mlx.server import create_app

    cfg = config(upstream_root, out, **overrides)
    return TestClient(create_app(cfg, cached_loader(cfg)), base_url=BASE_URL), cfg


def running_client(upstream_root, out, **overrides):
    """`make_client`, entered (its worker started) for the life of a fixture: `yield from` it."""
    client, cfg = make_client(upstream_root, out, **overrides)
    with client:
        yield client, cfg


def error_of(r, status=400):
    """The OpenAI-style error body of a response with `status`."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def wait_done(client, job_id):
    """A job's SSE events (parsed) up to its final "done" one."""
    frames = sse_json(client.get(f"/v1/jobs/{job_id}/events").text)
    assert frames[-1]["type"] == "done"
    return frames


def cached_loader(cfg: ServerConfig):
    """The server's loader, with each checkpoint loaded once per test session (loading dominates tiny jobs)."""
    load = default_loader(cfg)

    def loader(kind):
        key = (cfg.model_for(kind), kind)
        if key not in _PIPELINES:
            _PIPELINES[key] = load(kind)
        return _PIPELINES[key]

    return loader


def png_bytes(size=(40, 32), color=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = color
    arr[: size[1] // 2, : size[0] // 2] = (20, 200, 60)
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(frames: int = 9, size=(32, 32)) -> bytes:
    """A short animated GIF at 12 fps (a video input the decoder reads without ffmpeg)."""
    buf = io.BytesIO()
    imgs = [Image.fromarray(np.full((size[1], size[0], 3), 10 * i, np.uint8)) for i in range(frames)]
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=83, loop=0)
    return buf.getvalue()


def data_url(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"


def parse_sse(text: str) -> list:
    """SSE frames -> [(event name or None, data string)], comment-only blocks left out."""
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:  # a block of comments only (": keep-alive") carries no event
            frames.append((event, "\n".join(data)))
    return frames


def sse_json(text: str) -> list:
    return [json.loads(d) for _, d in parse_sse(text) if d != "[DONE]"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(upstream_root, output_dir, *args, port=None):
    """`serve.py` in a subprocess on 127.0.0.1; returns (process, base URL) once /health answers."""
    import httpx

    port = port or free_port()
    cmd = [sys.executable, str(ROOT / "serve.py"), "--model", str(upstream_root), "--dtype", "float32",
           "--output-dir", str(output_dir), "--port", str(port), "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve.py did not answer /health within 60 s")


def stop_server(proc, kill: bool = False) -> None:
    if proc.poll() is None:
        proc.kill() if kill else proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

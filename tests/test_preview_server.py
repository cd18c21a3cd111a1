"""The server's `preview` events: opt-in per job, small JPEG data URLs, at most one a second, before `done`."""

import base64
import io
import time

import pytest
from PIL import Image

import server_helpers as H
from lance_mlx.preview import step_preview_url
from lance_mlx.server import jobs


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("preview"), max_steps=1000)


def _decode(url: str) -> Image.Image:
    head, data = url.split(",", 1)
    assert head == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    assert img.format == "JPEG"
    return img


def test_preview_events_decode_as_jpeg_before_done(served):
    client, _ = served
    job = client.post("/v1/jobs", data={"task": "t2i", "prompt": "a cup", "size": "48x32", "steps": "3",
                                        "preview": "true"}).json()
    events = H.wait_done(client, job["id"])
    kinds = [e["type"] for e in events]
    previews = [e for e in events if e["type"] == "preview"]
    assert previews and kinds.index("preview") < kinds.index("done")
    assert previews[0]["step"] == 1  # the first step always shows one
    assert kinds.index("preview") > kinds.index("step")  # each comes right after its step event
    for e in previews:
        assert _decode(e["image"]).size == (48, 32)
    # a tiny job runs its three steps well within a second: the one-a-second limit leaves one preview
    assert len(previews) == 1


def test_video_preview_events(served, monkeypatch):
    client, _ = served
    monkeypatch.setattr(jobs, "PREVIEW_INTERVAL_S", 0.0)  # every step
    job = client.post("/v1/videos", json={"prompt": "waves", "size": "48x32", "num_frames": 5, "steps": 2,
                                          "preview": True}).json()
    previews = [e for e in H.wait_done(client, job["id"]) if e["type"] == "preview"]
    assert [e["step"] for e in previews] == [1, 2]
    assert all(_decode(e["image"]).size == (48, 32) for e in previews)


def test_previews_are_opt_in_and_checked(served):
    client, _ = served
    job = client.post("/v1/jobs", json={"task": "t2i", "prompt": "a cup", "size": "32x32", "steps": 1}).json()
    assert "preview" not in [e["type"] for e in H.wait_done(client, job["id"])]
    err = H.error_of(client.post("/v1/jobs", json={"task": "t2i", "prompt": "a", "size": "32x32", "preview": "yes"}))
    assert err["param"] == "preview"


class Decoding(Exception):
    pass


def test_preview_events_are_small_and_rate_limited(tmp_path):
    """A large output is previewed within 384 px; a slow run gets one preview a second, not one a step."""
    import mlx.core as mx

    from lance_mlx import sampler

    step = sampler.Step(1, 30, 0.9, mx.zeros((48 * 64, 48)), (1, 48, 64), mx.zeros((48 * 64, 48)),
                        mx.zeros((48 * 64, 48)), 0.9)
    assert _decode(step_preview_url(step, jobs.PREVIEW_MAX_SIDE)).size == (384, 288)

    class Events:
        def __init__(self):
            self.events = []

        def emit(self, event, final=False):
            self.events.append(event)

    class Pipe:  # 8 steps of 0.3 s each: 2.4 s in all
        def plan(self, request):
            return type("Plan", (), {"latent_shape": (1, 2, 2)})()

        def denoise(self, plan):
            for i in range(8):
                time.sleep(0.3)
                yield sampler.Step(i + 1, 8, 0.5, mx.zeros((4, 48)), (1, 2, 2), mx.zeros((4, 48)),
                                   mx.zeros((4, 48)), 0.5)

        def decode(self, *a, **k):
            raise Decoding  # the decode is not what this test is about

        iter_frames = decode

    from lance_mlx.config import SamplingParams
    from lance_mlx.tasks import TextToImage

    job = jobs.Job("image", TextToImage("a", 32, 32, SamplingParams(steps=8)), {}, "m", preview=True)
    job.events = Events()
    engine = jobs.Engine.__new__(jobs.Engine)
    engine._pipeline = lambda kind, task: Pipe()
    engine.config = type("C", (), {"outputs": tmp_path, "dtype": "float32"})()
    with pytest.raises(Decoding):
        engine._generate(job)
    shown = [e["step"] for e in job.events.events if e["type"] == "preview"]
    assert 2 <= len(shown) <= 3 and shown[0] == 1  # at 0 s, after >= 1 s, after >= 2 s

"""Cancel while a job denoises, while it decodes, and between the images of an n > 1 job: it ends within a bounded
time as cancelled, and keeps no output or partial file."""

import json
import threading
import time

import pytest

import server_helpers as H

CANCEL_BOUND_S = 2.0  # from the cancel request to the job's end (one tiny step or VAE chunk, plus polling)


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("cancel"), max_steps=1000)


def leftovers(cfg, job_id):
    return [p.name for p in cfg.outputs.iterdir() if job_id in p.name or ".partial" in p.name]


def cancel_when(client, job_id, event_is, delay=0.0):
    """Follow the job's events; at the first one `event_is` accepts, wait `delay`, cancel; returns (seconds from
    the cancel to the job's end, the final event)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        lines = events.iter_lines()
        for line in lines:
            if line.startswith("data:") and event_is(json.loads(line[5:])):
                break
        time.sleep(delay)
        t0 = time.perf_counter()
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        rest = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    return time.perf_counter() - t0, rest[-1]


def test_cancel_a_long_denoise(served):
    client, cfg = served
    job = client.post("/v1/jobs", json={"task": "t2i", "prompt": "slow", "size": "32x32", "steps": 1000}).json()
    took, done = cancel_when(client, job["id"], lambda e: e["type"] == "started", delay=1.0)
    assert done["type"] == "done" and done["status"] == "cancelled"
    assert took < CANCEL_BOUND_S, f"cancel took {took:.2f} s"
    assert leftovers(cfg, job["id"]) == []


def test_cancel_during_the_decode(served, monkeypatch):
    """A slow VAE (0.3 s a frame): the cancel is seen between its chunks, not after the whole video."""
    client, cfg = served
    warm = client.post("/v1/videos", json={"prompt": "sea", "size": "32x32", "num_frames": 5, "steps": 1}).json()
    H.wait_done(client, warm["id"])  # the worker loads the video checkpoint (MLX arrays belong to its thread)
    pipe = client.app.state.server["engine"]._pipe
    real = pipe.iter_frames
    decoded = []

    def slow_frames(latents):
        for frame in real(latents):
            time.sleep(0.3)
            decoded.append(1)
            yield frame

    monkeypatch.setattr(pipe, "iter_frames", slow_frames)
    job = client.post("/v1/videos", json={"prompt": "sea", "size": "32x32", "num_frames": 33, "steps": 1}).json()
    took, done = cancel_when(client, job["id"], lambda e: e["type"] == "decode", delay=0.7)
    assert done["status"] == "cancelled" and took < CANCEL_BOUND_S, (took, done)
    assert len(decoded) < 33  # stopped part-way through the 33 frames
    assert leftovers(cfg, job["id"]) == []
    assert client.get(f"/v1/jobs/{job['id']}").json()["outputs"] == []


def test_cancel_an_n3_image_job_keeps_none_of_its_images(served):
    client, cfg = served
    job = client.post("/v1/jobs", json={"task": "t2i", "prompt": "three", "size": "32x32", "steps": 200, "n": 3})
    job = job.json()
    took, done = cancel_when(client, job["id"], lambda e: e["type"] == "prepare" and e["index"] == 1)
    assert done["status"] == "cancelled" and done["outputs"] == []
    assert leftovers(cfg, job["id"]) == []  # the first image, written before the cancel, is gone too
    rec = client.get(f"/v1/jobs/{job['id']}").json()
    assert rec["outputs"] == [] and client.get(f"/v1/jobs/{job['id']}/content?index=0").status_code == 404


def test_cancel_from_another_thread_while_the_worker_is_busy(served):
    """The cancel route answers at once while the worker is inside a step (it only sets a flag)."""
    client, _ = served
    job = client.post("/v1/jobs", json={"task": "t2i", "prompt": "slow", "size": "32x32", "steps": 1000}).json()
    time.sleep(0.5)
    answered = []
    t = threading.Thread(target=lambda: answered.append(client.post(f"/v1/jobs/{job['id']}/cancel").status_code))
    t0 = time.perf_counter()
    t.start()
    t.join(5)
    assert answered == [200] and time.perf_counter() - t0 < 1.0
    assert H.wait_done(client, job["id"])[-1]["status"] == "cancelled"

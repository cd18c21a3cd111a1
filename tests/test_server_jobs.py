"""The server's job routes through TestClient: /v1/videos, events, cancel, the queue bound, API key, history."""

import json
import time

import pytest

import server_helpers as H
from server_helpers import error_of, make_client, wait_done

LONG = {"prompt": "a slow pan over a harbour", "size": "32x32", "steps": 1000}  # ~10 s: long enough to catch


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("jobs"), max_steps=1000, max_queue=2)


def test_text_to_video_job(served):
    client, cfg = served
    r = client.post("/v1/videos", json={"prompt": "waves", "size": "32x32", "num_frames": 5, "steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["id"].startswith("video_")
    assert job["model"] == "Lance_3B_Video" and job["size"] == "32x32"
    frames = wait_done(client, job["id"])
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-2:] == ["decode", "done"]
    steps = [f for f in frames if f["type"] == "step"]
    assert [s["step"] for s in steps] == [1, 2] and steps[-1]["progress"] == 95
    done = frames[-1]
    assert done["status"] == "completed" and done["job"]["progress"] == 100
    got = client.get(f"/v1/videos/{job['id']}").json()
    assert got["status"] == "completed" and got["completed_at"] >= got["created_at"] and got["error"] is None
    mp4 = client.get(f"/v1/videos/{job['id']}/content")
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4" and mp4.content[4:8] == b"ftyp"
    assert client.get("/v1/models").json()["data"][1]["resident"] is True
    listed = client.get("/v1/videos").json()
    assert listed["object"] == "list" and job["id"] in [v["id"] for v in listed["data"]]
    assert all(v["object"] == "video" for v in listed["data"])
    assert error_of(client.get(f"/v1/videos/{job['id']}/content?variant=thumbnail"))["param"] == "variant"

    deleted = client.delete(f"/v1/videos/{job['id']}").json()
    assert deleted == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert error_of(client.get(f"/v1/videos/{job['id']}"), 404)["code"] == "not_found"
    assert not list(cfg.outputs.glob(job["id"] + "*"))


def test_video_seconds_and_image_to_video(served):
    client, _ = served
    r = client.post("/v1/videos", data={"prompt": "go", "seconds": "0.4", "steps": "1", "resolution": "32"},
                    files={"input_reference": ("first.png", H.png_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["task"] == "i2v" and job["settings"]["num_frames"] == 5  # 0.4 s at 12 fps -> 4k+1 = 5
    assert wait_done(client, job["id"])[-1]["status"] == "completed"
    # JSON with the first frame as a data URL
    r = client.post("/v1/videos", json={"prompt": "go", "num_frames": 5, "steps": 1, "resolution": 32,
                                        "input_reference": H.data_url(H.png_bytes())})
    assert r.json()["task"] == "i2v" and wait_done(client, r.json()["id"])[-1]["status"] == "completed"


def test_video_edit_job(served):
    client, _ = served
    r = client.post("/v1/videos", data={"prompt": "make it snow", "steps": "1", "preset": "video_192p"},
                    files={"video": ("clip.gif", H.gif_bytes(5), "image/gif")})
    assert r.status_code == 200, r.text
    assert r.json()["task"] == "video_edit"
    assert wait_done(client, r.json()["id"])[-1]["status"] == "completed"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "num_frames": 6}, "num_frames"),
    ({"prompt": "x", "num_frames": 125}, "num_frames"),
    ({"prompt": "x", "seconds": "soon"}, "seconds"),
    ({"prompt": "x", "seconds": -2}, "seconds"),
    ({"prompt": "x", "seconds": "12"}, "seconds"),  # OpenAI's longest: 145 frames at 12 fps, above 121
    ({"prompt": "x", "fps": 0}, "fps"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "size": "33x32"}, "size"),
    ({"prompt": "x", "input_reference": "data:image/png;base64,!!"}, "input_reference"),
    ({"prompt": "x", "num_frames": 1, "input_reference": H.data_url(H.png_bytes())}, "num_frames"),
    ({"prompt": "x", "video": H.data_url(b"not a video", "video/mp4")}, "video"),
    ({"prompt": "x", "video": H.data_url(H.gif_bytes(), "image/gif"),
      "input_reference": H.data_url(H.png_bytes())}, "video"),
    ({"prompt": "x", "image_guidance_scale": 2}, "image_guidance_scale"),
])
def test_video_errors(served, body, param):
    client, _ = served
    assert error_of(client.post("/v1/videos", json={"steps": 1, **body}))["param"] == param


def test_text_over_the_token_limit_is_refused_before_queueing(served):
    """Counted with the checkpoint's tokenizer in the request, so a video job is a 400, never a queued failure."""
    client, _ = served
    before = len(client.get("/v1/videos").json()["data"])
    long = "fox " * 5000  # ~5000 tokens, over the 4096-token limit
    err = error_of(client.post("/v1/videos", json={"prompt": long, "size": "32x32", "num_frames": 5, "steps": 1}))
    assert err["param"] == "prompt" and "4096 tokens" in err["message"]
    err = error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": long}, {"type": "image_url", "image_url": {"url": H.data_url(H.png_bytes())}}]}]}))
    assert err["param"] == "messages" and "4096 tokens" in err["message"]
    assert len(client.get("/v1/videos").json()["data"]) == before  # nothing was queued


def test_jobs_route_and_not_found(served):
    client, _ = served
    r = client.post("/v1/jobs", data={"task": "t2i", "prompt": "a cup", "size": "32x32", "steps": "1"})
    assert r.status_code == 200 and r.json()["object"] == "image"
    assert wait_done(client, r.json()["id"])[-1]["job"]["outputs"] == [f"/v1/jobs/{r.json()['id']}/content?index=0"]
    assert error_of(client.post("/v1/jobs", json={"task": "t2x", "prompt": "a"}))["param"] == "task"
    assert error_of(client.post("/v1/jobs", json={"prompt": "a"}))["param"] == "task"
    assert error_of(client.post("/v1/jobs", json={"task": "i2v", "prompt": "a"}))["param"] == "input_reference"
    for path in ("/v1/jobs/nope", "/v1/videos/nope", "/v1/jobs/nope/events", "/v1/videos/nope/content"):
        assert error_of(client.get(path), 404)["code"] == "not_found"
    assert error_of(client.post("/v1/jobs/nope/cancel"), 404)["code"] == "not_found"
    assert error_of(client.delete("/v1/videos/nope"), 404)["code"] == "not_found"
    assert error_of(client.get(f"/v1/jobs/{r.json()['id']}/content?index=3"), 404)["param"] == "index"
    img = client.get(f"/v1/jobs/{r.json()['id']}").json()
    assert error_of(client.get(f"/v1/videos/{img['id']}"), 404)["code"] == "not_found"  # an image is no video
    replay = H.sse_json(client.get(f"/v1/jobs/{img['id']}/events").text)  # a finished job replays its end
    assert [f["type"] for f in replay] == ["done"] and replay[0]["job"]["status"] == "completed"
    page = client.get("/v1/jobs?limit=1").json()
    assert len(page["data"]) == 1 and page["has_more"] is True
    nxt = client.get(f"/v1/jobs?limit=1&after={page['last_id']}").json()
    assert nxt["data"][0]["id"] != page["data"][0]["id"]


def test_cancel_running_and_queued_jobs(served):
    client, cfg = served
    running = client.post("/v1/videos", json={**LONG, "num_frames": 5}).json()
    queued = client.post("/v1/jobs", json={"task": "t2i", **LONG}).json()
    with client.stream("GET", f"/v1/jobs/{running['id']}/events") as events:
        lines = events.iter_lines()
        for line in lines:  # wait for the first denoising step: the job is mid-run
            if line.startswith("data:") and json.loads(line[5:])["type"] == "step":
                break
        assert client.get("/health").json()["running"] == running["id"]
        assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 1
        c = client.post(f"/v1/jobs/{queued['id']}/cancel").json()
        assert c["status"] == "cancelled"  # a queued job ends at once
        c = client.post(f"/v1/jobs/{running['id']}/cancel").json()
        assert c["cancel_requested"] is True
        rest = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert rest[-1]["type"] == "done" and rest[-1]["status"] == "cancelled"
    assert rest[-1]["progress"] < 95 and "decode" not in [e["type"] for e in rest]
    got = client.get(f"/v1/videos/{running['id']}").json()
    assert got["status"] == "cancelled" and got["outputs"] == []
    assert not [p for p in cfg.outputs.iterdir() if running["id"] in p.name or ".partial" in p.name]
    assert error_of(client.post(f"/v1/jobs/{running['id']}/cancel"), 409)["code"] == "not_cancellable"
    assert client.get("/health").json()["running"] is None


def test_full_queue_answers_429(served):
    client, _ = served
    first = client.post("/v1/jobs", json={"task": "t2i", **LONG}).json()
    for _ in range(50):  # until the worker has taken it, so the queue holds only what follows
        if client.get("/health").json()["running"] == first["id"]:
            break
        time.sleep(0.02)
    waiting = [client.post("/v1/jobs", json={"task": "t2i", **LONG}).json() for _ in range(2)]
    r = client.post("/v1/images/generations", json={**H.FAST, "prompt": "one more"})
    err = error_of(r, 429)
    assert err["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    for job in [first, *waiting]:
        client.post(f"/v1/jobs/{job['id']}/cancel")
    assert wait_done(client, first["id"])[-1]["status"] == "cancelled"
    assert client.post("/v1/images/generations", json={**H.FAST, "prompt": "room again"}).status_code == 200


def test_api_key(upstream_root, tmp_path):
    client, _ = make_client(upstream_root, tmp_path / "keyed", api_key="s3cret")
    with client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert error_of(client.get("/v1/models", headers=headers), 401)["code"] == "invalid_api_key"
            assert client.post("/v1/images/generations", json={**H.FAST, "prompt": "x"},
                               headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.post("/v1/images/generations", json={**H.FAST, "prompt": "x"}, headers=ok).status_code == 200


def test_body_size_limit(upstream_root, tmp_path):
    client, _ = make_client(upstream_root, tmp_path / "small", max_body_bytes=4096)
    with client:
        err = error_of(client.post("/v1/images/edits", data={"prompt": "x"},
                                   files={"image": ("a.png", b"\0" * 10000, "image/png")}), 413)
        assert err["code"] == "too_large"

        def chunks():  # no Content-Length: the limit holds while the body streams in
            for _ in range(10):
                yield b" " * 1000
        assert error_of(client.post("/v1/images/generations", content=chunks(),
                                    headers={"content-type": "application/json"}), 413)["code"] == "too_large"


def test_history_survives_restart(upstream_root, tmp_path):
    out = tmp_path / "restart"
    client, _ = make_client(upstream_root, out)
    with client:
        done = client.post("/v1/images/generations", json={**H.FAST, "prompt": "kept", "response_format": "url"})
        url = done.json()["data"][0]["url"]
    client, _ = make_client(upstream_root, out)
    with client:
        jobs = client.get("/v1/jobs").json()["data"]
        assert [(j["prompt"], j["status"]) for j in jobs] == [("kept", "completed")]
        assert jobs[0]["settings"]["size"] == "32x32" and jobs[0]["settings"]["steps"] == 1
        assert client.get(url).status_code == 200


def test_stopping_the_server_fails_its_unfinished_jobs(upstream_root, tmp_path):
    out = tmp_path / "stopped"
    client, _ = make_client(upstream_root, out, max_steps=1000)
    with client:
        running = client.post("/v1/jobs", json={"task": "t2i", **LONG}).json()
        queued = client.post("/v1/jobs", json={"task": "t2i", **LONG}).json()
        for _ in range(200):
            if client.get("/health").json()["running"] == running["id"]:
                break
            time.sleep(0.02)
    client, _ = make_client(upstream_root, out)
    with client:  # a clean shutdown: both jobs end failed with the reason, not left "in progress"
        for job in (running, queued):
            got = client.get(f"/v1/jobs/{job['id']}").json()
            assert got["status"] == "failed" and got["error"]["code"] == "server_stopped", got


def test_full_disk_is_refused_before_the_work(served, monkeypatch):
    import shutil
    from collections import namedtuple

    client, cfg = served
    before = set(cfg.outputs.iterdir())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 100))
    r = client.post("/v1/images/generations", json={"prompt": "no room", **H.FAST})
    err = error_of(r, 507)
    assert err["code"] == "output_error" and "not enough space" in err["message"]
    assert set(cfg.outputs.iterdir()) == before
    job = client.get("/v1/jobs?limit=1").json()["data"][0]
    assert job["status"] == "failed" and job["error"]["code"] == "output_error"


def test_a_waiting_event_stream_sends_keep_alives(served, monkeypatch):
    import lance_mlx.server.app as server_app

    client, _ = served
    monkeypatch.setattr(server_app, "HEARTBEAT_S", 0.1)
    running = client.post("/v1/jobs", json={"task": "t2i", **LONG}).json()
    queued = client.post("/v1/jobs", json={"task": "t2i", **LONG}).json()
    comments = 0
    with client.stream("GET", f"/v1/jobs/{queued['id']}/events") as events:
        for line in events.iter_lines():
            comments += line.startswith(":")
            if comments == 2:
                break
    for job in (queued, running):
        client.post(f"/v1/jobs/{job['id']}/cancel")
    assert wait_done(client, running["id"])[-1]["status"] == "cancelled"

"""serve.py as a real uvicorn process on 127.0.0.1: every route once over HTTP, 50 concurrent requests against
--max-queue 8, /health latency while jobs run, and a killed server's running job marked failed on restart."""

import asyncio
import json
import statistics
import time

import httpx
import pytest

import server_helpers as H

HEALTH_LIMIT_S = 0.1  # /health must answer within 100 ms while a job runs


@pytest.fixture(scope="module")
def server(upstream_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("process")
    proc, base = H.start_server(upstream_root, out, "--max-queue", "8", "--max-steps", "1000")
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            yield client, out
    finally:
        H.stop_server(proc)


def test_every_route_over_http(server):
    client, out = server
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert client.get("/static/app.js").status_code == 200
    assert len(client.get("/v1/models").json()["data"]) == 2
    assert "16:9" in client.get("/v1/presets").json()["aspect_ratios"]
    r = client.post("/v1/images/generations", json={"prompt": "a boat", **H.FAST})
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    r = client.post("/v1/images/edits", data={"prompt": "make it green", "steps": "1", "preset": "image_256res"},
                    files={"image": ("a.png", H.png_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": H.data_url(
        H.png_bytes())}}]}], "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as s:
        frames = H.parse_sse("".join(s.iter_text()))
    assert frames[-1][1] == "[DONE]" and json.loads(frames[1][1])["choices"][0]["delta"]["content"]
    assert client.post("/v1/chat/completions", json={**body, "stream": False}).json()["usage"]["completion_tokens"] == 3

    video = client.post("/v1/videos", json={"prompt": "rain", "size": "32x32", "num_frames": 5, "steps": 2}).json()
    with client.stream("GET", f"/v1/jobs/{video['id']}/events") as s:
        events = [e for _, e in H.parse_sse("".join(s.iter_text()))]
    assert json.loads(events[-1])["status"] == "completed"
    assert client.get(f"/v1/videos/{video['id']}").json()["status"] == "completed"
    assert video["id"] in [v["id"] for v in client.get("/v1/videos").json()["data"]]
    assert client.get(f"/v1/videos/{video['id']}/content").content[4:8] == b"ftyp"
    assert client.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True

    job = client.post("/v1/jobs", json={"task": "t2i", "prompt": "slow", "size": "32x32", "steps": 1000}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert json.loads(H.parse_sse("".join(s.iter_text()))[-1][1])["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert client.post("/v1/images/generations", json={"prompt": ""}).status_code == 400


async def _load(base: str, n: int):
    """n concurrent image requests while /health is polled; returns (responses, health latencies)."""
    latencies = []
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=n + 4)) as c:
        async def one(i):
            return await c.post("/v1/images/generations", json={"prompt": f"load {i}", "size": "32x32",
                                                                 "steps": 20, "seed": i})
        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        while not all(t.done() for t in tasks):
            t0 = time.perf_counter()
            assert (await c.get("/health")).status_code == 200
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)
        return [t.result() for t in tasks], latencies


def test_fifty_concurrent_requests_with_max_queue_8(server):
    client, _ = server
    base = str(client.base_url).rstrip("/")
    assert client.post("/v1/images/generations", json={"prompt": "warm", **H.FAST}).status_code == 200  # loaded
    responses, latencies = asyncio.run(_load(base, 50))
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(busy) == 50, [r.status_code for r in responses]
    print(f"50 requests: {len(ok)} answered, {len(busy)} got 429; /health median "
          f"{1e3 * statistics.median(latencies):.1f} ms, max {1e3 * max(latencies):.1f} ms")
    assert len(ok) >= 9 and busy  # the running job and a full queue at least; the bound was reached
    assert all(len(r.json()["data"]) == 1 and r.json()["data"][0]["b64_json"] for r in ok)
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full" for r in busy)
    history = client.get("/v1/jobs?limit=100").json()["data"]
    loaded = [j for j in history if (j["prompt"] or "").startswith("load ")]
    assert len(loaded) == len(ok) and all(j["status"] == "completed" for j in loaded)  # none lost, none extra
    assert sorted(j["prompt"] for j in loaded) == sorted(r.json()["data"][0]["revised_prompt"] for r in ok)
    latencies.sort()
    assert latencies[int(0.9 * len(latencies))] < HEALTH_LIMIT_S, latencies


def test_health_answers_fast_while_a_job_runs(server):
    client, _ = server
    job = client.post("/v1/jobs", json={"task": "t2i", "prompt": "busy", "size": "128x128", "steps": 1000}).json()
    try:
        deadline = time.monotonic() + 30
        while client.get("/health").json()["running"] != job["id"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        latencies = []
        for _ in range(40):
            t0 = time.perf_counter()
            health = client.get("/health").json()
            latencies.append(time.perf_counter() - t0)
            assert health["running"] == job["id"]
            time.sleep(0.02)
    finally:
        client.post(f"/v1/jobs/{job['id']}/cancel")
    latencies.sort()
    print(f"/health while denoising 128x128: median {1e3 * latencies[20]:.1f} ms, max {1e3 * latencies[-1]:.1f} ms")
    assert latencies[int(0.9 * len(latencies))] < HEALTH_LIMIT_S, latencies


def test_killed_server_marks_its_running_job_failed(upstream_root, tmp_path):
    out = tmp_path / "killed"
    proc, base = H.start_server(upstream_root, out)
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            kept = c.post("/v1/images/generations", json={"prompt": "before", **H.FAST, "response_format": "url"})
            job = c.post("/v1/videos", json={"prompt": "never finished", "size": "64x64", "num_frames": 9,
                                             "steps": 100}).json()
            deadline = time.monotonic() + 30
            while c.get(f"/v1/videos/{job['id']}").json()["progress"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        H.stop_server(proc, kill=True)  # SIGKILL: no shutdown code runs
    # what a write killed mid-way leaves (media.atomic_output's temporary name), and a file that is not ours
    partial = out / "outputs" / f".{job['id']}-0.k3j2.partial.mp4"
    partial.write_bytes(b"half a video")
    theirs = out / "outputs" / ".notes.partial.txt"
    theirs.write_text("mine")
    proc, base = H.start_server(upstream_root, out)
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            got = c.get(f"/v1/videos/{job['id']}").json()
            assert got["status"] == "failed" and got["error"]["code"] == "server_restarted"
            assert [v["id"] for v in c.get("/v1/videos").json()["data"]] == [job["id"]]
            url = kept.json()["data"][0]["url"]
            assert url.startswith("http://127.0.0.1:")  # absolute, as OpenAI's
            assert c.get(url[url.index("/v1/"):]).status_code == 200  # on the restarted server's port
            assert not partial.exists() and theirs.read_text() == "mine"
            assert not [p for p in (out / "outputs").iterdir() if job["id"] in p.name]
    finally:
        H.stop_server(proc)


def test_openai_client_works_unchanged(server):
    from openai import OpenAI

    client, _ = server
    oa = OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
    img = oa.images.generate(model="Lance_3B", prompt="a fox", size="32x32", n=2, extra_body={"steps": 1})
    assert len(img.data) == 2 and img.data[0].b64_json and img.data[0].revised_prompt == "a fox"
    url = H.data_url(H.png_bytes())
    content = [{"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": url}}]
    answer = oa.chat.completions.create(model="Lance_3B", max_tokens=3, messages=[{"role": "user", "content": content}])
    assert answer.choices[0].message.content and answer.usage.completion_tokens == 3
    pieces = [c.choices[0].delta.content for c in oa.chat.completions.create(
        model="Lance_3B", max_tokens=3, stream=True, messages=[{"role": "user", "content": content}]) if c.choices]
    assert "".join(p or "" for p in pieces) == answer.choices[0].message.content
    video = oa.videos.create(prompt="waves", size="32x32", seconds="1", extra_body={"steps": 1})
    assert video.status in ("queued", "in_progress") and video.object == "video"
    deadline = time.monotonic() + 60
    while (video := oa.videos.retrieve(video.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert video.status == "completed" and video.progress == 100
    assert oa.videos.download_content(video.id).read()[4:8] == b"ftyp"
    assert video.id in [v.id for v in oa.videos.list()]
    assert oa.videos.delete(video.id).deleted is True


def test_a_client_that_gives_up_cancels_its_job(server):
    client, _ = server
    with pytest.raises(httpx.ReadTimeout):  # the client stops waiting and closes its connection
        client.post("/v1/images/generations", json={"prompt": "abandoned", "size": "32x32", "steps": 1000},
                    timeout=1.5)
    job = client.get("/v1/jobs?limit=1").json()["data"][0]
    assert job["prompt"] == "abandoned"
    deadline = time.monotonic() + 10
    while (job := client.get(f"/v1/jobs/{job['id']}").json())["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job["status"] == "cancelled" and job["outputs"] == []

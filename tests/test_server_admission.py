"""Admission by memory (server/admission.py) and the bounded decoding of uploads (app.parse): a request inside the
count limits that cannot fit the memory budget is a 400 naming what fits; uploads decode two at a time while
/health keeps answering; the largest request each route allows completes or is refused, and the server stays up."""

import re
import threading
import time

import pytest

import server_helpers as H
from lance_mlx.cmd_serve import build_config, parse_args
from lance_mlx.errors import InvalidRequestError
from lance_mlx.server import app as app_module
from lance_mlx.server import inputs
from lance_mlx.server.admission import Admission
from lance_mlx.server.fields import ApiError
from lance_mlx.server.settings import ServerConfig
from lance_mlx.tasks import ImageToVideo, TextToVideo

MIB, GIB = 2**20, 2**30
# The tiny checkpoints' estimates: ~87 MiB for a 32x32 job, ~90 MiB to describe a 1024² image, ~129 MiB for a 768²
# edit, ~130 MiB to describe a video, ~155 MiB for a 1024² image, ~2.2 GiB for 1024² x 121.
BUDGET = 125 * MIB
SUGGESTION = re.compile(r"(num_frames|size|resolution) (\S+) would fit")


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    for client, _ in H.running_client(upstream_root, tmp_path_factory.mktemp("admission"), max_memory=BUDGET):
        yield client


def admission(client) -> Admission:
    return client.app.state.server["admission"]


def refusal(r):
    err = H.error_of(r, 400)
    assert err["code"] == "insufficient_memory" and "budget is 0.1 GiB (--max-memory)" in err["message"], err
    return err


def test_a_1024_square_121_frame_video_is_refused_with_what_fits(served):
    r = served.post("/v1/videos", json={"prompt": "waves", "size": "1024x1024", "num_frames": 121, "steps": 1})
    err = refusal(r)
    assert "needs about 2.2 GiB" in err["message"], err
    field, value = SUGGESTION.search(err["message"]).groups()
    assert err["param"] == field
    if field == "size":
        w, h = map(int, value.split("x"))
        fits, bigger = TextToVideo("waves", 121, w, h), TextToVideo("waves", 121, w + 64, h + 64)
    else:
        n = int(value)
        fits, bigger = TextToVideo("waves", n, 1024, 1024), TextToVideo("waves", n + 4, 1024, 1024)
    peak = admission(served).peak
    assert peak(fits, "video") <= BUDGET < peak(bigger, "video")  # the largest that fits, near enough
    assert served.get("/health").json()["status"] == "ok"


def test_a_large_image_to_video_is_refused_and_one_that_fits_runs(served):
    body = {"prompt": "waves", "input_reference": H.data_url(H.png_bytes(size=(640, 640))), "steps": 1}
    err = refusal(served.post("/v1/videos", json=body))  # the defaults: 49 frames at resolution 640
    field, value = SUGGESTION.search(err["message"]).groups()
    assert err["param"] == field and field in ("num_frames", "resolution")
    image = inputs.image(inputs.Media(H.png_bytes(size=(640, 640))), "input_reference")
    fits = ImageToVideo("waves", image, int(value), 640) if field == "num_frames" else ImageToVideo(
        "waves", image, 5, int(value))
    assert admission(served).peak(fits, "video") <= BUDGET
    small = {"prompt": "waves", "input_reference": H.data_url(H.png_bytes()), "resolution": 32, "num_frames": 5,
             "steps": 1}
    r = served.post("/v1/videos", json=small)
    assert r.status_code == 200, r.text
    assert H.wait_done(served, r.json()["id"])[-1]["status"] == "completed"


def test_health_reports_the_budget(served):
    memory = served.get("/health").json()["memory"]
    assert memory["budget_bytes"] == BUDGET and memory["source"] == "--max-memory"
    assert 0 < memory["weights_bytes"]["image"] < BUDGET


def test_the_full_size_model_is_judged_by_its_own_weights():
    """A hub id not on disk is estimated as the full-size model: a 1024² x 121 video and a default image-to-video
    against a 24 GiB budget."""
    adm = Admission(ServerConfig(model="no-such-owner/no-such-repo", max_memory=24 * GIB))
    with pytest.raises(ApiError) as e:
        adm.check(TextToVideo("waves", 121, 1024, 1024))
    assert e.value.status == 400 and e.value.param in ("num_frames", "size"), e.value.message
    need = float(re.search(r"needs about ([0-9.]+) GiB", e.value.message)[1])
    assert need > 24 and SUGGESTION.search(e.value.message), e.value.message
    assert adm.check(TextToVideo("waves", 5, 256, 256)) <= 24 * GIB
    image = inputs.image(inputs.Media(H.png_bytes(size=(640, 640))), "input_reference")
    i2v = ImageToVideo("waves", image, 49, 640)
    tight = Admission(ServerConfig(model="no-such-owner/no-such-repo", max_memory=adm.peak(i2v, "video") - MIB))
    with pytest.raises(ApiError) as e:
        tight.check(i2v)
    assert e.value.param in ("num_frames", "resolution") and SUGGESTION.search(e.value.message), e.value.message


def test_max_memory_flag():
    assert build_config(parse_args(["--max-memory", "24G"])).max_memory == 24 * GIB
    assert build_config(parse_args([])).max_memory is None
    for bad in ("lots", "1.2.3G", "0"):
        with pytest.raises(InvalidRequestError) as e:
            build_config(parse_args(["--max-memory", bad]))
        assert e.value.param == "max_memory"


# --------------------------------------------------------------------------------------------------- decoding
def chat_with_image():
    return ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": H.data_url(H.png_bytes(size=(512, 512)))}}]}], "max_tokens": 1}})


def video_upload():
    """A video edit as a multipart upload: decoded, then refused by the budget (a 480p edit does not fit)."""
    return ("/v1/videos", {"data": {"prompt": "make it blue", "steps": "1"},
                           "files": {"video": ("clip.gif", H.gif_bytes(25, (256, 256)), "image/gif")}})


def slow_decoder(monkeypatch, seconds):
    """Wrap the image and video decoders with a delay and count how many run at once."""
    seen = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slowed(original):
        def slow(*args):
            with lock:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            try:
                time.sleep(seconds)
                return original(*args)
            finally:
                with lock:
                    seen["now"] -= 1
        return slow

    monkeypatch.setattr(inputs, "_read", slowed(inputs._read))
    monkeypatch.setattr(inputs, "image", slowed(inputs.image))
    return seen


def post_all(client, requests):
    results = [None] * len(requests)

    def post(i):
        route, kwargs = requests[i]
        results[i] = client.post(route, **kwargs)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    return threads, results


def test_uploads_decode_two_at_a_time_while_health_answers(served, monkeypatch):
    seen = slow_decoder(monkeypatch, 0.5)
    threads, results = post_all(served, [chat_with_image(), video_upload(), chat_with_image(), video_upload()])
    waits = []
    while any(t.is_alive() for t in threads):
        start = time.monotonic()
        assert served.get("/health").status_code == 200
        waits.append(time.monotonic() - start)
        time.sleep(0.05)
    assert [r.status_code for r in results] == [200, 400, 200, 400], [r.text[:200] for r in results]
    assert all(refusal(r) for r in results[1::2])  # refused after decoding: the frames decide the size
    assert seen["most"] == app_module.MEDIA_WORKERS, seen
    assert len(waits) >= 5 and max(waits) < 1.0, waits


def test_a_full_decoding_pool_answers_429_after_its_wait(served, monkeypatch):
    slow_decoder(monkeypatch, 1.5)
    monkeypatch.setattr(app_module, "MEDIA_WAIT_S", 0.3)
    threads, results = post_all(served, [chat_with_image() for _ in range(3)])
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 429], [r.text[:200] for r in results]
    busy = next(r for r in results if r.status_code == 429)
    assert busy.json()["error"]["code"] == "decoders_busy" and busy.headers["retry-after"]
    assert served.post("/v1/images/generations", json={"prompt": "still fine", **H.FAST}).status_code == 200


# ------------------------------------------------------------------------------------- largest allowed requests
def largest_allowed():
    """(route, request kwargs) of the largest request the default count limits allow, per route and task."""
    big_png = H.data_url(H.png_bytes(size=(1024, 1024)))
    return [
        ("/v1/images/generations", {"json": {"prompt": "x", "size": "1024x1024", "n": 4, "steps": 100}}),
        ("/v1/jobs", {"json": {"task": "t2i", "prompt": "x", "size": "1024x1024", "n": 4, "steps": 100}}),
        ("/v1/videos", {"json": {"prompt": "x", "size": "1024x1024", "num_frames": 121, "steps": 100}}),
        ("/v1/videos", {"json": {"prompt": "x", "input_reference": big_png, "resolution": 1024,
                                 "num_frames": 121, "steps": 100}}),
        ("/v1/videos", {"json": {"prompt": "x", "video": H.data_url(H.gif_bytes(25, (256, 256)), "image/gif"),
                                 "preset": "video_480p", "steps": 100}}),
        ("/v1/images/edits", {"data": {"prompt": "x", "preset": "image_768res", "n": "4", "steps": "100"},
                              "files": {"image": ("a.png", H.png_bytes(size=(1024, 1024)), "image/png")}}),
        ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": big_png}}]}],
            "max_tokens": 2}}),
    ]


def test_the_largest_allowed_requests_complete_or_are_refused(served):
    for route, kwargs in largest_allowed():
        r = served.post(route, **kwargs)
        if r.status_code == 400:
            refusal(r)
        else:
            assert r.status_code == 200, (route, r.text[:300])
            job = r.json().get("id")
            if route in ("/v1/videos", "/v1/jobs"):
                assert H.wait_done(served, job)[-1]["status"] == "completed", route
        health = served.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok", (route, health.text)
    assert served.app.state.server["engine"]._thread.is_alive()

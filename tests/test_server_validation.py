"""Bad bodies are 400s before anything is queued, and their errors name the field without leaking the machine; token
counting runs off the event loop and counts every text of a chat."""

import json
import threading
import time

import pytest
from test_server import chat_body

import server_helpers as H
from server_helpers import error_of

VIDEO = {"prompt": "waves", "size": "32x32", "num_frames": 5, "steps": 1}


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("validation"), allow_local_files=True)


def jobs_count(client):
    return len(client.get("/v1/jobs?limit=100").json()["data"])


def refused(client, route, status=400, **kwargs):
    before = jobs_count(client)
    err = error_of(client.post(route, **kwargs), status)
    assert jobs_count(client) == before  # nothing was queued
    assert client.get("/health").status_code == 200
    return err


def raw(body: str) -> dict:
    return {"content": body.encode("utf-8", "surrogatepass"), "headers": {"content-type": "application/json"}}


@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/videos", "/v1/jobs", "/v1/chat/completions",
                                   "/v1/images/edits"])
def test_lone_surrogates_and_control_characters(served, route):
    client, _ = served
    assert refused(client, route, **raw('{"\\ud800": 1, "prompt": "x"}'))["message"]
    err = refused(client, route, **raw('{"prompt": "a\\udfffb", "size": "32x32"}'))
    assert "U+DFFF" in err["message"] and err["param"] == "prompt"
    err = refused(client, route, **raw('{"prompt": "nul\\u0000here", "size": "32x32"}'))
    assert "U+0000" in err["message"] and err["param"] == "prompt"


def test_nul_in_a_video_prompt_and_nested_texts(served):
    client, _ = served
    assert refused(client, "/v1/videos", json={**VIDEO, "prompt": "a\x00b"})["param"] == "prompt"
    body = chat_body()
    body["messages"][0]["content"] = "be\x1bbrief"
    assert refused(client, "/v1/chat/completions", json=body)["param"] == "messages"
    r = client.post("/v1/videos", json={**VIDEO, "prompt": "tabs\tand\nnewlines are fine"})
    assert r.status_code == 200, r.text
    H.wait_done(client, r.json()["id"])


@pytest.mark.parametrize("size", ["²x²", "３２x３２", "1_6x16", "32 x", "x32", "-32x32", "32x32x32", "٣٢x٣٢"])
def test_sizes_in_ascii_digits_only(served, size):
    client, _ = served
    assert refused(client, "/v1/images/generations", json={**H.FAST, "prompt": "x", "size": size})["param"] == "size"


@pytest.mark.parametrize("field,value", [("steps", "1_0"), ("steps", "²"), ("seed", "١"), ("n", "１"),
                                         ("seconds", "1_0"), ("fps", "1_2"), ("guidance_scale", "4_0.0")])
def test_form_numbers_in_ascii_digits_only(served, field, value):
    client, _ = served
    err = refused(client, "/v1/videos", data={"prompt": "x", "num_frames": "5", "size": "32x32", field: value})
    assert err["param"] == field


@pytest.mark.parametrize("fps", [1e-9, 0.001, 0.5])
def test_tiny_fps(served, fps):
    client, _ = served
    assert refused(client, "/v1/videos", json={**VIDEO, "fps": fps})["param"] == "fps"


def test_i2v_resolution_and_aspect(served):
    """An extreme aspect at a large area takes upstream's bucket (no side limit upstream: positions wrap at 64
    latents, tasks.check_latent_grid), parsed before queueing with its size known; a resolution past the bucket
    areas (1024, tasks.MAX_RESOLUTION) is refused naming `resolution`."""
    from lance_mlx.server import schemas
    from lance_mlx.server.fields import Fields

    client, cfg = served
    wide = H.data_url(H.png_bytes(size=(400, 100)))
    parsed = schemas.video_job(Fields({**VIDEO, "size": None, "input_reference": wide, "resolution": 1000}), {}, cfg)
    assert parsed.request.task == "i2v" and parsed.settings["size"] == "1536x656"
    err = refused(client, "/v1/videos", json={**VIDEO, "size": None, "input_reference": wide, "resolution": 1100})
    assert err["param"] == "resolution" and "1024" in err["message"]
    square = H.data_url(H.png_bytes(size=(64, 64)))  # a square input at a small area runs
    r = client.post("/v1/videos", json={"prompt": "x", "num_frames": 5, "steps": 1, "input_reference": square,
                                        "resolution": 32})
    assert r.status_code == 200 and r.json()["size"] == "32x32"


def test_edit_of_an_extreme_aspect_at_a_large_preset(served):
    """An 8:1 input at image_768res takes the widest of upstream's input buckets, 21:9, with its size known before
    queueing (it used to be refused for a side past 1024, a limit upstream does not have)."""
    from lance_mlx.server import schemas
    from lance_mlx.server.fields import Fields

    _, cfg = served
    image = H.data_url(H.png_bytes(size=(800, 100)))
    parsed = schemas.image_edit(Fields({"prompt": "x", "preset": "image_768res", "image": image}), {}, cfg)
    w, h = (int(v) for v in parsed.settings["size"].split("x"))
    assert parsed.request.task == "image_edit" and w > 1024 and 2.2 < w / h < 2.5


def test_errors_do_not_echo_huge_values_or_leak_paths(served, tmp_path):
    client, _ = served
    big = "Q" * 2_000_000
    r = client.post("/v1/images/generations", json={**H.FAST, "prompt": "x", "size": big})
    err = error_of(r)
    assert len(r.content) < 2000 and err["param"] == "size" and "Q" * 201 not in err["message"]
    r = client.post("/v1/images/generations", json={**H.FAST, "prompt": "x", big: 1})
    assert len(r.content) < 2000
    missing = tmp_path / "deep" / "folder" / "nothing.png"
    err = error_of(client.post("/v1/videos", json={**VIDEO, "input_reference": str(missing)}))
    assert str(tmp_path) not in err["message"] and "nothing.png" in err["message"]
    r = client.post("/v1/videos", json={**VIDEO, "steps": {"a": 1}})
    assert "0x" not in r.text


def test_error_messages_are_redacted():
    from lance_mlx.server.redact import redact

    m = redact("cannot read /home/someone/secret/photo.png: <PIL.Image object at 0x7f3a2b4c5d60> " + "z" * 5000)
    assert "/home" not in m and "photo.png" in m and "0x7f3a" not in m and len(m) < 400
    assert redact("bad \ud800 text").encode("utf-8")
    assert redact("use data:image/png;base64,... or 1/2 of WIDTHxHEIGHT") == \
        "use data:image/png;base64,... or 1/2 of WIDTHxHEIGHT"


def test_a_long_system_message_counts(served):
    client, _ = served
    body = chat_body()
    body["messages"][0]["content"] = "lighthouse " * 4500  # the question itself is short
    err = refused(client, "/v1/chat/completions", json=body)
    assert err["param"] == "messages" and "tokens" in err["message"]
    body = chat_body()  # many short texts over several messages, assistant ones included, add up
    body["messages"][1:1] = [{"role": "assistant", "content": "lighthouse " * 1500},
                             {"role": "user", "content": "lighthouse " * 1500},
                             {"role": "assistant", "content": [{"type": "text", "text": "lighthouse " * 1500}]}]
    assert refused(client, "/v1/chat/completions", json=body)["param"] == "messages"


def test_token_counting_does_not_stall_the_event_loop(served):
    client, _ = served
    engine = client.app.state.server["engine"]
    real = engine._tokenizers["image"]

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    engine._tokenizers["image"] = slow
    try:
        worker = threading.Thread(target=lambda: client.post("/v1/images/generations",
                                                             json={**H.FAST, "prompt": "slow to count"}))
        worker.start()
        time.sleep(0.3)
        t0 = time.perf_counter()
        assert client.get("/health").status_code == 200
        elapsed = time.perf_counter() - t0
        worker.join()
    finally:
        engine._tokenizers["image"] = real
    assert elapsed < 0.5, f"/health took {elapsed:.2f} s while a prompt was counted"


def test_json_keys_in_every_route_are_checked(served):
    client, _ = served
    for route in ("/v1/images/generations", "/v1/videos", "/v1/chat/completions"):
        body = json.dumps({"prompt": "x", "k\u0007": 1})
        assert refused(client, route, content=body, headers={"content-type": "application/json"})

"""Responses parse strictly with the openai SDK's own models; vLLM-Omni's and OpenAI's optional request fields are
taken; stop and output_format are honoured."""

import base64
import json
import re

import pytest
from openai.types import ImagesResponse, Video, VideoDeleteResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from test_server import chat_body

import server_helpers as H
from lance_mlx.video_input import read_video
from server_helpers import error_of

VIDEO = {"prompt": "waves", "size": "32x32", "num_frames": 5, "steps": 1}


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("conformance"))


def strict(model, obj, **replace):
    """Validate `obj` strictly with the SDK's model, after checking it has every field the model declares.
    `replace` swaps values the SDK types as a closed list of OpenAI's own (sizes of its hosted models)."""
    missing = set(model.model_fields) - set(obj)
    optional_ok = {  # hosted-service extras a local server has no value for
        "background", "quality", "usage", "svg_usage", "safety_identifier", "system_fingerprint", "service_tier",
        "prompt", "metadata", "moderation", "obfuscation"}
    assert not missing - optional_ok, f"{model.__name__} lacks {sorted(missing - optional_ok)}"
    return model.model_validate({**obj, **replace}, strict=True)


def check_video(obj):
    assert re.fullmatch(r"[0-9]+x[0-9]+", obj["size"]), obj["size"]
    assert re.fullmatch(r"[1-9][0-9]*", obj["seconds"]), obj["seconds"]  # vLLM-Omni's SecondStr too
    strict(Video, obj, size="1280x720")
    return obj


def test_video_objects_parse_strictly(served):
    client, cfg = served
    made = check_video(client.post("/v1/videos", json=VIDEO).json())
    assert made["expires_at"] is None and made["remixed_from_video_id"] is None and made["size"] == "32x32"
    H.wait_done(client, made["id"])
    done = check_video(client.get(f"/v1/videos/{made['id']}").json())
    assert done["status"] == "completed" and done["seconds"] == "1"  # 5 frames at 12 fps: rounded up to 1 s
    i2v = check_video(client.post("/v1/videos", json={"prompt": "go", "num_frames": 5, "steps": 1, "resolution": 32,
                                                      "input_reference": H.data_url(H.png_bytes())}).json())
    assert i2v["size"] == "48x32"  # known before the run: the 40x32 input's bucket
    edit = check_video(client.post("/v1/videos", json={"prompt": "bluer", "steps": 1, "preset": "video_192p",
                                                       "video": H.data_url(H.gif_bytes(), "image/gif")}).json())
    assert re.fullmatch(r"[0-9]+x[0-9]+", edit["size"])
    for job in (i2v, edit):  # the size announced is the size made
        H.wait_done(client, job["id"])
        frames, _ = read_video(cfg.outputs / client.get(f"/v1/jobs/{job['id']}").json()["settings"].get(
            "file", f"{job['id']}-0.mp4"))
        assert f"{frames.shape[2]}x{frames.shape[1]}" == job["size"]
    for listed in client.get("/v1/videos").json()["data"]:
        check_video(listed)
    strict(VideoDeleteResponse, client.delete(f"/v1/videos/{made['id']}").json())


def test_image_and_chat_responses_parse_strictly(served):
    client, _ = served
    body = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST, "response_format": "url"}).json()
    strict(ImagesResponse, body)
    body = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}).json()
    strict(ImagesResponse, body)
    strict(ChatCompletion, client.post("/v1/chat/completions", json=chat_body()).json())
    r = client.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    chunks = [json.loads(d) for _, d in H.parse_sse(r.text) if d != "[DONE]"]
    for chunk in chunks:
        strict(ChatCompletionChunk, chunk)


def test_vllm_omni_video_bodies(served):
    client, _ = served
    # vLLM-Omni's video fields, as its clients send them (form fields; width/height, num_inference_steps, ...)
    form = {"prompt": "a fox", "width": "32", "height": "48", "num_frames": "5", "fps": "8",
            "num_inference_steps": "1", "guidance_scale": "3.5", "seed": "7", "model": "Lance", "user": "me"}
    r = client.post("/v1/videos", data=form)
    assert r.status_code == 200, r.text
    job = check_video(r.json())
    assert job["size"] == "32x48" and job["settings"]["steps"] == 1 and job["settings"]["seed"] == 7
    assert job["settings"]["fps"] == 8 and job["settings"]["guidance_scale"] == 3.5
    assert H.wait_done(client, job["id"])[-1]["status"] == "completed"
    # JSON: size wins over width/height (vLLM-Omni's resolve_video_params); a video_params block; image_reference
    r = client.post("/v1/videos", json={"prompt": "x", "size": "32x32", "width": 64, "height": 64,
                                        "num_inference_steps": 1, "video_params": {"num_frames": 5, "fps": 12}})
    assert r.status_code == 200 and r.json()["size"] == "32x32" and r.json()["settings"]["num_frames"] == 5
    r = client.post("/v1/videos", json={"prompt": "x", "num_frames": 5, "num_inference_steps": 1, "resolution": 32,
                                        "image_reference": {"image_url": H.data_url(H.png_bytes())}})
    assert r.status_code == 200 and r.json()["task"] == "i2v", r.text
    assert error_of(client.post("/v1/videos", json={**VIDEO, "image_reference": {"file_id": "file_1"}}))["param"] \
        == "image_reference"
    assert error_of(client.post("/v1/videos", json={**VIDEO, "size": None, "width": 32}))["param"] == "width"


def test_chat_takes_common_openai_fields(served):
    client, _ = served
    extra = {"tools": None, "tool_choice": None, "response_format": None, "metadata": None, "store": False,
             "logit_bias": None, "parallel_tool_calls": None, "user": "u", "service_tier": None}
    assert client.post("/v1/chat/completions", json=chat_body(**extra)).status_code == 200
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = client.post("/v1/chat/completions", json=chat_body(tools=tools, metadata={"k": "v"},
                                                           response_format={"type": "text"}))
    assert r.status_code == 200, r.text
    err = error_of(client.post("/v1/chat/completions", json=chat_body(response_format={"type": "json_object"})))
    assert err["param"] == "response_format"
    assert error_of(client.post("/v1/chat/completions", json=chat_body(stop=[1])))["param"] == "stop"


def test_stop_ends_the_answer(served):
    client, _ = served
    full = client.post("/v1/chat/completions", json=chat_body(max_tokens=12, seed=1)).json()
    text = full["choices"][0]["message"]["content"]
    assert len(text) >= 4, text
    stop = text[2:4]
    want = text[:text.index(stop)]
    got = client.post("/v1/chat/completions", json=chat_body(max_tokens=12, seed=1, stop=stop)).json()
    assert got["choices"][0]["message"]["content"] == want
    assert got["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=12, seed=1, stop=["zzzz", stop], stream=True))
    chunks = [json.loads(d) for _, d in H.parse_sse(r.text) if d != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want


@pytest.mark.parametrize("fmt,magic,ctype", [("jpeg", b"\xff\xd8", "image/jpeg"), ("webp", b"RIFF", "image/webp"),
                                             ("png", b"\x89PNG", "image/png")])
def test_output_format(served, fmt, magic, ctype):
    client, _ = served
    body = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST, "output_format": fmt}).json()
    assert body["output_format"] == fmt and base64.b64decode(body["data"][0]["b64_json"])[:len(magic)] == magic
    url = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST, "output_format": fmt,
                                                      "response_format": "url"}).json()["data"][0]["url"]
    r = client.get(url)
    assert r.headers["content-type"] == ctype and r.content[:len(magic)] == magic
    assert error_of(client.post("/v1/images/generations", json={"prompt": "x", **H.FAST,
                                                                "output_format": "gif"}))["param"] == "output_format"

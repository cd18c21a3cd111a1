"""The server's negative_prompt and enhance_prompt fields: every generation route, the output's metadata, the job
history, OpenAI's revised_prompt, and errors naming their field."""

import base64
import io

import pytest
from openai_stub import ChatStub, closed_url
from PIL import Image

import server_helpers as H
from lance_mlx import enhance as E
from lance_mlx.tasks import MAX_PROMPT_TOKENS
from server_helpers import error_of, wait_done

REVISED = "A close-up shows a brass compass on an old map, warm lamp light."


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("steering"))


@pytest.fixture
def endpoint(monkeypatch):
    with ChatStub(REVISED) as stub:
        monkeypatch.setenv(E.ENV_BASE_URL, stub.url)
        monkeypatch.setenv(E.ENV_MODEL, "stub")
        yield stub


def png_text(body):
    return Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).text


def history(client, job_id):
    return client.get(f"/v1/jobs/{job_id}").json()


def test_negative_prompt_on_images(served):
    client, _ = served
    r = client.post("/v1/images/generations", json={"prompt": "a compass", **H.FAST, "negative_prompt": "rust"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert png_text(body)["negative_prompt"] == "rust" and body["data"][0]["revised_prompt"] == "a compass"
    listed = client.get("/v1/jobs").json()["data"][0]
    assert listed["settings"]["negative_prompt"] == "rust" and "revised_prompt" not in listed
    r = client.post("/v1/images/edits", data={"prompt": "make it pink", "steps": "1", "preset": "image_256res",
                                              "negative_prompt": "grey"},
                    files={"image": ("a.png", H.png_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert png_text(r.json())["negative_prompt"] == "grey"


@pytest.mark.parametrize("task,extra", [("t2v", {"size": "32x32"}), ("i2v", {"resolution": 32}),
                                        ("video_edit", {"preset": "video_192p"})])
def test_negative_prompt_on_videos(served, task, extra):
    client, _ = served
    body = {"task": task, "prompt": "go", "num_frames": 5, "steps": 1, "negative_prompt": "static", **extra}
    if task == "i2v":
        body["input_reference"] = H.data_url(H.png_bytes())
    if task == "video_edit":
        body["video"] = H.data_url(H.gif_bytes(5), "image/gif")
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 200, job.text
    assert wait_done(client, job.json()["id"])[-1]["status"] == "completed"
    assert history(client, job.json()["id"])["settings"]["negative_prompt"] == "static"


@pytest.mark.parametrize("value", [3, "fox " * (MAX_PROMPT_TOKENS + 10)])
def test_negative_prompt_errors_name_the_field(served, value):
    err = error_of(served[0].post("/v1/images/generations", json={"prompt": "a", **H.FAST, "negative_prompt": value}))
    assert err["param"] == "negative_prompt" and "negative prompt" in err["message"]


def test_enhanced_image_prompt(served, endpoint):
    client, _ = served
    r = client.post("/v1/images/generations", json={"prompt": "a compass", **H.FAST, "enhance_prompt": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["data"][0]["revised_prompt"] == REVISED and "a compass" in endpoint.last_text
    text = png_text(body)
    assert text["prompt"] == "a compass" and text["revised_prompt"] == REVISED
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["prompt"] == "a compass" and job["revised_prompt"] == REVISED
    assert job["settings"]["enhance_prompt"] is True and job["settings"]["revised_prompt"] == REVISED


def test_enhanced_video_prompt(served, endpoint):
    client, _ = served
    job = client.post("/v1/videos", json={"prompt": "waves", "size": "32x32", "num_frames": 5, "steps": 1,
                                          "enhance_prompt": True}).json()
    frames = wait_done(client, job["id"])
    assert {"type": "enhanced", "revised_prompt": REVISED} in [{k: f.get(k) for k in ("type", "revised_prompt")}
                                                              for f in frames]
    assert client.get(f"/v1/videos/{job['id']}").json()["revised_prompt"] == REVISED


def test_enhancement_failure_fails_the_job(served, monkeypatch):
    client, _ = served
    monkeypatch.setenv(E.ENV_BASE_URL, closed_url())
    monkeypatch.setenv(E.ENV_MODEL, "stub")
    err = error_of(client.post("/v1/images/generations", json={"prompt": "a", **H.FAST, "enhance_prompt": True}),
                   502)
    assert err["code"] == "enhance_error" and "cannot reach" in err["message"]


def test_edits_are_not_enhanced(served):
    r = served[0].post("/v1/images/edits", data={"prompt": "make it pink", "enhance_prompt": "true"},
                       files={"image": ("a.png", H.png_bytes(), "image/png")})
    assert error_of(r)["param"] == "enhance_prompt"

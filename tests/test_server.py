"""The server's routes through FastAPI's TestClient on the tiny checkpoints: success and error paths of each."""

import base64
import io
import json

import pytest
from PIL import Image

import server_helpers as H
from lance_mlx.errors import LanceError
from server_helpers import error_of, make_client

PROMPT = "a red kite over green hills"


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("served"), max_steps=1000, max_queue=4)


# ------------------------------------------------------------------------------------------------------ basics
def test_health_models_presets_and_page(served):
    client, cfg = served
    h = client.get("/health").json()
    assert h["status"] == "ok" and set(h) == {"status", "resident", "running", "queued", "memory"}
    assert h["memory"]["budget_bytes"] > 0 and h["memory"]["source"] in ("available at start",
                                                                          "LANCE_MLX_AVAILABLE_MEMORY")
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["checkpoint"]) for m in models["data"]] == [("Lance_3B", "image"), ("Lance_3B_Video", "video")]
    assert "t2v" in models["data"][1]["tasks"] and "t2i" in models["data"][0]["tasks"]
    p = client.get("/v1/presets").json()
    assert p["aspect_ratios"] == ["21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16"]  # upstream's app
    assert p["buckets"]["640"]["16:9"] == {"width": 848, "height": 480}  # upstream's video_480p 16:9 size
    assert p["buckets"]["768"]["3:2"] == {"width": 944, "height": 624}  # image_768res
    assert p["buckets"]["480"]["2:3"] == {"width": 352, "height": 528}  # video_360p
    page = client.get("/")
    assert page.status_code == 200 and "<title>lance-mlx</title>" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in client.get("/static/app.js").text.replace("https://", "")  # offline: no CDN
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/images/generations"), 405)["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------------------------------ images
def test_image_generation_b64_and_url(served):
    client, cfg = served
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, **H.FAST, "n": 2, "seed": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data", "output_format", "size"} and len(body["data"]) == 2
    assert body["output_format"] == "png" and body["size"] == "32x32"
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
    assert all(im.size == (32, 32) for im in images) and body["data"][0]["revised_prompt"] == PROMPT
    assert [im.text["seed"] for im in images] == ["5", "6"]  # n images: consecutive seeds
    assert images[0].text["software"] == "lance-mlx" and images[0].text["task"] == "t2i"
    assert images[0].tobytes() != images[1].tobytes()
    assert client.get("/v1/models").json()["data"][0]["resident"] is True

    r = client.post("/v1/images/generations", json={"prompt": PROMPT, **H.FAST, "response_format": "url"})
    url = r.json()["data"][0]["url"]
    assert url.startswith("http://localhost/v1/jobs/")
    png = client.get(url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (32, 32)

    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "steps": 1, "aspect_ratio": "21:9",
                                                   "resolution": 64})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (112, 48)


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "size": "31x32"}, "size"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "2048x2048"}, "size"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 1001}, "steps"),
    ({"prompt": "x", "steps": "two"}, "steps"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "guidance_scale": 1e9}, "guidance_scale"),
    ({"prompt": "x", "timestep_shift": 0}, "timestep_shift"),
    ({"prompt": "x", "cfg_interval": [0.9, 0.1]}, "cfg_interval"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "x", "aspect_ratio": "2:1", "size": "auto"}, "aspect_ratio"),
    ({"prompt": "x", "aspect_ratio": "1:1"}, "size"),
    ({"prompt": "x", "negative_prompt": 3}, "negative_prompt"),  # accepted as text (docs/steering.md)
])
def test_image_generation_errors(served, body, param):
    client, _ = served
    err = error_of(client.post("/v1/images/generations", json={**H.FAST, **body}))
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_image_generation_bad_bodies(served):
    client, _ = served
    assert "JSON" in error_of(client.post("/v1/images/generations", content=b"{nope"))["message"]
    assert "object" in error_of(client.post("/v1/images/generations", json=[1, 2]))["message"]
    assert error_of(client.post("/v1/images/generations", content=b"x", headers={"content-type": "text/plain"}),
                    415)["code"] == "unsupported_media_type"


def test_prompt_token_limit_is_a_400(served):
    client, _ = served
    err = error_of(client.post("/v1/images/generations", json={**H.FAST, "prompt": "lighthouse " * 4500}))
    assert "tokens" in err["message"] and err["param"] == "prompt"


def test_image_edit(served):
    client, _ = served
    r = client.post("/v1/images/edits", data={"prompt": "make it blue", "steps": "1", "preset": "image_256res",
                                              "seed": "3", "image_guidance_scale": "1.5"},
                    files={"image": ("in.png", H.png_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert out.text["instruction"] == "make it blue" and out.text["cfg_img"] == "1.5"
    assert out.size[0] > out.size[1]  # the 40x32 input's aspect, bucketed
    jobs = client.get("/v1/jobs").json()["data"]
    assert jobs[0]["task"] == "image_edit" and jobs[0]["settings"]["input"] == "in.png"


@pytest.mark.parametrize("data, files, param", [
    ({"prompt": "x"}, {}, "image"),
    ({"prompt": "x"}, {"image": ("a.png", b"not an image", "image/png")}, "image"),
    ({"prompt": "x"}, {"image": ("a.png", b"", "image/png")}, "image"),
    ({"prompt": ""}, {"image": ("a.png", H.png_bytes(), "image/png")}, "prompt"),
    ({"prompt": "x", "size": "64x64"}, {"image": ("a.png", H.png_bytes(), "image/png")}, "size"),
    ({"prompt": "x", "preset": "video_480p"}, {"image": ("a.png", H.png_bytes(), "image/png")}, "preset"),
    ({"prompt": "x", "mask": "m"}, {"image": ("a.png", H.png_bytes(), "image/png")}, "mask"),
    ({"prompt": "x", "steps": "1.5"}, {"image": ("a.png", H.png_bytes(), "image/png")}, "steps"),
])
def test_image_edit_errors(served, data, files, param):
    client, _ = served
    assert error_of(client.post("/v1/images/edits", data=data, files=files or None))["param"] == param


# -------------------------------------------------------------------------------------------------------- chat
def chat_body(**extra):
    url = H.data_url(H.png_bytes())
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "What colour dominates?"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "max_tokens": 4, **extra}


def test_chat_completion(served):
    client, _ = served
    r = client.post("/v1/chat/completions", json=chat_body(seed=1))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
    job = client.get(f"/v1/jobs/{body['id']}").json()
    assert job["answer"] == choice["message"]["content"] and job["settings"]["question"] == "What colour dominates?"


def test_chat_stream_sse(served):
    client, _ = served
    full = client.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = H.parse_sse(r.text)
    assert frames[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full  # greedy: the stream's pieces make the same answer
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_chat_video(served):
    client, _ = served
    url = H.data_url(H.gif_bytes(), "image/gif")
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}],
            "max_tokens": 2, "preset": "video_192p"}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert client.get(f"/v1/jobs/{r.json()['id']}").json()["task"] == "x2t_video"


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"role": "user", "content": "no image"}],
    [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
    [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": H.data_url(H.png_bytes())}},
                                  {"type": "image_url", "image_url": {"url": H.data_url(H.png_bytes())}}]}],
])
def test_chat_errors(served, messages):
    client, _ = served
    assert error_of(client.post("/v1/chat/completions", json={"messages": messages}))["param"] == "messages"


def test_chat_option_errors(served):
    client, _ = served
    assert error_of(client.post("/v1/chat/completions", json=chat_body(max_tokens=0)))["param"] == "max_tokens"
    assert error_of(client.post("/v1/chat/completions", json=chat_body(temperature="hot")))["param"] == "temperature"
    assert error_of(client.post("/v1/chat/completions", json=chat_body(n=2)))["param"] == "n"


def test_local_files_only_when_allowed(upstream_root, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(H.png_bytes())
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": path.as_uri()}}]}],
            "max_tokens": 2}
    client, _ = make_client(upstream_root, tmp_path / "allowed", allow_local_files=True)
    with client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert client.get(f"/v1/jobs/{r.json()['id']}").json()["settings"]["input"] == str(path)
        missing = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": str(path) + "x"}]}]}
        assert "no such file" in error_of(client.post("/v1/chat/completions", json=missing))["message"]


def test_command_line():
    from lance_mlx.cmd_serve import build_config, parse_args

    args = parse_args([])
    assert (args.host, args.port, args.api_key, args.allow_local_files) == ("127.0.0.1", 8000, None, False)
    cfg = build_config(parse_args(["--model", "m", "--video-model", "v", "--max-queue", "8", "--max-body-mb", "2",
                                   "--api-key", "k", "--dtype", "float32"]))
    assert (cfg.model_for("image"), cfg.model_for("video"), cfg.max_queue) == ("m", "v", 8)
    assert (cfg.max_body_bytes, cfg.api_key, cfg.dtype) == (2 * 2**20, "k", "float32")
    assert build_config(parse_args(["--model", "m"])).model_for("video") == "m"
    for bad in (["--max-queue", "0"], ["--port", "70000"], ["--max-steps", "-1"], ["--model", "bad repo!/x"]):
        with pytest.raises(LanceError, match="must be|OWNER/NAME") as e:  # serve.py: one line, exit 2
            build_config(parse_args(bad))
        assert e.value.exit_code == 2


def test_the_http_layer_never_imports_mlx():
    """Only the worker (jobs.py) touches MLX; routes, parsing and history work on plain Python, numpy and PIL."""
    import ast

    from server_helpers import ROOT

    for name in ("app", "schemas", "inputs", "views", "history", "settings"):
        tree = ast.parse((ROOT / "lance_mlx" / "server" / f"{name}.py").read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if m.split(".")[0] == "mlx" or m.endswith(("pipeline", "lance"))], name

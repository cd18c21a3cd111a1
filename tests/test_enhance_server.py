"""serve.py --enhance-endpoint / --enhance-model: checked at start-up (one line, exit 2), used by the worker for
requests with enhance_prompt (true or "fallback"), shown by GET /v1/models without the key."""

import base64
import io
import subprocess
import sys

import pytest
from openai_stub import ChatStub, closed_url
from PIL import Image

import server_helpers as H
from lance_mlx import cmd_serve
from lance_mlx import enhance as E
from server_helpers import error_of, wait_done

REVISED = "A wide view shows a lighthouse on a basalt cliff at dusk, waves breaking below."
SECRET = "sk-test-not-to-be-shown"
VIDEO = {"prompt": "waves", "size": "32x32", "num_frames": 5, "steps": 1}


@pytest.fixture(autouse=True)
def no_rewrite_env(monkeypatch):
    for name in (E.ENV_BASE_URL, E.ENV_MODEL, E.ENV_API_KEY):
        monkeypatch.delenv(name, raising=False)


def flag_client(upstream_root, out, *flags):
    """A TestClient of the app serve.py builds from `flags` (on the tiny checkpoints), not yet entered."""
    from fastapi.testclient import TestClient

    from lance_mlx.server import create_app

    cfg = cmd_serve.build_config(cmd_serve.parse_args(["--model", str(upstream_root), "--dtype", "float32",
                                                       "--output-dir", str(out), *flags]))
    return TestClient(create_app(cfg, H.cached_loader(cfg)), base_url=H.BASE_URL)


@pytest.fixture(scope="module")
def down(upstream_root, tmp_path_factory):
    """A server whose --enhance-endpoint has nothing listening."""
    with flag_client(upstream_root, tmp_path_factory.mktemp("enhance-down"), "--enhance-endpoint", closed_url(),
                     "--enhance-model", "stub") as client:
        yield client


def png_text(body):
    return Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))).text


def test_started_with_an_endpoint_rewrites_with_it(upstream_root, tmp_path, monkeypatch):
    import httpx

    monkeypatch.setenv(E.ENV_API_KEY, SECRET)
    with ChatStub(REVISED) as stub:
        proc, base = H.start_server(upstream_root, tmp_path / "out", "--enhance-endpoint", stub.url,
                                    "--enhance-model", "stub-model")
        try:
            models = httpx.get(base + "/v1/models", timeout=10)
            assert models.json()["enhancer"] == {"by": "endpoint", "endpoint": stub.url, "model": "stub-model"}
            assert SECRET not in models.text and SECRET not in httpx.get(base + "/health", timeout=10).text
            r = httpx.post(base + "/v1/images/generations", timeout=120,
                           json={"prompt": "a lighthouse", **H.FAST, "enhance_prompt": True})
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["revised_prompt"] == REVISED
            sent = stub.requests[-1]
            assert sent["body"]["model"] == "stub-model" and sent["auth"] == f"Bearer {SECRET}"
            assert "a lighthouse" in stub.last_text
        finally:
            H.stop_server(proc)


def test_the_flag_wins_over_the_environment(upstream_root, tmp_path, monkeypatch):
    with ChatStub(REVISED) as stub:
        monkeypatch.setenv(E.ENV_BASE_URL, closed_url())
        monkeypatch.setenv(E.ENV_MODEL, "env-model")
        with flag_client(upstream_root, tmp_path, "--enhance-endpoint", stub.url) as client:
            r = client.post("/v1/images/generations", json={"prompt": "a lighthouse", **H.FAST, "enhance_prompt": True})
            assert r.status_code == 200, r.text
            assert r.json()["data"][0]["revised_prompt"] == REVISED
            assert stub.requests[-1]["body"]["model"] == "env-model"  # the model still defaults to the variable


def test_endpoint_down_fails_the_synchronous_request(down):
    err = error_of(down.post("/v1/images/generations", json={"prompt": "a", **H.FAST, "enhance_prompt": True}), 502)
    assert err["code"] == "enhance_error" and "cannot reach" in err["message"]


def test_endpoint_down_fails_the_job(down):
    job = down.post("/v1/videos", json={**VIDEO, "enhance_prompt": True})
    assert job.status_code == 200, job.text
    assert wait_done(down, job.json()["id"])[-1]["status"] == "failed"
    got = down.get(f"/v1/videos/{job.json()['id']}").json()
    assert got["status"] == "failed" and got["error"]["code"] == "enhance_error" and "revised_prompt" not in got


def test_fallback_generates_from_the_original_prompt(down):
    r = down.post("/v1/images/generations", json={"prompt": "a lighthouse", **H.FAST, "enhance_prompt": "fallback"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["data"][0]["revised_prompt"] == "a lighthouse"
    text = png_text(body)
    assert text["prompt"] == "a lighthouse" and "revised_prompt" not in text
    settings = down.get("/v1/jobs").json()["data"][0]["settings"]
    assert settings["enhance_prompt"] == "fallback" and "revised_prompt" not in settings
    assert "cannot reach" in settings["revised_prompt_error"]


def test_fallback_on_a_video_job_and_as_a_form_field(down):
    job = down.post("/v1/videos", data={**{k: str(v) for k, v in VIDEO.items()}, "enhance_prompt": "fallback"})
    assert job.status_code == 200, job.text
    frames = wait_done(down, job.json()["id"])
    assert frames[-1]["status"] == "completed"
    enhanced = [f for f in frames if f["type"] == "enhanced"]
    assert enhanced[0]["revised_prompt"] is None and "cannot reach" in enhanced[0]["warning"]


def test_enhance_prompt_takes_true_false_or_fallback(down):
    err = error_of(down.post("/v1/images/generations", json={"prompt": "a", **H.FAST, "enhance_prompt": "maybe"}))
    assert err["param"] == "enhance_prompt" and "fallback" in err["message"]


def test_models_names_the_checkpoint_without_flags(upstream_root, tmp_path):
    with flag_client(upstream_root, tmp_path) as client:
        assert client.get("/v1/models").json()["enhancer"] == {"by": "checkpoint"}


def test_the_description_has_no_secrets():
    e = E.Enhancer(endpoint="https://user:pw@example.com:8443/v1?key=abc#x", model="m", api_key=SECRET)
    assert e.describe() == {"by": "endpoint", "endpoint": "https://example.com:8443/v1", "model": "m"}
    assert SECRET not in repr(e) and "pw" not in e.source and "abc" not in e.source


@pytest.mark.parametrize("flags,env,needle", [
    (["--enhance-endpoint", "ftp://x", "--enhance-model", "m"], {}, "http:// or https://"),
    (["--enhance-endpoint", "http://", "--enhance-model", "m"], {}, "with a host"),
    (["--enhance-endpoint", "localhost:8080/v1", "--enhance-model", "m"], {}, "http:// or https://"),
    (["--enhance-endpoint", "http://127.0.0.1:99999/v1", "--enhance-model", "m"], {}, "with a host"),
    (["--enhance-endpoint", "http://127.0.0.1:8080/v1"], {}, "--enhance-model"),
    (["--enhance-model", "m"], {}, "--enhance-endpoint"),
    ([], {E.ENV_BASE_URL: "ftp://x", E.ENV_MODEL: "m"}, "http:// or https://"),
])
def test_bad_settings_stop_the_start(tmp_path, capsys, monkeypatch, flags, env, needle):
    import uvicorn

    def serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", serve)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:  # cli.fail: the one line, exit 2
        cmd_serve.main(["--output-dir", str(out), "--port", str(H.free_port()), *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert not out.exists()  # nothing made, no lock taken, no port bound


def test_a_malformed_url_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(H.ROOT / "serve.py"), "--enhance-endpoint", "not a url",
                           "--enhance-model", "m"], cwd=H.ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: the enhancement endpoint must be") and "Traceback" not in proc.stderr

"""What web pages and neighbours cannot do: a second server on the same output folder, a DNS-rebound Host, a
cross-site Origin, a hidden form; and the headers and signed links that keep the page and outputs safe."""

import subprocess
import sys
import time
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

import server_helpers as H
from server_helpers import error_of

EVIL = "http://evil.example"


# ------------------------------------------------------------------------------------------- one server per folder
def test_a_second_server_on_the_same_folder_refuses_to_start(upstream_root, tmp_path):
    out = tmp_path / "shared"
    proc, base = H.start_server(upstream_root, out, "--max-steps", "1000")
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            job = c.post("/v1/videos", json={"prompt": "slow", "size": "32x32", "num_frames": 5, "steps": 1000}).json()
            deadline = time.monotonic() + 60
            while c.get(f"/v1/jobs/{job['id']}").json()["status"] != "in_progress":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            partial = out / "outputs" / ".video_other.partial.mp4"  # a write the first server has under way
            partial.write_bytes(b"partial")
            port = H.free_port()
            second = subprocess.run([sys.executable, str(H.ROOT / "serve.py"), "--model", str(upstream_root),
                                     "--output-dir", str(out), "--port", str(port)], capture_output=True, text=True,
                                    timeout=120, cwd=H.ROOT)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in second.stderr
            assert f"pid {proc.pid}" in lines[0] and f"port {base.rsplit(':', 1)[1]}" in lines[0]
            with pytest.raises(httpx.HTTPError):  # it never listened
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            assert partial.exists()  # no clean-up of the first one's files
            assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "in_progress"  # nor of its jobs
            assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    finally:
        H.stop_server(proc)
    # once the first has stopped, the folder is free again (a killed server's lock goes with its process)
    proc, base = H.start_server(upstream_root, out)
    H.stop_server(proc, kill=True)
    proc, base = H.start_server(upstream_root, out)
    H.stop_server(proc)


def test_two_apps_in_one_process_share_no_folder(upstream_root, tmp_path):
    from lance_mlx.server.lock import FolderInUse

    first, _ = H.make_client(upstream_root, tmp_path / "out")
    second, _ = H.make_client(upstream_root, tmp_path / "out")
    with first:
        with pytest.raises(FolderInUse):
            with second:
                pass
        assert first.get("/health").status_code == 200


def test_warning_when_open_to_the_network_without_a_key(upstream_root, tmp_path):
    port = H.free_port()
    proc = subprocess.Popen([sys.executable, str(H.ROOT / "serve.py"), "--model", str(upstream_root), "--host",
                             "0.0.0.0", "--port", str(port), "--output-dir", str(tmp_path / "o"), "--log-level",
                             "warning"], stderr=subprocess.PIPE, text=True, cwd=H.ROOT)
    try:
        first = proc.stderr.readline() + proc.stderr.readline()
        assert "warning: --host 0.0.0.0" in first and "--api-key" in first
    finally:
        H.stop_server(proc)


# ------------------------------------------------------------------------------------------------ web pages
@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("security"), allow_local_files=True)


@pytest.fixture(scope="module")
def keyed(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("keyed"), api_key="s3cret")


def test_dns_rebinding_host_is_refused(served):
    client, _ = served
    for path in ("/health", "/", "/v1/models", "/v1/jobs"):
        assert error_of(client.get(path, headers={"host": "evil.example"}), 421)["code"] == "host_not_allowed"
    r = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}, headers={"host": "evil.example:8000"})
    assert r.status_code == 421
    for host in ("localhost:8000", "127.0.0.1", "127.0.0.1:9", "[::1]:8000"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts(upstream_root, tmp_path):
    client, _ = H.make_client(upstream_root, tmp_path / "o", host="0.0.0.0", allowed_hosts=("box.lan",))
    with client:
        for host, status in (("box.lan:8000", 200), ("192.168.1.7:8000", 200), ("evil.example", 421)):
            assert client.get("/health", headers={"host": host}).status_code == status, host


def test_cross_site_requests_are_refused(served):
    client, _ = served
    cross = {"origin": EVIL}
    r = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}, headers=cross)
    assert error_of(r, 403)["code"] == "origin_not_allowed"
    assert client.post("/v1/videos", json={"prompt": "x"}, headers=cross).status_code == 403
    assert client.post("/v1/jobs/x/cancel", headers=cross).status_code == 403
    assert client.delete("/v1/videos/video_x", headers={"origin": "null"}).status_code == 403
    # the server's own page (same origin) and non-browser clients (no Origin) are served
    r = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}, headers={"origin": "http://localhost"})
    assert r.status_code == 200, r.text
    assert client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}).status_code == 200


def test_hidden_form_posts_are_refused(served, tmp_path):
    """What a hidden <form> on another site sends: form-encoded or multipart, no custom headers."""
    client, _ = served
    local = tmp_path / "secret.png"
    local.write_bytes(H.png_bytes())
    browser = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
    for route in ("/v1/images/generations", "/v1/chat/completions"):  # JSON routes take no form at all
        r = client.post(route, data={"prompt": "x", "steps": "1", "size": "32x32"})
        assert error_of(r, 415)["code"] == "unsupported_media_type"
    for route in ("/v1/videos", "/v1/jobs", "/v1/images/edits"):
        body = {"task": "i2v", "prompt": "x", "steps": "1", "num_frames": "5", "input_reference": str(local),
                "image": str(local)}
        if route != "/v1/jobs":
            body.pop("task")
        for headers in ({**browser, "origin": EVIL}, browser, {"origin": "null"}):
            r = client.post(route, data=body, headers=headers)
            assert error_of(r, 403)["code"] == "origin_not_allowed", (route, headers)
    # the page's own form (same origin), and a client with a bearer header, are taken
    ok = client.post("/v1/videos", data={"prompt": "x", "steps": "1", "num_frames": "5", "size": "32x32"},
                     headers={"origin": "http://localhost", "sec-fetch-site": "same-origin"})
    assert ok.status_code == 200, ok.text
    ok = client.post("/v1/images/edits", data={"prompt": "x", "steps": "1", "preset": "image_256res"},
                     files={"image": ("a.png", H.png_bytes(), "image/png")}, headers={"authorization": "Bearer any"})
    assert ok.status_code == 200, ok.text


def test_page_headers(served):
    client, _ = served
    r = client.get("/")
    assert r.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/health").headers["x-content-type-options"] == "nosniff"


def test_signed_links_of_a_keyed_server(keyed):
    client, _ = keyed
    auth = {"authorization": "Bearer s3cret"}
    r = client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url", **H.FAST}, headers=auth)
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert "sig=" in url and "expires=" in url
    fetched = client.get(url)  # no key: what an <img> tag or a browser tab sends
    assert fetched.status_code == 200 and fetched.content[:4] == b"\x89PNG"
    tampered = url.replace("index=0", "index=1")
    assert client.get(tampered).status_code == 401
    assert client.get(url.replace("sig=", "sig=0")).status_code == 401
    base, query = url.split("?")
    args = dict(parse_qsl(query))
    assert client.get(base + "?" + urlencode({**args, "expires": "1"})).status_code == 401  # expired, or forged
    assert client.get(base.replace("/v1/jobs/", "/v1/jobs/img_other") + "?" + query).status_code == 401
    job_id = url.split("/v1/jobs/")[1].split("/")[0]
    listed = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert "sig=" in listed["outputs"][0]
    assert client.get(listed["outputs"][0]).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}").status_code == 401  # the rest still needs the key
    assert client.get(f"/v1/jobs/{job_id}/content?index=0").status_code == 401

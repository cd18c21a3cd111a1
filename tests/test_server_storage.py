"""The worker against a failing database or a full disk: jobs fail with a storage code, new ones get 507, /health says
degraded and why, streams end, and once the storage works again the same process takes jobs."""

import contextlib
import os
import sqlite3
import time

import pytest

import server_helpers as H
from fixtures import small_disk
from server_helpers import error_of, sse_json

FULL = "database or disk is full"


class FailingDb:
    """A sqlite3 connection that raises SQLITE_FULL on writes while `failing` is set (what a full disk does)."""

    WRITES = ("INSERT", "UPDATE", "DELETE", "CREATE")

    def __init__(self, db):
        self.db, self.failing = db, ()

    def execute(self, sql, *args):
        if sql.lstrip().split()[0].upper() in self.failing:
            raise sqlite3.OperationalError(FULL)
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


@pytest.fixture(scope="module")
def served(upstream_root, tmp_path_factory):
    yield from H.running_client(upstream_root, tmp_path_factory.mktemp("storage"))


@pytest.fixture
def failing_db(served):
    client, _ = served
    history = client.app.state.server["history"]
    proxy = FailingDb(history._db)
    history._db = proxy
    try:
        yield proxy
    finally:
        history._db = proxy.db
        client.get("/health")  # heals the degraded state for the next test


def wait_health(client, status, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (r := client.get("/health")).json()["status"] != status:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r


def test_history_write_failure_in_the_worker_fails_the_job_and_heals(served, failing_db):
    client, _ = served
    engine = client.app.state.server["engine"]
    failing_db.failing = ("UPDATE",)  # queued fine; the worker's first update (in_progress) fails
    r = client.post("/v1/videos", json={"prompt": "waves", "size": "32x32", "num_frames": 5, "steps": 1})
    assert r.status_code == 200
    done = H.wait_done(client, r.json()["id"])[-1]
    assert done["status"] == "failed" and done["error"]["code"] == "storage_full", done
    assert engine._thread.is_alive()
    failing_db.failing = FailingDb.WRITES  # the disk stays full
    err = error_of(client.post("/v1/videos", json={"prompt": "w", "size": "32x32", "num_frames": 5, "steps": 1}),
                   507)
    assert err["code"] == "storage_full" and "full" in err["message"]
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "degraded" and health.json()["reason"]["code"] == "storage_full"
    error_of(client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}), 507)

    failing_db.failing = ()  # space is back: no restart needed
    assert wait_health(client, "ok").status_code == 200
    r = client.post("/v1/images/generations", json={"prompt": "back", **H.FAST})
    assert r.status_code == 200, r.text


def test_failure_inside_a_running_job_ends_its_stream(served, failing_db, monkeypatch):
    """A write failing after the job started (its outputs / final status): the chat stream still ends, with an error
    event and [DONE], and the worker takes the next job."""
    client, _ = served
    engine = client.app.state.server["engine"]
    from lance_mlx.server import jobs

    real = jobs.Engine._answer

    def answer_then_fail(self, job):
        real(self, job)
        failing_db.failing = FailingDb.WRITES  # the final history update fails

    monkeypatch.setattr(jobs.Engine, "_answer", answer_then_fail)
    from test_server import chat_body

    r = client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == 200
    frames = H.parse_sse(r.text)
    assert frames[-1][1] == "[DONE]"
    last = sse_json(r.text)[-1]
    assert last["error"]["code"] == "storage_full", last
    assert engine._thread.is_alive()
    failing_db.failing = ()
    monkeypatch.setattr(jobs.Engine, "_answer", real)
    wait_health(client, "ok")
    r = client.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text


def test_a_bug_in_the_error_handling_does_not_stop_the_worker(served, monkeypatch):
    client, _ = served
    engine = client.app.state.server["engine"]
    from lance_mlx.server import jobs

    calls = []

    def broken_generate(self, job):
        calls.append(job.id)
        raise SystemExit("escaped")  # not an Exception: only the outermost handler sees it

    monkeypatch.setattr(jobs.Engine, "_generate", broken_generate)
    r = client.post("/v1/images/generations", json={"prompt": "x", **H.FAST})
    assert error_of(r, 500)["code"] == "internal_error"
    assert engine._thread.is_alive() and calls
    monkeypatch.undo()
    assert client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}).status_code == 200



def fill(folder):
    """Write a file until the disk is full; returns it."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with contextlib.suppress(OSError):
        os.fsync(f.fileno()) if not f.closed else None
    return filler


def test_full_disk_then_freed(upstream_root, tmp_path):
    """A real full disk (a small tmpfs): the server degrades, then takes jobs again once space is freed."""
    with small_disk(tmp_path / "disk", "24m") as disk:
        if disk is None:
            pytest.skip("mount is not allowed here (the injected-failure tests cover the same paths)")
        client, _ = H.make_client(upstream_root, tmp_path / "disk" / "out")
        with client:
            assert client.post("/v1/images/generations", json={"prompt": "a", **H.FAST}).status_code == 200
            filler = fill(tmp_path / "disk")
            codes = set()
            for _ in range(3):
                r = client.post("/v1/videos", json={"prompt": "w", "size": "32x32", "num_frames": 5, "steps": 1})
                if r.status_code == 200:
                    codes.add(H.wait_done(client, r.json()["id"])[-1]["error"]["code"])
                else:
                    codes.add(error_of(r, 507)["code"])
            assert codes == {"storage_full"}, codes
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["reason"]["code"] == "storage_full"
            assert client.app.state.server["engine"]._thread.is_alive()
            filler.unlink()
            wait_health(client, "ok")
            r = client.post("/v1/videos", json={"prompt": "w", "size": "32x32", "num_frames": 5, "steps": 1})
            assert r.status_code == 200, r.text
            assert H.wait_done(client, r.json()["id"])[-1]["status"] == "completed"


def test_a_dead_worker_is_reported_not_hidden(upstream_root, tmp_path):
    """Should the worker thread ever end, /health says so and new jobs get 503 instead of waiting forever."""
    client, _ = H.make_client(upstream_root, tmp_path / "o")
    with client:
        engine = client.app.state.server["engine"]
        with engine._cond:  # end the loop the way only a stop would, without the stop's flag
            engine._stopping = True
            engine._cond.notify_all()
        engine._thread.join(10)
        engine._stopping = False
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["reason"]["code"] == "worker_stopped"
        assert error_of(client.post("/v1/images/generations", json={"prompt": "x", **H.FAST}), 503)["code"] == \
            "worker_stopped"

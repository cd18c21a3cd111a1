"""The catalogue of bad inputs and failures, run as a user would: each case asserts the exit code, a one-line message
naming the problem, and that nothing outside the intended output changed (the working tree is hashed before and
after). The cases that need no model are in test_cli_checks.py; these need the tiny checkpoints, a full or
read-only disk, signals, or the Python API."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from fixtures import run_cli, small_disk, tree_hash
from lance_mlx import SamplingParams, cmd_caption, cmd_convert, cmd_edit, cmd_generate, media
from lance_mlx import tasks as T
from lance_mlx.errors import InvalidRequestError, InvalidTypeError, LanceError, WeightsError
from lance_mlx.pipeline import LancePipeline

GEN = ["--prompt", "a red fox", "--steps", "1", "--dtype", "float32"]
VIDEO = ["--frames", "5", "--width", "32", "--height", "32"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder holding a user's files, made the current folder."""
    rng = np.random.default_rng(0)
    media.save_image((rng.random((32, 32, 3)) * 255).astype(np.uint8), tmp_path / "in.png")
    (tmp_path / "MyPhotos").mkdir()
    (tmp_path / "MyPhotos" / "holiday.jpg").write_bytes(b"precious")
    (tmp_path / "notes.json").write_text('{"mine": true}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_refused(code, err, message, expected_code=2):
    lines = err.strip().splitlines()
    assert code == expected_code, err
    assert lines and lines[-1].startswith("error:") and message in lines[-1], err
    assert "Traceback" not in err, err


def no_partials(root):
    return [p for p in root.rglob("*") if ".partial" in p.name or p.name.endswith(".old")] == []



# ----------------------------------------------------------------------------------------------- model folder
def _broken_config(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "broken-model")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["llm"]["hidden_size"] = "64"
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


MODEL_CASES = {
    "image weights for t2v": (lambda c, u, t: ["--model", c["image"]] + GEN + VIDEO + ["--out", "v.mp4"],
                              "Lance_3B_Video"),
    "image checkpoint folder for t2v": (lambda c, u, t: ["--model", u / "Lance_3B"] + GEN + VIDEO + ["--out", "v.mp4"],
                                        "Lance_3B_Video"),
    "video weights for t2i": (lambda c, u, t: ["--model", c["video"]] + GEN + ["--width", "32", "--height", "32",
                                                                                "--out", "x.png"], "Lance_3B"),
    "model is a file": (lambda c, u, t: ["--model", c["image"] / "config.json"] + GEN + ["--out", "x.png"],
                        "is a file"),
    "model folder missing": (lambda c, u, t: ["--model", t / "nowhere"] + GEN + ["--out", "x.png"],
                             "model folder not found"),
    "config value of the wrong type": (lambda c, u, t: ["--model", _broken_config(c["image"], t)] + GEN
                                       + ["--out", "x.png"], "'hidden_size' must be an integer"),
    "prompt over the token limit": (lambda c, u, t: ["--model", c["image"], "--prompt", "fox " * 5000, "--steps", "1",
                                                     "--out", "x.png"], "the limit is 4096 tokens"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_folder_cases(case, converted, upstream_root, work, tmp_path_factory, capsys):
    argv, message = MODEL_CASES[case]
    argv = argv(converted, upstream_root, tmp_path_factory.mktemp("m"))
    before = tree_hash(work)
    code, err = run_cli(cmd_generate, argv, capsys)
    assert_refused(code, err, message)
    assert tree_hash(work) == before


def _hub_failure(kind):
    import httpx
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    response = lambda status: httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/x"))
    return {"typo": RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response(404)),
            "gated": GatedRepoError("403 Client Error: gated", response=response(403)),
            "server error": HfHubHTTPError("500 Server Error: Internal Server Error", response=response(500)),
            "offline": LocalEntryNotFoundError("cannot reach the hub")}[kind]


@pytest.mark.parametrize("kind,message", [("typo", "no hub repo bytedance-research/Lanse"),
                                          ("gated", "gated repo"), ("server error", "the hub answered 500"),
                                          ("offline", "cannot be reached")])
def test_hub_failures(kind, message, work, monkeypatch, capsys):
    import huggingface_hub

    def fail(*a, **k):
        raise _hub_failure(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    before = tree_hash(work)
    code, err = run_cli(cmd_generate, ["--model", "bytedance-research/Lanse"] + GEN + ["--out", "x.png"], capsys)
    assert_refused(code, err, message)
    assert tree_hash(work) == before


# --------------------------------------------------------------------------------------------- output checks
FIRST_CASES = [
    ("not enough free space", GEN + VIDEO + ["--out", "v.mp4"], "not enough space", {"free": 1000}),
    ("sidecar over a user's file", GEN + ["--out", "x.png", "--metadata-json", "notes.json"],
     "notes.json exists and is not a lance-mlx metadata file", {}),
    ("sidecar with the wrong suffix", GEN + ["--out", "x.png", "--metadata-json", "meta.txt"], "not a .json name", {}),
    ("sidecar is a folder", GEN + ["--out", "x.png", "--metadata-json", "MyPhotos"], "not a .json name", {}),
    ("invalid UTF-8 prompt", ["--prompt", "a \udcff fox", "--out", "x.png"], "not valid text", {}),
    ("fps 0 with a GIF", GEN + VIDEO + ["--fps", "0", "--out", "v.gif"], "out of range", {}),
    ("video over a user's folder with --force", GEN + VIDEO + ["--force", "--out", "MyPhotos"],
     "not an output of lance-mlx", {}),
    ("home folder", GEN + VIDEO + ["--out", "~"], "refusing to write over", {}),
    ("root folder", GEN + VIDEO + ["--out", "/"], "refusing to write over", {}),
]


@pytest.mark.parametrize("case,argv,message,disk", FIRST_CASES, ids=[c[0] for c in FIRST_CASES])
def test_refused_before_loading(case, argv, message, disk, work, no_model, monkeypatch, capsys):
    if disk:
        usage = shutil.disk_usage(work)
        monkeypatch.setattr(media.shutil, "disk_usage", lambda p: usage._replace(free=disk["free"]))
    before = tree_hash(work)
    code, err = run_cli(cmd_generate, argv, capsys)
    assert_refused(code, err, message)
    assert tree_hash(work) == before


def test_read_only_disk_refused_before_loading(work, no_model, monkeypatch, capsys):
    with small_disk(work / "ro", read_only=True) as ro:
        if ro is None:  # no mount allowed here: make the folder unwritable as os.access reports it
            (work / "ro").chmod(0o555)
            real = os.access
            monkeypatch.setattr(media.os, "access", lambda p, m: False if str(p) == str(work / "ro") else real(p, m))
        before = tree_hash(work)
        code, err = run_cli(cmd_generate, GEN + ["--out", "ro/x.png"], capsys)
    assert_refused(code, err, "cannot write to")
    assert tree_hash(work) == before


def test_convert_refuses_current_folder_even_with_force(upstream_root, work, capsys):
    before = tree_hash(work)
    code, err = run_cli(cmd_convert, ["--model", upstream_root, "--out", ".", "--force"], capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err, err
    assert tree_hash(work) == before


# ---------------------------------------------------------------------------------------- failures mid-run
def _fill_disk_write(monkeypatch, kind):
    """Without a small disk to fill, make the writer hit ENOSPC as a full disk would."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if kind == "video":
        monkeypatch.setattr(media, "_encode_h264", full)
    else:
        monkeypatch.setattr(Image.Image, "save", full)


@pytest.mark.parametrize("out,kind", [("x.png", "image"), ("v.mp4", "video")])
def test_disk_full_while_writing(out, kind, converted, work, monkeypatch, capsys):
    model = converted["video" if kind == "video" else "image"]
    extra = VIDEO if kind == "video" else ["--width", "32", "--height", "32"]
    # The free-space check passes (the disk fills up while the model runs); the writer then meets a full disk.
    monkeypatch.setattr("lance_mlx.cli.check_space", lambda out, shape: None)
    with small_disk(work / "disk", size="8k") as disk:
        if disk is None:
            _fill_disk_write(monkeypatch, kind)
        else:
            _fill(disk / "filler.bin")
        before = tree_hash(work)
        code, err = run_cli(cmd_generate, ["--model", model] + GEN + extra + ["--out", f"disk/{out}"], capsys)
        assert not (work / "disk" / out).exists() and no_partials(work / "disk")
        assert tree_hash(work) == before
    assert_refused(code, err, "no space left on", expected_code=1)
    assert "\nsaved " not in err and not err.startswith("saved ")


def _fill(path):
    """Write `path` until its disk is full."""
    with open(path, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 512)


def _interrupt_after(monkeypatch, n_frames, sig):
    """Deliver `sig` to this process after `n_frames` decoded frames, i.e. while the video is being written."""
    real = LancePipeline.iter_frames

    def frames(self, latents):
        for i, f in enumerate(real(self, latents)):
            if i == n_frames:
                if sig == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), sig)
            yield f

    monkeypatch.setattr(LancePipeline, "iter_frames", frames)


@pytest.mark.parametrize("sig,code,out", [(signal.SIGTERM, 143, "v.mp4"), (signal.SIGINT, 130, "v.mp4"),
                                          (signal.SIGTERM, 143, "frames"), (signal.SIGTERM, 143, "v.gif")])
def test_signal_while_writing_leaves_nothing(sig, code, out, converted, work, monkeypatch, capsys):
    _interrupt_after(monkeypatch, 2, sig)
    before = tree_hash(work)
    got, err = run_cli(cmd_generate, ["--model", converted["video"]] + GEN + VIDEO + ["--out", out], capsys)
    assert got == code and "nothing was written" in err and "Traceback" not in err, err
    assert tree_hash(work) == before and no_partials(work)


def test_writer_failure_is_not_reported_as_saved(converted, work, monkeypatch, capsys):
    """A video whose file does not hold the frames sent (an encoder that lost one) is removed, exit 1."""
    encode = media._encode_h264
    monkeypatch.setattr(media, "_encode_h264", lambda *a: encode(*a) + 1)
    before = tree_hash(work)
    code, err = run_cli(cmd_generate, ["--model", converted["video"]] + GEN + VIDEO + ["--out", "v.mp4"], capsys)
    assert_refused(code, err, "has 5 frames", expected_code=1)
    assert tree_hash(work) == before and no_partials(work)


# ------------------------------------------------------------------------------------------ outputs written
def _mp4_tags(path):
    """The container's tags as ffmpeg reads them (what ffprobe -show_format lists)."""
    import imageio_ffmpeg

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines()[1:] if "=" in line)


def test_mp4_metadata_is_complete(converted, work, capsys):
    code, err = run_cli(cmd_generate, ["--model", converted["video"]] + GEN + VIDEO + ["--seed", "7", "--out", "v.mp4"],
                        capsys)
    assert code == 0, err
    tags = _mp4_tags(work / "v.mp4")
    for key, value in {"prompt": "a red fox", "seed": "7", "steps": "1", "cfg_text": "4.0", "timestep_shift": "3.5",
                       "width": "32", "height": "32", "frames": "5", "fps": "12.0", "software": "lance-mlx",
                       "title": "a red fox"}.items():
        assert tags.get(key) == value, (key, tags)
    assert tags["model"] == str(converted["video"])
    assert json.loads(tags["comment"])["seed"] == 7


@pytest.mark.parametrize("out", ["x.png", "x.jpg", "v.mp4", "v.gif", "frames"])
def test_metadata_json_sidecar(out, converted, work, capsys):
    video = "." not in out or out.startswith("v.")
    model = converted["video" if video else "image"]
    size = VIDEO if video else ["--width", "32", "--height", "32"]
    argv = ["--model", model] + GEN + size + ["--seed", "5", "--out", out, "--metadata-json"]
    code, err = run_cli(cmd_generate, argv, capsys)
    assert code == 0, err
    meta = json.loads((work / f"{out}.json").read_text())
    assert meta["prompt"] == "a red fox" and meta["seed"] == 5 and meta["steps"] == 1
    assert meta["software"] == "lance-mlx" and meta["output"] == out and meta["width"] == 32
    # the sidecar is ours: a rerun replaces it only with --force, and a named path works too
    code, err = run_cli(cmd_generate, argv, capsys)
    assert_refused(code, err, "exists")
    code, err = run_cli(cmd_generate, argv[:-1] + ["--force", "--metadata-json", "named.json"], capsys)
    assert code == 0 and json.loads((work / "named.json").read_text())["seed"] == 5, err


def test_edit_and_caption_refuse_bad_input_without_traceback(work, capsys):
    code, err = run_cli(cmd_edit, ["--image", "missing.png", "--instruction", "x", "--out", "o.png"], capsys)
    assert_refused(code, err, "missing.png")
    code, err = run_cli(cmd_caption, ["--image", "in.png", "--question", "  "], capsys)
    assert_refused(code, err, "question is empty")


# -------------------------------------------------------------------------------------------------- Python API
API_CASES = [
    ("non-string prompt", lambda: T.TextToImage(123), InvalidTypeError, "must be text"),
    ("bool width", lambda: T.TextToImage("fox", width=True), InvalidTypeError, "width"),
    ("string steps", lambda: SamplingParams(steps="2"), InvalidTypeError, "steps"),
    ("fractional steps", lambda: SamplingParams(steps=2.5), InvalidRequestError, "whole number"),
    ("seed None", lambda: SamplingParams(seed=None), InvalidTypeError, "seed"),
    ("fractional seed", lambda: SamplingParams(seed=1.5), InvalidRequestError, "whole number"),
    ("negative seed", lambda: SamplingParams(seed=-1), InvalidRequestError, "seed"),
    ("huge seed", lambda: SamplingParams(seed=2**70), InvalidRequestError, "seed"),
    ("unknown setting", lambda: SamplingParams().replace(cfg=3), InvalidTypeError, "unknown sampling setting"),
    ("empty question", lambda: T.Understand("in.png", question=""), InvalidRequestError, "question is empty"),
    ("no image to edit", lambda: T.ImageEdit(None, "make it red"), InvalidTypeError, "no image given"),
    ("missing image", lambda: T.ImageEdit("nope.png", "make it red"), InvalidRequestError, "nope.png"),
    ("zero fps", lambda: T.TextToVideo("fox", 5, 32, 32, fps=0), InvalidRequestError, "fps"),
    ("bad frame count", lambda: T.TextToVideo("fox", 6, 32, 32), InvalidRequestError, r"form 4k\+1"),
]


@pytest.mark.parametrize("case,build,error,message", API_CASES, ids=[c[0] for c in API_CASES])
def test_python_api_errors(case, build, error, message, work):
    with pytest.raises(error, match=message) as e:
        build()
    assert isinstance(e.value, LanceError)


def test_image_pipeline_refuses_video_generation(converted):
    pipe = LancePipeline.from_pretrained(converted["image"], task="t2i", dtype="float32")
    with pytest.raises(WeightsError, match="Lance_3B_Video"):
        pipe.generate_video("a fox", num_frames=5, width=32, height=32, steps=1)


def test_image_modes_are_normalized(work):
    from lance_mlx.processing import load_image

    gray16 = np.full((8, 8), 30000, np.uint16)
    Image.fromarray(gray16).save(work / "g16.png")
    assert tuple(np.asarray(load_image(work / "g16.png"))[0, 0]) == (117, 117, 117)  # 30000 / 257, not clipped
    Image.new("LA", (4, 4), (10, 0)).save(work / "la.png")
    assert tuple(np.asarray(load_image(work / "la.png"))[0, 0]) == (255, 255, 255)  # transparent -> white


def test_caption_metadata_json(converted, work, capsys):
    argv = ["--model", converted["image"], "--image", "in.png", "--max-tokens", "3", "--dtype", "float32",
            "--metadata-json", "answer.json"]
    code, err = run_cli(cmd_caption, argv, capsys)
    assert code == 0, err
    meta = json.loads((work / "answer.json").read_text())
    assert meta["software"] == "lance-mlx" and meta["input"] == "in.png" and meta["max_tokens"] == 3
    assert isinstance(meta["answer"], str) and meta["finish_reason"] in ("stop", "length")
    before = tree_hash(work)
    code, err = run_cli(cmd_caption, argv[:-1] + ["notes.json"], capsys)
    assert_refused(code, err, "not a lance-mlx metadata file")
    assert tree_hash(work) == before

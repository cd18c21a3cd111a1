"""edit.py and inference.py (t2v, i2v) end to end on tiny random checkpoints in the upstream layout; errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lance_mlx.media import save_image, save_video
from lance_mlx.video_input import read_video

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory, upstream_root):
    d = tmp_path_factory.mktemp("edit_cli")
    (d / "model").symlink_to(upstream_root, target_is_directory=True)
    rng = np.random.default_rng(0)
    save_image((rng.random((32, 48, 3)) * 255).astype(np.uint8), d / "img.png")
    save_video([(rng.random((32, 48, 3)) * 255).astype(np.uint8) for _ in range(5)], d / "clip.mp4", fps=12)
    save_video([(rng.random((32, 48, 3)) * 255).astype(np.uint8)], d / "one_frame.mp4", fps=24)
    (d / "garbage.png").write_bytes(b"not an image at all")
    return d


def run(script, files, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [str(files / a) if isinstance(a, str) and a.endswith((".png", ".mp4", ".gif")) else str(a) for a in args]
    return subprocess.run([sys.executable, str(ROOT / script), "--model", str(files / "model"), "--dtype", "float32",
                           "--steps", "2", *args], capture_output=True, text=True, env=env, timeout=300)


def ok(r):
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "peak memory" in r.stderr and "[load]" in r.stderr and "[decode + write]" in r.stderr
    return r


def test_edit_image(files):
    out = files / "out" / "edited.png"
    r = ok(run("edit.py", files, "--image", "img.png", "--instruction", "make it pink", "--out", out,
               "--preset", "image_256res", "--cfg-text", "4", "--cfg-img", "1.5"))
    assert "[encode source (ViT + VAE)]" in r.stderr and "denoising" in r.stderr
    img = Image.open(out)
    assert img.size == (304, 224)  # the 4:3 bucket of image_256res
    assert img.text["instruction"] == "make it pink" and img.text["cfg_img"] == "1.5"


def test_edit_video(files):
    out = files / "out" / "edited.mp4"
    ok(run("edit.py", files, "--video", "clip.mp4", "--instruction", "make it snow", "--out", out,
           "--preset", "video_192p", "--posterior-mean"))
    video, fps = read_video(out)
    assert video.shape == (5, 224, 304, 3) and fps == 12  # 5 frames at 12 fps are all sampled


def test_text_to_video(files):
    out = files / "out" / "t2v.mp4"
    r = ok(run("inference.py", files, "--prompt", "a boat on a lake", "--frames", "9", "--fps", "8",
               "--width", "48", "--height", "32", "--out", out))
    assert "9 frames at 8 fps" in r.stderr
    video, fps = read_video(out)
    assert video.shape == (9, 32, 48, 3) and fps == 8


def test_image_to_video(files):
    out = files / "out" / "i2v"  # no suffix: a folder of PNG frames
    ok(run("inference.py", files, "--prompt", "the boat sails away", "--image", "img.png", "--frames", "5",
           "--resolution", "48", "--out", out))
    pngs = sorted(out.glob("frame_*.png"))
    assert len(pngs) == 5 and Image.open(pngs[0]).size == (64, 48)  # the 4:3 bucket of area ~48²


def test_text_to_image_unchanged(files):
    out = files / "out" / "t2i.png"
    ok(run("inference.py", files, "--prompt", "a red fox", "--width", "32", "--height", "48", "--out", out))
    assert Image.open(out).size == (32, 48)


@pytest.mark.parametrize("script,args,message", [
    ("edit.py", ("--image", "img.png", "--instruction", " ", "--out", "x.png"), "instruction is empty"),
    ("edit.py", ("--image", "garbage.png", "--instruction", "make it pink", "--out", "x.png"),
     "cannot read the input"),
    ("edit.py", ("--image", "missing.png", "--instruction", "make it pink", "--out", "x.png"), "not found"),
    ("edit.py", ("--video", "clip.mp4", "--instruction", "make it pink", "--out", "x.png"), "not a video name"),
    ("edit.py", ("--video", "one_frame.mp4", "--instruction", "make it pink", "--out", "x.mp4",
                 "--preset", "video_192p"), "video too short"),
    ("inference.py", ("--prompt", "a boat", "--frames", "10", "--out", "x.mp4"), "use 9 or 13"),
    ("inference.py", ("--prompt", "a boat", "--frames", "125", "--out", "x.mp4"), "at most 121 frames"),
    ("inference.py", ("--prompt", "a boat", "--frames", "9", "--out", "x.png"), "not a video name"),
    ("inference.py", ("--prompt", "a boat", "--image", "garbage.png", "--frames", "5", "--out", "x.mp4"),
     "cannot read --image"),
    ("inference.py", ("--prompt", "a boat", "--image", "img.png", "--out", "x.mp4"), "needs --frames 5"),
    ("inference.py", ("--prompt", "a boat", "--image", "img.png", "--frames", "5", "--width", "48",
                      "--height", "32", "--out", "x.mp4"), "takes its size from --image"),
])
def test_errors(files, tmp_path, script, args, message):
    args = [str(tmp_path / a) if a in ("x.png", "x.mp4") else a for a in args]
    r = run(script, files, *args)
    assert r.returncode != 0
    assert r.stderr.startswith("error:") and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []  # no output, partial or otherwise

"""Every task's command-line run works from folders written by convert.py (image and video checkpoints)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lance_mlx import checkpoints
from lance_mlx.media import save_image, save_video
from lance_mlx.video_input import read_video

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def d(tmp_path_factory, converted):
    d = tmp_path_factory.mktemp("converted_tasks")
    for kind, folder in converted.items():
        (d / kind).symlink_to(folder, target_is_directory=True)
    rng = np.random.default_rng(0)
    save_image((rng.random((32, 48, 3)) * 255).astype(np.uint8), d / "in.png")
    save_video([(rng.random((32, 48, 3)) * 255).astype(np.uint8) for _ in range(5)], d / "in.mp4", fps=12)
    return d


def run(d, script, folder, *args):
    r = subprocess.run([sys.executable, str(ROOT / script), "--model", str(d / folder), "--dtype", "float32", *args],
                       check=False, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "peak memory" in r.stderr
    return r


def test_converted_folders_are_marked(d):
    assert checkpoints.locate(d / "image", "image_edit").layout == "mlx"
    assert checkpoints.locate(d / "video", "video_edit").layout == "mlx"


def test_text_to_image(d):
    run(d, "inference.py", "image", "--prompt", "a red fox", "--width", "32", "--height", "32", "--steps", "2",
        "--out", str(d / "t2i.png"))
    assert Image.open(d / "t2i.png").size == (32, 32)


def test_image_edit(d):
    run(d, "edit.py", "image", "--image", str(d / "in.png"), "--instruction", "make it blue", "--steps", "2",
        "--preset", "image_256res", "--out", str(d / "edit.png"))
    assert Image.open(d / "edit.png").size[0] > 0


def test_image_understanding(d):
    r = run(d, "caption.py", "image", "--image", str(d / "in.png"), "--max-tokens", "4")
    assert r.stdout.strip()


def test_text_to_video(d):
    run(d, "inference.py", "video", "--prompt", "waves", "--frames", "5", "--width", "32", "--height", "32",
        "--steps", "2", "--out", str(d / "t2v.mp4"))
    assert read_video(d / "t2v.mp4")[0].shape[0] == 5


def test_image_to_video(d):
    run(d, "inference.py", "video", "--prompt", "waves", "--image", str(d / "in.png"), "--frames", "5",
        "--resolution", "64", "--steps", "2", "--out", str(d / "i2v.mp4"))
    assert read_video(d / "i2v.mp4")[0].shape[0] == 5


def test_video_edit(d):
    run(d, "edit.py", "video", "--video", str(d / "in.mp4"), "--instruction", "make it blue", "--steps", "2",
        "--preset", "video_192p", "--out", str(d / "vedit.mp4"))
    assert read_video(d / "vedit.mp4")[0].shape[0] >= 1


def test_video_understanding(d):
    r = run(d, "caption.py", "video", "--video", str(d / "in.mp4"), "--max-tokens", "4")
    assert r.stdout.strip()

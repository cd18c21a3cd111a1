"""caption.py end to end on a tiny random checkpoint in the upstream layout: image, video, and clear errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import write_golden_lance_folder, write_golden_vit_folder
from lance_mlx.media import save_image, save_video

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("caption")
    write_golden_lance_folder(d / "Lance_3B")
    write_golden_vit_folder(d / "Qwen2.5-VL-ViT")
    rng = np.random.default_rng(0)
    save_image((rng.random((60, 80, 3)) * 255).astype(np.uint8), d / "img.png")
    save_video([(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(9)], d / "clip.mp4", fps=12)
    save_video([(rng.random((64, 64, 3)) * 255).astype(np.uint8)], d / "one_frame.mp4", fps=24)
    (d / "empty.png").write_bytes(b"")
    Image.new("RGB", (20000, 1)).save(d / "too_wide.png")
    return d


def run(files, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "caption.py"), "--model", str(files / "Lance_3B"),
                           "--dtype", "float32", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("args", [("--image", "img.png", "--max-tokens", "6"),
                                  ("--video", "clip.mp4", "--max-tokens", "4", "--question", "What moves?")])
def test_caption_runs(files, args):
    args = [str(files / a) if a.endswith((".png", ".mp4")) else a for a in args]
    r = run(files, *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # random weights: some text
    assert "Traceback" not in r.stderr
    assert "[prompt]" in r.stderr and "tokens/s" in r.stderr and "peak memory" in r.stderr


@pytest.mark.parametrize("args,message", [
    (("--image", "img.png", "--max-tokens", "0"), "--max-tokens must be a positive"),
    (("--image", "empty.png"), "empty"),
    (("--image", "too_wide.png"), "limit is 16384 px"),
    (("--video", "one_frame.mp4"), "video too short"),
    (("--image", "missing.png"), "not found"),
])
def test_caption_errors(files, args, message):
    args = [str(files / a) if a.endswith((".png", ".mp4")) else a for a in args]
    r = run(files, *args)
    assert r.returncode != 0
    assert message in r.stderr and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_caption_missing_model_files(files, tmp_path):
    (tmp_path / "Lance_3B").mkdir()
    (tmp_path / "Lance_3B" / "llm_config.json").write_text((files / "Lance_3B" / "llm_config.json").read_text())
    r = subprocess.run([sys.executable, str(ROOT / "caption.py"), "--model", str(tmp_path / "Lance_3B"),
                        "--image", str(files / "img.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr

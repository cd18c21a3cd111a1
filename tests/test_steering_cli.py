"""inference.py / edit.py with --negative-prompt and --enhance-prompt on the tiny checkpoints: metadata (PNG text and
--metadata-json), the token limit before loading, the endpoint's rewrite, its failure and the fallback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from openai_stub import ChatStub, closed_url
from PIL import Image

from lance_mlx.media import save_image
from lance_mlx.tasks import MAX_PROMPT_TOKENS

ROOT = Path(__file__).resolve().parent.parent
REVISED = "A wide view shows a lighthouse on a cliff at dusk, waves breaking below."


@pytest.fixture(scope="module")
def files(tmp_path_factory, upstream_root):
    d = tmp_path_factory.mktemp("steering_cli")
    (d / "model").symlink_to(upstream_root, target_is_directory=True)
    save_image((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8), d / "img.png")
    return d


def run(script, files, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANCE_REWRITE_")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, str(ROOT / script), "--model", str(files / "model"), "--dtype", "float32",
                           "--steps", "1", *[str(a) for a in args]], capture_output=True, text=True, env=env,
                          timeout=600)


def t2i(files, out, *args):
    return run("inference.py", files, "--prompt", "a lighthouse", "--width", 32, "--height", 32, "--out", out, *args)


def ok(r):
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def failed(r, code):
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return lines[0]


def test_negative_prompt_in_png_text_and_sidecar(files):
    out = files / "neg.png"
    ok(t2i(files, out, "--negative-prompt", "blurry, low quality", "--metadata-json"))
    assert Image.open(out).text["negative_prompt"] == "blurry, low quality"
    side = json.loads((files / "neg.png.json").read_text())
    assert side["negative_prompt"] == "blurry, low quality" and side["prompt"] == "a lighthouse"
    plain = files / "plain.png"
    ok(t2i(files, plain, "--negative-prompt", ""))  # empty: upstream's branch, nothing recorded
    assert "negative_prompt" not in Image.open(plain).text
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(plain)))


def test_negative_prompt_of_an_edit(files):
    out = files / "edit_neg.png"
    ok(run("edit.py", files, "--image", files / "img.png", "--instruction", "make it pink", "--out", out,
           "--preset", "image_256res", "--negative-prompt", "grey"))
    assert Image.open(out).text["negative_prompt"] == "grey"


def test_negative_prompt_over_the_token_limit_is_refused_before_loading(files):
    line = failed(t2i(files, files / "long.png", "--negative-prompt", "fox " * (MAX_PROMPT_TOKENS + 10)), 2)
    assert "negative prompt is" in line and "tokens long" in line
    assert not (files / "long.png").exists()


def test_endpoint_enhancement_in_metadata(files):
    out = files / "enhanced.png"
    with ChatStub(REVISED) as stub:
        r = ok(t2i(files, out, "--enhance-prompt", "--enhance-endpoint", stub.url, "--enhance-model", "stub",
                   "--metadata-json"))
    assert "a lighthouse" in stub.last_text
    assert f"[enhanced prompt, stub at {stub.url}] {REVISED}" in r.stderr
    text = Image.open(out).text
    assert text["prompt"] == "a lighthouse" and text["revised_prompt"] == REVISED
    assert json.loads((files / "enhanced.png.json").read_text())["revised_prompt"] == REVISED


def test_endpoint_down_is_one_line_and_nothing_loads(files):
    out = files / "down.png"
    line = failed(t2i(files, out, "--enhance-prompt", "--enhance-endpoint", closed_url(), "--enhance-model", "m"), 1)
    assert "prompt enhancement failed: cannot reach" in line and "--enhance-prompt fallback" in line
    assert not out.exists()


def test_fallback_generates_from_the_original_prompt(files):
    out = files / "fallback.png"
    r = ok(t2i(files, out, "--enhance-prompt", "fallback", "--enhance-endpoint", closed_url(), "--enhance-model", "m"))
    assert "warning: prompt enhancement failed" in r.stderr
    text = Image.open(out).text
    assert text["prompt"] == "a lighthouse" and "revised_prompt" not in text and "revised_prompt_error" in text


def test_checkpoint_enhancement(files):
    out = files / "self.png"
    r = ok(t2i(files, out, "--enhance-prompt"))
    assert "[enhance prompt]" in r.stderr and "[enhanced prompt, checkpoint] " in r.stderr
    text = Image.open(out).text
    assert text["enhanced_by"] == "checkpoint" and text["revised_prompt"] and text["prompt"] == "a lighthouse"


def test_checkpoint_enhancement_of_image_to_video_sees_the_frame(files):
    """The run loads the ViT with the video checkpoint (bundled there) to show it the first frame."""
    out = files / "i2v.mp4"
    r = ok(run("inference.py", files, "--prompt", "the boat sails away", "--image", files / "img.png", "--frames", 5,
               "--resolution", 64, "--out", out, "--enhance-prompt", "--metadata-json"))
    assert "[enhanced prompt, checkpoint] " in r.stderr and out.exists()
    meta = json.loads((files / "i2v.mp4.json").read_text())
    assert meta["prompt"] == "the boat sails away" and meta["revised_prompt"] and meta["enhanced_by"] == "checkpoint"


@pytest.mark.parametrize("args,msg", [(["--enhance-endpoint", "http://127.0.0.1:1/v1"], "need --enhance-prompt"),
                                      (["--enhance-prompt", "--enhance-endpoint", "http://127.0.0.1:1/v1"],
                                       "needs a model name")])
def test_enhancement_flag_errors(files, args, msg):
    assert msg in failed(t2i(files, files / "x.png", *args), 2)

"""Peak-memory estimate (lance_mlx/memory_estimate.py): against the measured table of docs/memory.md, monotone,
the check's suggestion fits, and the commands refuse before loading anything."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lance_mlx import cmd_caption, cmd_generate
from lance_mlx import memory_estimate as M
from lance_mlx.errors import InsufficientMemoryError, InvalidRequestError
from lance_mlx.tasks import ImageEdit, ImageToVideo, TextToImage, TextToVideo, Understand

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
TABLE_FACTOR = 1.1  # the estimate is within 10% of every measured row (it composes the same calibration)
PROMPT = "a fox in the snow at dawn"


def _image(w, h):
    return Image.fromarray(np.zeros((h, w, 3), np.uint8))


# docs/memory.md "Peak memory per task": case -> the request it measured
TABLE_CASES = {
    "t2i 512²": lambda: TextToImage(PROMPT, 512, 512),
    "t2i 768²": lambda: TextToImage(PROMPT, 768, 768),
    "t2i 1024²": lambda: TextToImage(PROMPT, 1024, 1024),
    "edit 768²": lambda: ImageEdit(_image(768, 768), "make it pink"),
    "t2v 480p × 25": lambda: TextToVideo(PROMPT, 25, 848, 480),
    "t2v 480p × 121": lambda: TextToVideo(PROMPT, 121, 848, 480),
    "understanding, image (image_768res)": lambda: Understand(_image(1024, 768), "Describe it."),
    "understanding, 32-frame video (video_480p)": lambda: Understand(np.zeros((32, 480, 848, 3), np.uint8),
                                                                      "Describe it.", video=True),
}


def measured_rows():
    text = (ROOT / "docs" / "memory.md").read_text()
    table = text.split("## Peak memory per task", 1)[1]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in TABLE_CASES:
            rows[cells[0]] = tuple(float(c) for c in cells[3:6])
    return rows


def test_estimate_matches_the_measured_table():
    rows = measured_rows()
    assert set(rows) == set(TABLE_CASES)  # every row of the table is checked
    # the table's setting: bf16 LLM and ViT, float32 VAE
    settings = [M.MemoryOptions(vae_dtype="float32"), M.MemoryOptions(vae_dtype="float32", low_memory=True),
                M.MemoryOptions(vae_dtype="float32", low_memory=True, und_bits=4)]
    for case, make in TABLE_CASES.items():
        request = make()
        for measured, options in zip(rows[case], settings):
            est = M.estimate_peak_bytes(request, options) / GIB
            assert measured / TABLE_FACTOR <= est <= measured * TABLE_FACTOR, (case, options, est, measured)


def test_weights_are_the_documented_sizes():
    w = M.weight_bytes(M.MemoryOptions(vae_dtype="float32"))
    assert round(w.llm / GIB, 2) == 11.51 and round(w.vit / GIB, 2) == 1.25 and round(w.vae / GIB, 2) == 2.63
    four = M.weight_bytes(M.MemoryOptions(und_bits=4))
    assert 7.6 < four.llm / GIB < 8.0  # docs/memory.md: 7.79 GiB with the und expert in 4 bits
    assert M.weight_bytes(M.MemoryOptions(dtype="float32")).llm == 2 * w.llm


def test_monotone_in_size_frames_and_options():
    for options in (M.MemoryOptions(), M.MemoryOptions(low_memory=True, und_bits=4)):
        sizes = [M.estimate_peak_bytes(TextToImage(PROMPT, s, s), options) for s in (64, 256, 512, 768, 1024)]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
        frames = [M.estimate_peak_bytes(TextToVideo(PROMPT, n, 848, 480), options) for n in (5, 25, 49, 81, 121)]
        assert frames == sorted(frames) and frames[0] < frames[-1]
        wide = [M.estimate_peak_bytes(TextToVideo(PROMPT, 25, w, 480), options) for w in (480, 640, 848, 1024)]
        assert wide == sorted(wide)
    request = TextToVideo(PROMPT, 49, 848, 480)
    default, low = (M.estimate_peak_bytes(request, M.MemoryOptions(low_memory=b)) for b in (False, True))
    lean = M.estimate_peak_bytes(request, M.MemoryOptions(low_memory=True, und_bits=4))
    assert default > low > lean


def _suggestion(message):
    m = re.search(r"(--frames (\d+)|--width (\d+) --height (\d+)) would fit", message)
    assert m, message
    return m


def test_check_refuses_with_a_frame_count_that_fits():
    options = M.MemoryOptions(low_memory=True, und_bits=4)
    request = TextToVideo(PROMPT, 121, 848, 480)
    have = 12 * GIB
    with pytest.raises(InsufficientMemoryError) as e:
        M.check_memory(request, options, available=have)
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, InvalidRequestError) and e.value.exit_code == 2
    assert "needs about 20.7 GiB" in message and "12.0 GiB is available" in message and "--skip-memory-check" in message
    n = int(_suggestion(message)[2])
    assert M.estimate_peak_bytes(TextToVideo(PROMPT, n, 848, 480), options) <= have
    assert M.estimate_peak_bytes(TextToVideo(PROMPT, n + 4, 848, 480), options) > have  # the largest that fits


def test_image_to_video_hint_names_frames_then_resolution():
    options = M.MemoryOptions(low_memory=True, und_bits=4)
    request = ImageToVideo(PROMPT, _image(640, 640), 49, 640)
    need = M.estimate_peak_bytes(request, options)
    for have in (need - GIB // 4, M.estimate_peak_bytes(ImageToVideo(PROMPT, _image(640, 640), 5, 640), options) - 1):
        with pytest.raises(InsufficientMemoryError) as e:
            M.check_memory(request, options, available=have)
        m = re.search(r"--(frames|resolution) (\d+) would fit", str(e.value))
        assert m, str(e.value)
        frames, resolution = (int(m[2]), 640) if m[1] == "frames" else (5, int(m[2]))
        assert M.estimate_peak_bytes(ImageToVideo(PROMPT, _image(640, 640), frames, resolution), options) <= have
        assert (m[1] == "frames") == (have > need - GIB), m[0]  # fewer frames first, the resolution when none fit


def test_check_refuses_with_a_size_that_fits_and_hints_the_flags():
    request = TextToImage(PROMPT, 1024, 1024)
    lean = M.MemoryOptions(low_memory=True, und_bits=4)
    have = int(8.5 * GIB)
    with pytest.raises(InsufficientMemoryError) as e:
        M.check_memory(request, lean, available=have)
    m = _suggestion(str(e.value))
    w, h = int(m[3]), int(m[4])
    assert w == h and w < 1024 and w % 16 == 0
    assert M.estimate_peak_bytes(TextToImage(PROMPT, w, h), lean) <= have
    with pytest.raises(InsufficientMemoryError, match=r"with --low-memory --und-bits 4 it needs about 8\.9 GiB"):
        M.check_memory(request, M.MemoryOptions(), available=10 * GIB)
    assert M.check_memory(request, lean, available=9 * GIB) == M.estimate_peak_bytes(request, lean)


def test_available_memory(monkeypatch):
    monkeypatch.delenv(M.AVAILABLE_ENV, raising=False)
    assert M.available_memory_bytes() > 64 * 2**20
    monkeypatch.setenv(M.AVAILABLE_ENV, "12G")
    assert M.available_memory_bytes() == 12 * GIB
    monkeypatch.setenv(M.AVAILABLE_ENV, "1073741824")
    assert M.available_memory_bytes() == GIB


@pytest.fixture
def load_refused(monkeypatch):
    """Fail the test if a command gets as far as loading weights."""
    from lance_mlx.pipeline import LancePipeline

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(LancePipeline, "from_pretrained", refuse)


def _run(cmd, argv):
    try:
        return cmd.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_commands_exit_2_before_loading(converted, tmp_path, capsys, monkeypatch, load_refused):
    monkeypatch.setenv(M.AVAILABLE_ENV, "1M")
    monkeypatch.delenv(M.SKIP_ENV, raising=False)
    gen = ["--model", converted["image"], "--prompt", "a red fox", "--steps", "1", "--width", "32", "--height", "32",
           "--out", tmp_path / "a.png"]
    assert _run(cmd_generate, gen) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this t2i request needs about") and len(err.splitlines()) == 1
    assert "0.0 GiB is available" in err and not (tmp_path / "a.png").exists()
    Image.new("RGB", (40, 30)).save(tmp_path / "in.png")
    assert _run(cmd_caption, ["--model", converted["image"], "--image", tmp_path / "in.png"]) == 2
    assert "this x2t_image request needs about" in capsys.readouterr().err


def test_a_missing_folder_is_reported_before_the_estimate(tmp_path, capsys, monkeypatch, load_refused):
    monkeypatch.setenv(M.AVAILABLE_ENV, "1M")
    code = _run(cmd_generate, ["--model", tmp_path / "missing", "--prompt", "a fox", "--out", tmp_path / "a.png"])
    assert code == 2 and "model folder not found" in capsys.readouterr().err


def test_skipping_the_check(converted, tmp_path, capsys, monkeypatch, load_refused):
    monkeypatch.setenv(M.AVAILABLE_ENV, "1M")
    gen = ["--model", converted["image"], "--prompt", "a red fox", "--steps", "1", "--width", "32", "--height", "32",
           "--out", tmp_path / "a.png"]
    with pytest.raises(AssertionError, match="the model was loaded"):
        _run(cmd_generate, gen + ["--skip-memory-check"])
    monkeypatch.setenv(M.SKIP_ENV, "1")
    with pytest.raises(AssertionError, match="the model was loaded"):
        _run(cmd_generate, gen)


def test_tiny_checkpoints_are_estimated_by_their_own_geometry(converted):
    import argparse

    args = argparse.Namespace(model=str(converted["image"]), dtype="float32", compute_dtype=None, low_memory=False,
                              und_bits=None)
    options = M.options_for_model(args, "t2i")
    assert options.config.llm.hidden_size < 256 and options.vae_scale < 0.01
    assert M.estimate_peak_bytes(TextToImage(PROMPT, 32, 32), options) < 0.5 * GIB

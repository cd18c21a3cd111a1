"""--low-memory and --und-bits on the command line: the same images and answers, with the components held only
for their phase (the pipeline side is tested in test_solvers.py)."""

import numpy as np
from PIL import Image

from lance_mlx import cmd_caption, cmd_edit, cmd_generate, media


def _run(cmd, argv):
    code = cmd.main([str(a) for a in argv])
    assert code == 0


def test_low_memory_generates_the_same_image(converted, tmp_path, capsys):
    base = ["--model", converted["image"], "--prompt", "a red fox", "--steps", "2", "--width", "32", "--height", "32",
            "--dtype", "float32"]
    _run(cmd_generate, base + ["--out", tmp_path / "a.png"])
    _run(cmd_generate, base + ["--low-memory", "--out", tmp_path / "b.png"])
    _run(cmd_generate, base + ["--low-memory", "--und-bits", "8", "--out", tmp_path / "c.png"])
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b)
    assert c.shape == a.shape  # the und expert quantized: a valid image, results may differ a little


def test_low_memory_edit_and_caption(converted, tmp_path, capsys):
    rng = np.random.default_rng(1)
    media.save_image((rng.random((48, 48, 3)) * 255).astype(np.uint8), tmp_path / "in.png")
    base = ["--model", converted["image"], "--image", tmp_path / "in.png", "--instruction", "make it blue",
            "--steps", "1", "--dtype", "float32"]
    _run(cmd_edit, base + ["--out", tmp_path / "a.png"])
    _run(cmd_edit, base + ["--low-memory", "--out", tmp_path / "b.png"])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    capsys.readouterr()
    ask = ["--model", converted["image"], "--image", tmp_path / "in.png", "--max-tokens", "4", "--dtype", "float32"]
    _run(cmd_caption, ask)
    plain = capsys.readouterr().out
    _run(cmd_caption, ask + ["--low-memory"])
    assert capsys.readouterr().out == plain


def test_compute_dtype_on_the_command_line(converted, tmp_path, capsys):
    """bf16 weights computing in float32: a valid image, recorded in the metadata, closer to the float32 run than
    bf16 compute is."""
    import json

    base = ["--model", converted["image"], "--prompt", "a red fox", "--steps", "2", "--width", "32", "--height", "32"]
    _run(cmd_generate, base + ["--dtype", "float32", "--out", tmp_path / "f32.png"])
    _run(cmd_generate, base + ["--dtype", "bfloat16", "--out", tmp_path / "bf16.png"])
    _run(cmd_generate, base + ["--dtype", "bfloat16", "--compute-dtype", "float32", "--out", tmp_path / "mixed.png",
                               "--metadata-json"])
    meta = json.loads((tmp_path / "mixed.png.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["compute_dtype"] == "float32"
    f32, bf16, mixed = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("f32", "bf16", "mixed"))
    assert np.abs(mixed - f32).mean() <= np.abs(bf16 - f32).mean()

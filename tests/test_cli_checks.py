"""Every command-line script rejects bad values and output paths in-process, before any model loads."""

import numpy as np
import pytest

from fixtures import tree_hash
from lance_mlx import cmd_caption, cmd_edit, cmd_generate, media
from lance_mlx.errors import OutputError


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    media.save_image((rng.random((32, 48, 3)) * 255).astype(np.uint8), tmp_path / "in.png")
    media.save_video([(rng.random((32, 48, 3)) * 255).astype(np.uint8) for _ in range(5)], tmp_path / "in.mp4")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "MyPhotos").mkdir()
    (tmp_path / "MyPhotos" / "holiday.jpg").write_bytes(b"precious")
    (tmp_path / "mine.png").write_bytes(b"a user's file")
    return tmp_path


GEN = ["--prompt", "a red fox"]
CASES = [
    (cmd_generate, GEN + ["--steps", "0"], "--steps 0 is out of range"),
    (cmd_generate, GEN + ["--steps", "2000"], "--steps 2000 is out of range"),
    (cmd_generate, GEN + ["--cfg", "nan"], "finite"),
    (cmd_generate, GEN + ["--cfg", "inf"], "finite"),
    (cmd_generate, GEN + ["--cfg", "-4"], "out of range"),
    (cmd_generate, GEN + ["--timestep-shift", "0"], "timestep shift 0.0 is out of range"),
    (cmd_generate, GEN + ["--seed", "-1"], "--seed -1 is out of range"),
    (cmd_generate, GEN + ["--seed", str(2**70)], "out of range"),
    (cmd_generate, GEN + ["--cfg-interval", "0.9,0.1"], "is empty"),
    (cmd_generate, GEN + ["--renorm-min", "2"], "renorm"),
    (cmd_generate, GEN + ["--resolution", "-5"], "--resolution must be between"),
    (cmd_generate, GEN + ["--resolution", "0"], "--resolution must be between"),
    (cmd_generate, GEN + ["--width", "48"], "both --width and --height"),
    (cmd_generate, GEN + ["--frames", "9", "--fps", "0"], "--fps 0.0 is out of range"),
    (cmd_generate, GEN + ["--frames", "9", "--fps", "-12"], "out of range"),
    (cmd_generate, GEN + ["--frames", "9", "--fps", "1e9"], "out of range"),
    (cmd_generate, ["--prompt", "   "], "prompt is empty"),
    (cmd_edit, ["--image", "{d}/in.png", "--instruction", "x", "--cfg-img", "nan"], "finite"),
    (cmd_edit, ["--image", "{d}/in.png", "--instruction", "x", "--steps", "0"], "out of range"),
    (cmd_edit, ["--image", "{d}/in.png", "--instruction", "x", "--posterior-seed", "-1"], "posterior seed"),
    (cmd_caption, ["--image", "{d}/in.png", "--temperature", "-1"], "temperature"),
    (cmd_caption, ["--image", "{d}/in.png", "--top-p", "0"], "top-p"),
    (cmd_caption, ["--image", "{d}/in.png", "--max-tokens", "0"], "--max-tokens must be a positive"),
]


@pytest.mark.parametrize("cmd,args,message", CASES)
def test_bad_values_fail_before_loading(cmd, args, message, inputs, no_model, capsys):
    args = [a.format(d=inputs) for a in args]
    out = [] if cmd is cmd_caption else ["--out", str(inputs / ("o.mp4" if "--frames" in args else "o.png"))]
    before = tree_hash(inputs)
    with pytest.raises(SystemExit) as e:
        cmd.main(args + out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert tree_hash(inputs) == before


OUT_CASES = [
    (GEN, "a_file/x.png", "is a file"),
    (GEN, ".", "not an image name"),
    (GEN + ["--frames", "9"], ".", "refusing to write over"),
    (GEN + ["--frames", "9"], "..", "refusing to write over"),
    (GEN + ["--frames", "9"], "MyPhotos", "not an output of lance-mlx"),
    (GEN + ["--frames", "9", "--force"], "MyPhotos", "not an output of lance-mlx"),
    (GEN, "mine.png", "not an output of lance-mlx"),
    (GEN + ["--force"], "mine.png", "not an output of lance-mlx"),
    (GEN, "x.tiff", "not an image name"),
    (GEN + ["--frames", "9"], "x.avi", "not a video name"),
]


@pytest.mark.parametrize("args,out,message", OUT_CASES)
def test_output_paths_are_checked_first(args, out, message, inputs, no_model, capsys, monkeypatch):
    monkeypatch.chdir(inputs)
    before = tree_hash(inputs)
    with pytest.raises(SystemExit) as e:
        cmd_generate.main(args + ["--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert tree_hash(inputs) == before


def test_force_replaces_only_own_outputs(tmp_path):
    own = media.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "own.png", {"software": "lance-mlx"})
    with pytest.raises(OutputError, match="pass --force"):
        media.check_output(own, ("image",))
    assert media.check_output(own, ("image",), force=True) == own
    own_meta = {"software": "lance-mlx"}
    frames = media.save_video([np.zeros((8, 8, 3), np.uint8)] * 2, tmp_path / "frames", metadata=own_meta)
    assert media.is_own_output(frames)
    media.save_video([np.ones((8, 8, 3), np.uint8)] * 3, media.check_output(frames, ("frames",), force=True),
                     metadata={"software": "lance-mlx"}, replace=True)
    assert len(list(frames.iterdir())) == 3 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    clip = media.save_video([np.zeros((16, 16, 3), np.uint8)] * 2, tmp_path / "c.mp4", metadata=own_meta)
    assert media.is_own_output(clip)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "frame_00000.png").write_bytes(b"user data")
    with pytest.raises(OutputError, match="not an output"):
        media.check_output(tmp_path / "user", ("frames",), force=True)
    assert media.free_path(own).name == "own-1.png"

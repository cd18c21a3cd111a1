"""A file the user saves under an output's name while a run is working is never replaced: the result goes to a
free name, the run says where and exits 1. Unit cases on `media.atomic_output` / `publish`, then whole runs."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures import run_cli, tree_hash
from lance_mlx import cmd_generate, media, publish
from lance_mlx.errors import OutputTakenError

ROOT = Path(__file__).resolve().parent.parent
USER = b"the user's own file, saved while the run was working"
OURS = {"software": "lance-mlx", "prompt": "a fox"}


def _image():
    return (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)


def partials(folder):
    return [p.name for p in Path(folder).rglob("*") if ".partial" in p.name or p.name.endswith(".old")]


@pytest.fixture(params=["system rename", "fallback"])
def renames(request, monkeypatch):
    """Each case runs with the system's no-replace / exchange renames and with the portable fallbacks (hard link,
    mkdir claim, move aside) that systems without them use."""
    if request.param == "fallback":
        monkeypatch.setattr(publish, "_RENAME", None)
    elif publish._RENAME is None:
        pytest.skip("this system has no flagged rename")
    return request.param


def _user_saves(path):
    """What a user's program does: write a file under `path` (a folder with a file in it for suffix-less names)."""
    path = Path(path)
    if path.suffix:
        path.write_bytes(USER)
    else:
        path.mkdir()
        (path / "frame_00000.png").write_bytes(USER)


def _user_file_intact(path):
    path = Path(path)
    return (path / "frame_00000.png" if not path.suffix else path).read_bytes() == USER


# ---------------------------------------------------------------------------------------------- atomic_output
@pytest.mark.parametrize("name,is_dir", [("x.png", False), ("frames", True), ("x.png.json", False)])
def test_a_name_taken_inside_the_block_is_left_alone(name, is_dir, tmp_path, renames):
    dest = tmp_path / name
    with pytest.raises(OutputTakenError) as e:
        with media.atomic_output(dest, is_dir=is_dir) as tmp:
            (tmp / "frame_00000.png" if is_dir else tmp).write_bytes(b"result")
            _user_saves(dest)
    saved = tmp_path / {"x.png": "x-1.png", "frames": "frames-1", "x.png.json": "x.png-1.json"}[name]
    assert _user_file_intact(dest)
    assert e.value.saved == saved and str(saved) in str(e.value) and "\n" not in str(e.value)
    assert (saved / "frame_00000.png" if is_dir else saved).read_bytes() == b"result"
    assert partials(tmp_path) == []
    assert e.value.exit_code == 1


@pytest.mark.parametrize("replace", [False, True])
def test_a_name_taken_just_before_the_rename_is_left_alone(replace, tmp_path, monkeypatch, renames):
    """The last moment: the user's file appears after every check, as the finished output is being renamed."""
    real = publish.rename_noreplace
    dest = tmp_path / "x.json"

    def late(src, dst):
        if Path(dst) == dest and not dest.exists():
            _user_saves(dest)
        real(src, dst)

    monkeypatch.setattr(publish, "rename_noreplace", late)
    with pytest.raises(OutputTakenError, match="x-1.json"):
        media.save_metadata_json(OURS, dest, replace=replace)
    assert _user_file_intact(dest) and json.loads((tmp_path / "x-1.json").read_text()) == OURS
    assert partials(tmp_path) == []


@pytest.mark.parametrize("name", ["x.png", "frames", "x.json"])
def test_without_replace_even_an_earlier_output_is_kept(name, tmp_path, renames):
    """Without --force nothing that exists is replaced, not even an earlier output of this tool (the user may
    have saved one under this name during the run)."""
    dest = tmp_path / name
    write = {"x.png": lambda p: media.save_image(_image(), p, OURS),
             "frames": lambda p: media.save_video([_image()] * 2, p, metadata=OURS),
             "x.json": lambda p: media.save_metadata_json(OURS, p)}[name]
    write(dest)
    before = tree_hash(dest) if dest.is_dir() else dest.read_bytes()
    with pytest.raises(OutputTakenError, match=str(media.free_path(dest))):
        write(dest)
    assert (tree_hash(dest) if dest.is_dir() else dest.read_bytes()) == before and partials(tmp_path) == []


@pytest.mark.parametrize("name", ["x.png", "frames", "x.json"])
def test_replace_swaps_an_earlier_output_without_leftovers(name, tmp_path, renames):
    dest = tmp_path / name
    if name == "frames":
        media.save_video([_image()] * 3, dest, metadata=OURS)
        media.save_video([_image()] * 2, dest, metadata=OURS, replace=True)
        assert sorted(p.name for p in dest.iterdir()) == ["frame_00000.png", "frame_00001.png"]
    elif name == "x.png":
        media.save_image(_image()[:8], dest, OURS)
        media.save_image(_image(), dest, OURS, replace=True)
        assert Image.open(dest).size == (24, 16)
    else:
        media.save_metadata_json({**OURS, "n": 1}, dest)
        media.save_metadata_json({**OURS, "n": 2}, dest, replace=True)
        assert json.loads(dest.read_text())["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("name", ["x.png", "frames"])
def test_an_earlier_output_saved_over_at_the_swap_is_kept(name, tmp_path, monkeypatch, renames):
    """--force, and the earlier output is ours when checked; the user saves over it in the instant before the
    swap. The swap is undone (or, without an exchange rename, the old one is checked again once moved aside)."""
    dest = tmp_path / name
    if name == "frames":
        media.save_video([_image()] * 2, dest, metadata=OURS)
    else:
        media.save_image(_image(), dest, OURS)
    real = publish.exchange

    def user_first(a, b):
        if name == "frames":
            for p in Path(b).iterdir():
                p.unlink()
            (Path(b) / "frame_00000.png").write_bytes(USER)
        else:
            Path(b).write_bytes(USER)
        return real(a, b)

    monkeypatch.setattr(publish, "exchange", user_first)
    with pytest.raises(OutputTakenError, match=f"{name.replace('.png', '')}-1"):
        if name == "frames":
            media.save_video([_image()] * 3, dest, metadata=OURS, replace=True)
        else:
            media.save_image(_image(), dest, OURS, replace=True)
    assert _user_file_intact(dest) and partials(tmp_path) == []
    saved = {"x.png": "x-1.png", "frames": "frames-1"}[name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, saved])


def test_a_users_empty_folder_is_not_replaced_by_frames(tmp_path, renames):
    dest = tmp_path / "frames"
    with pytest.raises(OutputTakenError, match="frames-1"):
        with media.atomic_output(dest, is_dir=True) as tmp:
            (tmp / "frame_00000.png").write_bytes(b"result")
            dest.mkdir()
    assert dest.is_dir() and list(dest.iterdir()) == []


def test_rename_noreplace_never_replaces(tmp_path, monkeypatch, renames):
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("user")
    with pytest.raises(FileExistsError):
        publish.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "user" and (tmp_path / "a").read_text() == "new"
    (tmp_path / "d").mkdir()
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError):
        publish.rename_noreplace(tmp_path / "d", tmp_path / "e")
    assert (tmp_path / "d").is_dir() and (tmp_path / "e").is_dir()
    publish.rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "new" and not (tmp_path / "a").exists()


def test_file_systems_without_hard_links(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "_RENAME", None)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(publish.os, "link", no_links)
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("user")
    with pytest.raises(FileExistsError):
        publish.rename_noreplace(tmp_path / "a", tmp_path / "b")
    publish.rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "b").read_text() == "user" and (tmp_path / "c").read_text() == "new"


# ------------------------------------------------------------------------------------------------- whole runs
GEN = ["--prompt", "a red fox", "--steps", "1", "--dtype", "float32"]
SIZE = ["--width", "32", "--height", "32"]
VIDEO = ["--frames", "5", "--width", "32", "--height", "32"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    (tmp_path / "notes.json").write_text('{"mine": true}')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _save_while_denoising(monkeypatch, *paths):
    """The user saves files under `paths` while the model denoises (after every check before loading)."""
    import lance_mlx.cli as cli

    real = cli.run_steps

    def steps(*a, **k):
        for p in paths:
            _user_saves(p)
        return real(*a, **k)

    monkeypatch.setattr(cli, "run_steps", steps)


def _one_error_line(err, free):
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(free) in lines[-1] and "Traceback" not in err, err
    assert not any(line.startswith("saved ") for line in lines), err


@pytest.mark.parametrize("out,kind", [("x.png", "image"), ("v.mp4", "video"), ("frames", "video")])
def test_a_file_saved_under_out_during_the_run_survives(out, kind, converted, work, monkeypatch, capsys):
    _save_while_denoising(monkeypatch, work / out)
    size = VIDEO if kind == "video" else SIZE
    code, err = run_cli(cmd_generate, ["--model", converted[kind]] + GEN + size + ["--out", out], capsys)
    saved = Path(out).with_name(f"{Path(out).stem}-1{Path(out).suffix}")
    assert code == 1 and _user_file_intact(work / out)
    _one_error_line(err, saved)
    assert media.is_own_output(work / saved) and partials(work) == []


def test_a_file_saved_under_the_sidecar_name_survives(converted, work, monkeypatch, capsys):
    _save_while_denoising(monkeypatch, work / "x.png.json")
    code, err = run_cli(cmd_generate, ["--model", converted["image"]] + GEN + SIZE
                        + ["--out", "x.png", "--metadata-json"], capsys)
    assert code == 1 and _user_file_intact(work / "x.png.json")
    _one_error_line(err, "x.png-1.json")
    assert json.loads((work / "x.png-1.json").read_text())["output"] == "x.png"
    assert media.is_own_output(work / "x.png") and partials(work) == []


def test_when_both_are_taken_the_sidecar_names_the_saved_output(converted, work, monkeypatch, capsys):
    _save_while_denoising(monkeypatch, work / "x.png", work / "meta.json")
    code, err = run_cli(cmd_generate, ["--model", converted["image"]] + GEN + SIZE
                        + ["--out", "x.png", "--metadata-json", "meta.json"], capsys)
    assert code == 1 and _user_file_intact(work / "x.png") and _user_file_intact(work / "meta.json")
    _one_error_line(err, "x-1.png")
    assert "meta-1.json" in err.strip().splitlines()[-1]
    assert json.loads((work / "meta-1.json").read_text())["output"] == "x-1.png"


def test_force_never_replaces_a_file_saved_over_the_earlier_output(converted, work, monkeypatch, capsys):
    argv = ["--model", converted["image"]] + GEN + SIZE + ["--out", "x.png"]
    assert run_cli(cmd_generate, argv, capsys)[0] == 0 and media.is_own_output(work / "x.png")
    _save_while_denoising(monkeypatch, work / "x.png")  # over the earlier output, which --force would replace
    code, err = run_cli(cmd_generate, argv + ["--force"], capsys)
    assert code == 1 and _user_file_intact(work / "x.png")
    _one_error_line(err, "x-1.png")


def test_the_command_line_script_exits_1_naming_a_free_path(converted, work):
    """inference.py in its own process; a small wrapper makes the user's save happen while it denoises."""
    before = tree_hash(work)
    wrapper = ("import runpy, sys, lance_mlx.cli as c\n"
               "real = c.run_steps\n"
               "def steps(*a, **k):\n"
               "    open('x.png', 'wb').write(%r)\n"
               "    return real(*a, **k)\n"
               "c.run_steps = steps\n"
               "sys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n") % USER
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", wrapper, str(ROOT / "inference.py"), "--model", str(converted["image"]),
                        *GEN, *SIZE, "--out", "x.png"], cwd=work, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stderr
    _one_error_line(r.stderr, "x-1.png")
    assert (work / "x.png").read_bytes() == USER and media.is_own_output(work / "x-1.png")
    assert sorted(p.name for p in work.iterdir()) == ["notes.json", "x-1.png", "x.png"] and before != tree_hash(work)


def test_an_earlier_output_removed_at_the_swap_is_simply_replaced(tmp_path, monkeypatch, renames):
    dest = media.save_image(_image()[:8], tmp_path / "x.png", OURS)
    real = publish.exchange

    def user_removes_first(a, b):
        Path(b).unlink()
        return real(a, b)

    monkeypatch.setattr(publish, "exchange", user_removes_first)
    media.save_image(_image(), dest, OURS, replace=True)
    assert Image.open(dest).size == (24, 16) and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]

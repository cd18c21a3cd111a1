"""convert.py when writing fails: a disk that fills up mid-write (MLX reports it as a RuntimeError) and a
destination taken while converting. One line, exit 1, the staging folder removed, nothing of the user's touched."""

import json
import shutil

import mlx.core as mx
import pytest

import tiny_checkpoints as tiny
from fixtures import run_cli, small_disk, tree_hash
from lance_mlx import cmd_convert, conversion
from lance_mlx.conversion import ConversionOptions, convert


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return tiny.write_tiny_upstream_root(tmp_path_factory.mktemp("up_image"))


def one_line(err, *parts):
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[-1], err
    return lines[-1]


def _mlx_write_fails(monkeypatch, free_after):
    """`mx.save_safetensors` fails on the first LLM shard the way MLX does on a full disk (a partial file and
    "[write] Unable to write N bytes to file."); the disk then reports `free_after` bytes free."""
    real_save, real_usage = mx.save_safetensors, shutil.disk_usage
    failed = []

    def save(path, tensors, metadata=None):
        if "model-" not in str(path):
            return real_save(path, tensors, metadata=metadata)
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        failed.append(path)
        raise RuntimeError("[write] Unable to write 334556 bytes to file.")

    def usage(path):
        u = real_usage(path)
        return u._replace(free=free_after) if failed else u

    monkeypatch.setattr(conversion.mx, "save_safetensors", save)
    monkeypatch.setattr(conversion.shutil, "disk_usage", usage)


def test_disk_full_reported_by_mlx_is_one_line(image_root, tmp_path, monkeypatch, capsys):
    _mlx_write_fails(monkeypatch, free_after=0)
    dest = tmp_path / "out"
    code, err = run_cli(cmd_convert, ["--model", image_root, "--out", dest, "--dtype", "float32"], capsys)
    assert code == 1
    line = one_line(err, f"no space left on {tmp_path}", "needs about 0.0", "GB", "nothing was saved")
    assert "out" in line and list(tmp_path.iterdir()) == []  # no destination, no staging folder


def test_other_write_failures_are_one_line_too(image_root, tmp_path, monkeypatch, capsys):
    _mlx_write_fails(monkeypatch, free_after=10**12)  # room enough: an I/O error, not a full disk
    dest = tmp_path / "out"
    code, err = run_cli(cmd_convert, ["--model", image_root, "--out", dest, "--dtype", "float32"], capsys)
    assert code == 1
    one_line(err, "conversion failed", "Unable to write", f"{dest} was left unchanged")
    assert list(tmp_path.iterdir()) == []



def test_a_real_disk_that_fills_up_while_converting(image_root, tmp_path, monkeypatch, capsys):
    """A 16 MB disk, the free-space check passed (as when something else fills the disk while converting)."""
    monkeypatch.setattr(conversion, "_check_disk", lambda dest, needed: None)
    with small_disk(tmp_path / "disk", "16m") as disk:
        if disk is None:  # no mount allowed here: MLX's failure injected instead
            _mlx_write_fails(monkeypatch, free_after=0)
        (tmp_path / "disk" / "mine.txt").write_text("keep me")
        argv = ["--model", image_root, "--out", tmp_path / "disk" / "out", "--dtype", "float32"]
        code, err = run_cli(cmd_convert, argv, capsys)
        assert code == 1
        one_line(err, f"no space left on {tmp_path / 'disk'}", "needs about")
        assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["mine.txt"]


def _user_makes_folder_while_converting(monkeypatch, dest, replace_earlier=False):
    real = conversion.write_tokenizer_and_config

    def write(plan, out):
        if replace_earlier:
            shutil.rmtree(dest)
        (dest / "photos").mkdir(parents=True)
        (dest / "photos" / "cat.jpg").write_bytes(b"precious")
        return real(plan, out)

    monkeypatch.setattr(conversion, "write_tokenizer_and_config", write)


@pytest.mark.parametrize("force", [False, True])
def test_a_destination_taken_while_converting_is_left_alone(force, image_root, tmp_path, monkeypatch, capsys):
    dest = tmp_path / "out"
    if force:  # an earlier conversion, which --force would replace; the user puts their own folder there
        convert(image_root, dest, options=ConversionOptions(dtype="float32"), progress=False, log=lambda m: None)
    _user_makes_folder_while_converting(monkeypatch, dest, replace_earlier=force)
    code, err = run_cli(cmd_convert, ["--model", image_root, "--out", dest, *(["--force"] if force else [])], capsys)
    assert code == 1
    one_line(err, f"{dest} was created or changed", f"saved as {tmp_path / 'out-1'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out-1"]
    assert (dest / "photos" / "cat.jpg").read_bytes() == b"precious" and len(tree_hash(dest)) > 0
    assert sorted(p.name for p in dest.iterdir()) == ["photos"]
    assert json.loads((tmp_path / "out-1" / "config.json").read_text())["mlx_layout"] is True


def test_force_still_replaces_an_earlier_conversion(image_root, tmp_path):
    dest = tmp_path / "out"
    convert(image_root, dest, options=ConversionOptions(dtype="float32"), progress=False, log=lambda m: None)
    convert(image_root, dest, options=ConversionOptions(dtype="float16", force=True), progress=False,
            log=lambda m: None)
    assert json.loads((dest / "config.json").read_text())["conversion"]["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

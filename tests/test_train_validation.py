"""Validation outputs of a training run: per-prompt images plus one grid per step, written atomically."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


class FakePipe:
    """generate_image / edit_image / understand of a LancePipeline, without a model: each seed its own colour."""

    def __init__(self, sizes=None):
        self.sizes = sizes or {}

    def generate_image(self, prompt, width, height, sampling):
        w, h = self.sizes.get(prompt, (width, height))
        return Image.new("RGB", (w, h), COLORS[sampling.seed - 42])

    def edit_image(self, image, prompt, sampling):
        with Image.open(image) as im:
            return Image.new("RGB", im.size, COLORS[sampling.seed - 42])

    def understand(self, image, prompt):
        return f"an answer to {prompt}"


def _args(tmp_path, task="t2i", prompts=("a cat", "a dog", "a hen"), images=()):
    return argparse.Namespace(out=tmp_path / "run", validation_prompt=list(prompts), validation_steps=2,
                              validation_seed=42, task=task, resolution=64, validation_image=list(images))


def _tile(grid, col, row, cw, ch):
    return grid.getpixel((col * cw + cw // 2, row * ch + ch // 2))


def test_grid_holds_the_images_in_prompt_order(tmp_path):
    from lance_mlx.media import is_own_output
    from lance_mlx.train.cli import make_validation

    run = make_validation(FakePipe(), _args(tmp_path))
    paths = run(3)
    folder = tmp_path / "run" / "validation"
    grid_path = folder / "step_0000003.png"
    assert paths == [folder / f"step_0000003_{k}.png" for k in range(3)] + [grid_path]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)  # no partial files left
    with Image.open(grid_path) as g:
        assert g.size == (128, 128)  # 3 images of 64²: 2 columns, 2 rows
        assert [_tile(g, c, r, 64, 64) for r, c in ((0, 0), (0, 1), (1, 0))] == COLORS[:3]
        assert _tile(g, 1, 1, 64, 64) == (0, 0, 0)  # the empty cell
        assert json.loads(g.text["prompts"]) == ["a cat", "a dog", "a hen"] and g.text["step"] == "3"
    assert is_own_output(grid_path) and is_own_output(paths[0])
    for k in range(3):
        with Image.open(paths[k]) as im:
            assert im.getpixel((0, 0)) == COLORS[k]


def test_grid_of_differently_sized_images(tmp_path):
    """Edit outputs keep their sources' aspect: each sits centred in a cell of the largest width and height."""
    from lance_mlx.train.validation import image_grid

    ims = [Image.new("RGB", s, c) for s, c in zip([(40, 20), (20, 30), (10, 10), (30, 30), (40, 30)], COLORS)]
    g = image_grid(ims)
    assert g.size == (3 * 40, 2 * 30)
    assert [_tile(g, k % 3, k // 3, 40, 30) for k in range(5)] == COLORS
    assert g.getpixel((0, 0)) == (0, 0, 0)  # around the 40x20 image, centred vertically in its 40x30 cell
    a = np.asarray(image_grid([Image.new("RGB", (8, 4), (9, 9, 9))] * 2, columns=1))
    assert a.shape == (8, 8, 3) and (a == 9).all()


def test_edit_validation_grid(tmp_path):
    from lance_mlx.train.cli import make_validation

    srcs = []
    for k, size in enumerate([(64, 48), (48, 64)]):
        srcs.append(tmp_path / f"src{k}.png")
        Image.new("RGB", size).save(srcs[-1])
    make_validation(FakePipe(), _args(tmp_path, "edit", ("make it red", "make it green"), srcs))(5)
    with Image.open(tmp_path / "run" / "validation" / "step_0000005.png") as g:
        assert g.size == (128, 64)
        assert [_tile(g, c, 0, 64, 64) for c in range(2)] == COLORS[:2]


def test_resumed_step_replaces_its_own_grid_only(tmp_path):
    """A resumed run repeating a step replaces the grid it wrote; a file of the user's under that name is kept."""
    from lance_mlx.errors import OutputTakenError
    from lance_mlx.train.cli import make_validation

    run = make_validation(FakePipe(), _args(tmp_path))
    run(2)
    run(2)  # the same step again, as after --resume from an earlier checkpoint
    grid = tmp_path / "run" / "validation" / "step_0000004.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(grid)  # the user's own picture
    with pytest.raises(OutputTakenError):
        run(4)
    with Image.open(grid) as im:
        assert im.size == (5, 5) and im.getpixel((0, 0)) == (1, 2, 3)


def test_failed_grid_write_leaves_nothing(tmp_path, monkeypatch):
    from lance_mlx.train import validation as V

    def broken(*a, **k):
        raise OSError("disk went away")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError):
        V.save_validation_grid([Image.new("RGB", (4, 4))], ["p"], tmp_path / "step_0000001.png", 1)
    assert list(tmp_path.iterdir()) == []


def test_understanding_validation_has_no_grid(tmp_path):
    from lance_mlx.train.cli import make_validation

    src = tmp_path / "src.png"
    Image.new("RGB", (32, 32)).save(src)
    paths = make_validation(FakePipe(), _args(tmp_path, "i2t", ("what is it?",), [src]))(1)
    assert [p.name for p in paths] == ["step_0000001_0.txt"]
    assert paths[0].read_text() == "an answer to what is it?\n"

"""Shared tiny checkpoints, built once per test session (tests must not modify them)."""

import pytest

from fixtures import write_golden_lance_folder
from tiny_checkpoints import tiny_pipeline, write_tiny_upstream_root


@pytest.fixture(scope="session")
def upstream_root(tmp_path_factory):
    """The hub layout with both LLM checkpoints: Lance_3B/, Lance_3B_Video/, Qwen2.5-VL-ViT/, Wan2.2_VAE.pth."""
    root = write_tiny_upstream_root(tmp_path_factory.mktemp("upstream"))
    write_golden_lance_folder(root / "Lance_3B_Video")  # the same tiny LLM under the video checkpoint's name
    return root


@pytest.fixture(scope="session")
def converted(upstream_root, tmp_path_factory):
    """convert.py folders (float32) of both checkpoints: {"image": path, "video": path}."""
    from lance_mlx.conversion import ConversionOptions, convert

    d = tmp_path_factory.mktemp("converted")
    return {kind: convert(upstream_root, d / kind, options=ConversionOptions(video=kind == "video", dtype="float32"),
                          progress=False, log=lambda m: None) for kind in ("image", "video")}


@pytest.fixture(scope="session")
def tiny_pipe():
    """An in-memory LancePipeline of the golden tiny model (real tokenizer, tiny ViT, random tiny VAE)."""
    return tiny_pipeline()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: for checks that must happen before any weights load."""
    from lance_mlx.pipeline import LancePipeline

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(LancePipeline, "from_pretrained", refuse)

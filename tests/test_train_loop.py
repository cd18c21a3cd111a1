"""The training loop and command: overfitting a tiny set, resume = uninterrupted run, clean stop, input checks."""

import json
import os
import signal

import numpy as np
import pytest
from PIL import Image


def _images(folder, n=4, size=(64, 64), suffix="", seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}{suffix}.png")
        if not suffix:
            (folder / f"im{i}.txt").write_text(f"a tiny test picture number {i}")
    return folder


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    from lance_mlx.train import data as D
    from tiny_checkpoints import tiny_pipeline

    d = _images(tmp_path_factory.mktemp("data"))
    return D.cache_features(D.find_items(d, "t2i"), "t2i", tiny_pipeline(), d / "cache", 128, 112)


def _trainer(features, out, **kw):
    from lance_mlx.train import loop
    from tiny_checkpoints import tiny_pipeline

    s = loop.Settings(**{"task": "t2i", "steps": 4, "lr": 1e-2, "warmup": 1, "rank": 4, "alpha": 4.0,
                         "save_every": 2, "batch_size": 2, "checkpointing": True, **kw})
    return loop.Trainer(tiny_pipeline(), features, s, out, {"data_hash": "test"}, log=lambda m: None)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def test_overfit_lowers_the_loss(features, tmp_path):
    """16 steps on 4 images lower the loss at fixed timesteps and noise by at least 1.3x."""
    from lance_mlx.train import objective as O

    tr = _trainer(features, tmp_path / "run", steps=16, batch_size=4, text_drop=0.0, checkpointing=False,
                  save_every=100, seed=1)

    def fixed_loss():
        exs, drs = tr.examples(10**6, 0, [0, 1, 2, 3])  # a step index the run never reaches: fixed draws
        return float(O.losses(tr.model, O.pack(tr.model, exs, drs)).loss.item())

    before = fixed_loss()
    result = tr.run(progress=False)
    after = fixed_loss()
    assert result["step"] == 16 and result["stopped"] is None
    assert before / after >= 1.3, (before, after)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert len(_losses(tmp_path / "run")) == 16


def test_resume_continues_the_same_curve(features, tmp_path):
    """An uninterrupted 4-step run equals a run stopped by SIGTERM after step 2 and resumed (bit-equal on CPU)."""
    import mlx.core as mx

    from lance_mlx import lora as L

    full = _trainer(features, tmp_path / "full", checkpointing=False)
    full.run(progress=False)

    part = _trainer(features, tmp_path / "part", validate_every=2, checkpointing=False)
    part.validation = lambda step: os.kill(os.getpid(), signal.SIGTERM)
    r = part.run(progress=False)
    assert r["stopped"] == signal.SIGTERM and r["step"] == 2 and r["adapter"] is None
    assert not (tmp_path / "part" / L.ADAPTER_WEIGHTS).exists()  # no final adapter for a stopped run

    resumed = _trainer(features, tmp_path / "part", checkpointing=False)
    resumed.resume(r["checkpoint"])
    assert resumed.step == 2
    resumed.run(progress=False)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a = mx.load(str(tmp_path / "full" / L.ADAPTER_WEIGHTS))
    b = mx.load(str(tmp_path / "part" / L.ADAPTER_WEIGHTS))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))
    meta = json.loads((tmp_path / "full" / L.ADAPTER_CONFIG).read_text())["lance_mlx"]
    assert meta["steps"] == 4 and meta["task"] == "t2i" and meta["data_hash"] == "test"


def test_examples_edit_and_understanding(tmp_path):
    """Edit examples carry the ViT block and source latents (or drop them), i2t examples their answer labels."""
    import random

    import mlx.core as mx

    from lance_mlx.sequence import IM_END
    from lance_mlx.train import data as D
    from tiny_checkpoints import tiny_pipeline

    d = _images(tmp_path / "e", n=1)
    _images(tmp_path / "e", n=1, suffix="_target", seed=1)
    pipe = tiny_pipeline()
    f = D.cache_features(D.find_items(d, "edit"), "edit", pipe, tmp_path / "c", 128, 112)[0]
    ex = D.build_example(f, "edit", random.Random(0), mx.random.key(0), text_drop=0.0, vision_drop=0.0)
    assert [s.attn for s in ex.seq.splits].count("full") == 1 and "full_noise" in ex.seq.attn_modes
    ex = D.build_example(f, "edit", random.Random(0), mx.random.key(0), text_drop=0.0, vision_drop=1.0 - 1e-9)
    assert "full" not in ex.seq.attn_modes and "full_noise" not in ex.seq.attn_modes
    ex = D.build_example(f, "t2i", random.Random(0), mx.random.key(0), text_drop=1.0 - 1e-9)
    assert 0 not in ex.seq.modality  # the caption is gone (CFG drop)

    u = _images(tmp_path / "u", n=1)
    g = D.cache_features(D.find_items(u, "i2t"), "i2t", pipe, tmp_path / "c2", 128, 112)[0]
    ex = D.build_example(g, "i2t", random.Random(0), mx.random.key(0), prompts=D.understanding_prompts(pipe.tokenizer))
    assert ex.labels[-1] == IM_END and ex.labels[:-1].tolist() == g.text_ids.tolist()
    assert (ex.seq.input_ids[ex.ce_index + 1] == ex.labels).all()


def _run_cli(argv):
    from lance_mlx.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.parametrize("problem", ["no-data", "no-caption", "empty-caption", "corrupt-image", "out-not-empty",
                                     "resolution",
                                     "edit-no-target", "validation", "resume-missing"])
def test_cli_checks_inputs_before_loading(problem, tmp_path, no_model, capsys):
    data = _images(tmp_path / "data", n=2)
    args = ["--data", str(data), "--out", str(tmp_path / "run")]
    if problem == "no-data":
        args[1] = str(tmp_path / "nothing")
    elif problem == "no-caption":
        (data / "im0.txt").unlink()
    elif problem == "empty-caption":
        (data / "im1.txt").write_text("  \n")
    elif problem == "corrupt-image":
        (data / "im1.png").write_bytes(b"not a png")
    elif problem == "out-not-empty":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "mine.txt").write_text("keep")
    elif problem == "resolution":
        args += ["--resolution", "500"]
    elif problem == "edit-no-target":
        args += ["--task", "edit"]
    elif problem == "validation":
        args += ["--validate-every", "10"]
    elif problem == "resume-missing":
        args += ["--resume"]
    assert _run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    if problem == "out-not-empty":
        assert (tmp_path / "run" / "mine.txt").read_text() == "keep"


def test_parquet_data(tmp_path):
    """Upstream's local parquet layout (caption + image bytes) reads as items; a wrong layout is one clear error."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lance_mlx.errors import LanceError
    from lance_mlx.train import data as D

    def png(seed):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    pq.write_table(pa.table({"caption": ["a fox", "a hen"], "image_bytes": [png(0), png(1)]}), tmp_path / "t.parquet")
    items = D.find_items(tmp_path / "t.parquet", "t2i")
    assert [i.text for i in items] == ["a fox", "a hen"] and isinstance(items[0].image, bytes)
    assert D.open_image(items[1].image).size == (56, 40)
    pq.write_table(pa.table({"caption": ["x"], "input_image_bytes": [png(2)], "output_image_bytes": [b"junk"]}),
                   tmp_path / "e.parquet")
    with pytest.raises(LanceError, match="row000000"):
        D.find_items(tmp_path / "e.parquet", "edit")
    with pytest.raises(LanceError, match="lacks the column"):
        D.find_items(tmp_path / "t.parquet", "edit")


def test_cli_end_to_end(upstream_root, tmp_path, capsys):
    """Cache, train, validate, write the adapter; then continue with --resume; the adapter works with --lora."""
    from lance_mlx.train.cli import main

    data = _images(tmp_path / "data", n=2)
    out = tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--model", str(upstream_root), "--dtype", "float32",
              "--resolution", "128", "--rank", "2", "--warmup", "1", "--save-every", "2"]
    assert main(common + ["--steps", "2", "--validate-every", "2", "--validation-prompt", "a cat",
                          "--validation-steps", "2"]) == 0
    assert (out / "validation" / "step_0000002_0.png").is_file()
    assert (out / "validation" / "step_0000002.png").is_file()  # the step's grid
    assert (out / "adapter_config.json").is_file() and len(_losses(out)) == 2
    assert main(common + ["--steps", "3", "--resume"]) == 0
    assert len(_losses(out)) == 3
    assert "resuming at step 2" in capsys.readouterr().err

    from lance_mlx.cmd_generate import main as generate

    assert generate(["--prompt", "a cat", "--model", str(upstream_root), "--dtype", "float32", "--width", "64",
                     "--height", "64", "--steps", "1", "--lora", f"{out}:0.5", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()

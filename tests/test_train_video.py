"""Video training: data layouts and checks, upstream's clip sampling, cached features, examples, a short overfit and
resume on tiny weights, and the command's checks (every bad input one line, exit 2, before any weights load)."""

import json
import os
import random
import signal

import numpy as np
import pytest


def _clip(path, n=24, fps=24, size=(48, 64), seed=0):
    """A tiny video of `n` random frames (h, w = size) written by the project's writer."""
    from lance_mlx import media

    rng = np.random.default_rng(seed)
    frames = [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]
    path.unlink(missing_ok=True)  # a test replacing its own clip
    return media.save_video(frames, path, fps=fps)


def _clips(folder, n=2, suffix="", text=True, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _clip(folder / f"v{i}{suffix}.mp4", seed=i + (10 if suffix else 0), **kw)
        if text:
            (folder / f"v{i}.txt").write_text(f"a tiny test clip number {i}")
    return folder


def _settings(task, **kw):
    from lance_mlx.train.video_data import ClipSettings

    return ClipSettings(task, **kw)


def test_clip_sampling_is_upstreams():
    """12 fps over the whole video, 4k+1 frames, capped by --num-frames and the task's upstream duration."""
    s = _settings("t2v")  # 17 frames, 12 fps
    assert s.count(24, 24) == 9  # 1 s: 12 frames -> 9
    assert s.count(120, 24) == 17  # 5 s, capped by 17 frames
    assert _settings("t2v", num_frames=69).count(24 * 10, 24) == 69  # upstream's 6 s
    assert _settings("v2t", num_frames=69).count(24 * 10, 24) == 21  # upstream's v2t 2 s: 24 -> 21
    assert _settings("t2v", num_frames=9, fps=8).count(240, 30) == 9
    with pytest.raises(ValueError, match="too short"):
        s.count(1, 30)


def test_read_clip_takes_the_sampled_frames(tmp_path):
    from lance_mlx.train.video_data import read_clip

    frames = read_clip(_clip(tmp_path / "a.mp4", n=24), "a", _settings("t2v"))
    assert frames.shape == (9, 48, 64, 3) and frames.dtype == np.uint8
    # the same clip spread over the whole video at a given count (video-edit pairs)
    assert read_clip(tmp_path / "a.mp4", "a", _settings("t2v"), count=5).shape[0] == 5
    gif = _clip(tmp_path / "b.gif", n=12, fps=12)
    assert read_clip(gif.read_bytes(), "row", _settings("t2v")).shape[0] == 9  # parquet bytes, a GIF


def test_layouts_folder_manifest_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lance_mlx.train import video_data as V

    d = _clips(tmp_path / "t2v")
    items = V.find_items(d, _settings("t2v"))
    assert [i.text for i in items] == ["a tiny test clip number 0", "a tiny test clip number 1"]
    e = _clips(tmp_path / "edit")
    _clips(e, suffix="_target", text=False)
    pairs = V.find_items(e, _settings("video-edit"))
    assert [(p.video.name, p.target.name) for p in pairs] == [("v0.mp4", "v0_target.mp4"), ("v1.mp4", "v1_target.mp4")]
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "t2v/v0.mp4", "answer": "a clip", "question": "what?"}))
    [m] = V.find_items(tmp_path / "m.jsonl", _settings("v2t"))
    assert m.question == "what?" and m.video == tmp_path / "t2v" / "v0.mp4"
    raw = (d / "v0.mp4").read_bytes()
    pq.write_table(pa.table({"video_bytes": [raw], "caption_i": ["Watch it."], "caption_q": [""],
                             "caption_a": ["A clip."]}), tmp_path / "u.parquet")
    [u] = V.find_items(tmp_path / "u.parquet", _settings("v2t"))
    assert (u.text, u.question, u.system, u.video) == ("A clip.", None, "Watch it.", raw)
    pq.write_table(pa.table({"caption": ["x"], "input_video_bytes": [raw], "output_video_bytes": [raw]}),
                   tmp_path / "e.parquet")
    [p] = V.find_items(tmp_path / "e.parquet", _settings("video-edit"))
    assert p.target == raw


@pytest.mark.parametrize("problem", ["no-target", "corrupt", "parquet-columns", "parquet-junk", "i2v-short",
                                     "manifest-key", "too-short"])
def test_bad_data_is_one_clear_error(problem, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lance_mlx.errors import LanceError
    from lance_mlx.train import video_data as V

    d = _clips(tmp_path / "d", n=1)
    task, data, match = "t2v", d, None
    if problem == "no-target":
        task, match = "video-edit", "no target video"
    elif problem == "corrupt":
        (d / "v0.mp4").write_bytes(b"not a video")
        match = "v0.mp4"
    elif problem == "parquet-columns":
        pq.write_table(pa.table({"caption": ["x"], "image_bytes": [b"x"]}), tmp_path / "p.parquet")
        data, match = tmp_path / "p.parquet", "lacks the column"
    elif problem == "parquet-junk":
        pq.write_table(pa.table({"caption": ["x"], "video_bytes": [b"junk"]}), tmp_path / "p.parquet")
        data, match = tmp_path / "p.parquet", "row000000"
    elif problem == "i2v-short":
        _clip(d / "v0.mp4", n=6, fps=24)  # 0.25 s: one sampled frame
        task, match = "i2v", "at least 5"
    elif problem == "manifest-key":
        (tmp_path / "m.jsonl").write_text(json.dumps({"image": "d/v0.mp4", "caption": "x"}))
        data, match = tmp_path / "m.jsonl", "lacks video"
    elif problem == "too-short":
        _clip(d / "v0.mp4", n=1, fps=30)
        match = "too short"
    with pytest.raises(LanceError, match=match) as e:
        V.find_items(data, _settings(task))
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def pipe():
    from tiny_checkpoints import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture(scope="module")
def t2v_features(tmp_path_factory, pipe):
    from lance_mlx.train import video_data as V
    from lance_mlx.train import video_examples as VE

    d = _clips(tmp_path_factory.mktemp("vdata"), n=2, size=(64, 64))
    clip = _settings("t2v", num_frames=5)
    return VE.cache_features(V.find_items(d, clip), pipe, clip, d / "cache", 64, 56)


def test_features_and_examples(tmp_path, pipe, t2v_features, monkeypatch):
    """Cached features hold the clip's posterior (t = 2 latent frames for 5 frames) and load again without an
    encode; t2v examples are ff2v at the given rate, i2v always; video-edit and v2t examples carry their blocks."""
    import mlx.core as mx

    from lance_mlx.sequence import IM_END
    from lance_mlx.train import data as D
    from lance_mlx.train import video_data as V
    from lance_mlx.train import video_examples as VE

    f = t2v_features[0]
    assert f.shape == (2, 4, 4) and f.target_mu.shape == (32, 48) and f.vit is None
    monkeypatch.setattr(VE, "encode_item", lambda *a, **k: pytest.fail("encoded again"))
    key = mx.random.key(0)
    kinds = [VE.build_example(f, "t2v", random.Random(i), key, 0.0, ff2v_rate=0.5).clean_frames for i in range(40)]
    assert 8 < sum(kinds) < 32 and set(kinds) == {0, 1}
    assert VE.build_example(f, "i2v", random.Random(0), key).clean_frames == 1
    monkeypatch.undo()

    e = _clips(tmp_path / "e", n=1, size=(64, 64))
    _clip(e / "v0_target.mp4", n=48, size=(64, 64), seed=5)  # a longer target: both clips take the shorter count
    clip = _settings("video-edit", num_frames=5)
    g = VE.cache_features(V.find_items(e, clip), pipe, clip, tmp_path / "c1", 64, 56)[0]
    assert g.shape == (2, 4, 4) and g.source_mu.shape == g.target_mu.shape and g.vit_grid == (3, 2, 2)
    ex = VE.build_example(g, "video-edit", random.Random(0), key, 0.0, 0.0)
    assert ex.seq.attn_modes.count("full") == 1 and "full_noise" in ex.seq.attn_modes and ex.clean_frames == 0
    ex = VE.build_example(g, "video-edit", random.Random(0), key, 0.0, 1.0 - 1e-9)
    assert "full" not in ex.seq.attn_modes and "full_noise" not in ex.seq.attn_modes

    clip = _settings("v2t", num_frames=5)
    (tmp_path / "u.jsonl").write_text(json.dumps({"video": "e/v0.mp4", "answer": "a tiny clip"}) + "\n")
    u = VE.cache_features(V.find_items(tmp_path / "u.jsonl", clip), pipe, clip, tmp_path / "c2", 64, 56)[0]
    assert u.target_mu is None and u.vit_grid == (3, 2, 2)
    ex = VE.build_example(u, "v2t", random.Random(0), key, prompts=D.understanding_prompts(pipe.tokenizer, "video"))
    assert ex.labels[-1] == IM_END and ex.labels[:-1].tolist() == u.text_ids.tolist()
    assert (ex.seq.input_ids[ex.ce_index + 1] == ex.labels).all()


def _trainer(pipe_features, out, **kw):
    from lance_mlx.train import loop
    from tiny_checkpoints import tiny_pipeline

    s = loop.Settings(**{"task": "t2v", "steps": 4, "lr": 1e-2, "warmup": 1, "rank": 4, "alpha": 4.0,
                         "save_every": 2, "batch_size": 2, "checkpointing": False, **kw})
    return loop.Trainer(tiny_pipeline(), pipe_features, s, out, {"data_hash": "test"}, log=lambda m: None)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def test_t2v_overfits_and_resumes(t2v_features, tmp_path):
    """12 steps on 2 clips lower the loss at fixed draws; a run stopped after step 2 and resumed gives the same
    losses and adapter as an uninterrupted one."""
    import mlx.core as mx

    from lance_mlx import lora as L
    from lance_mlx.train import objective as O

    tr = _trainer(t2v_features, tmp_path / "fit", steps=12, lr=3e-2, text_drop=0.0, save_every=100, seed=1)

    def fixed_loss():
        exs, drs = tr.examples(10**6, 0, [0, 1])
        return float(O.losses(tr.model, O.pack(tr.model, exs, drs)).loss.item())

    before = fixed_loss()
    tr.run(progress=False)
    after = fixed_loss()
    assert before / after >= 1.3, (before, after)

    full = _trainer(t2v_features, tmp_path / "full", ff2v_rate=0.5)
    full.run(progress=False)
    part = _trainer(t2v_features, tmp_path / "part", ff2v_rate=0.5, validate_every=2)
    part.validation = lambda step: os.kill(os.getpid(), signal.SIGTERM)
    r = part.run(progress=False)
    assert r["stopped"] == signal.SIGTERM and r["step"] == 2
    resumed = _trainer(t2v_features, tmp_path / "part", ff2v_rate=0.5)
    resumed.resume(r["checkpoint"])
    resumed.run(progress=False)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    a, b = (mx.load(str(tmp_path / n / L.ADAPTER_WEIGHTS)) for n in ("full", "part"))
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]))
    meta = json.loads((tmp_path / "full" / L.ADAPTER_CONFIG).read_text())["lance_mlx"]
    assert meta["task"] == "t2v" and meta["settings"]["ff2v_rate"] == 0.5 and meta["settings"]["num_frames"] == 17


def _run_cli(argv):
    from lance_mlx.train.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


@pytest.mark.parametrize("problem", ["no-caption", "corrupt-video", "edit-no-target", "num-frames", "fps",
                                     "ff2v-rate", "i2v-short", "validation-media", "validation-kind", "images-only"])
def test_cli_checks_video_inputs_before_loading(problem, tmp_path, no_model, capsys):
    data = _clips(tmp_path / "data", n=1)
    args = ["--data", str(data), "--out", str(tmp_path / "run"), "--task", "t2v"]
    if problem == "no-caption":
        (data / "v0.txt").unlink()
    elif problem == "corrupt-video":
        (data / "v0.mp4").write_bytes(b"\x00" * 64)
    elif problem == "edit-no-target":
        args[-1] = "video-edit"
    elif problem == "num-frames":
        args += ["--num-frames", "16"]
    elif problem == "fps":
        args += ["--fps", "0"]
    elif problem == "ff2v-rate":
        args += ["--ff2v-rate", "1.5"]
    elif problem == "i2v-short":
        _clip(data / "v0.mp4", n=4, fps=24)
        args[-1] = "i2v"
    elif problem == "validation-media":
        args[-1] = "v2t"
        args += ["--validate-every", "5", "--validation-prompt", "what happens?"]
    elif problem == "validation-kind":
        args[-1] = "video-edit"
        args += ["--validate-every", "5", "--validation-prompt", "snow", "--validation-image", str(tmp_path / "a.png")]
    elif problem == "images-only":
        for p in data.glob("*.mp4"):
            p.unlink()
    assert _run_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    if problem == "validation-kind":
        assert "validates on videos" in err[0]


def test_cli_t2v_end_to_end(upstream_root, tmp_path):
    """Cache, train, validate (an .mp4), write the adapter, then continue with --resume."""
    from lance_mlx.train.cli import main

    data = _clips(tmp_path / "data", n=1, size=(64, 64))
    out = tmp_path / "run"
    common = ["--task", "t2v", "--data", str(data), "--out", str(out), "--model",
              str(upstream_root), "--dtype", "float32", "--resolution", "128", "--num-frames", "5",
              "--rank", "2", "--warmup", "1", "--save-every", "2"]
    assert main(common + ["--steps", "2", "--validate-every", "2", "--validation-prompt", "a clip",
                          "--validation-steps", "2"]) == 0
    assert (out / "validation" / "step_0000002_0.mp4").is_file()
    assert (out / "adapter_config.json").is_file() and len(_losses(out)) == 2
    assert main(common + ["--steps", "3", "--resume"]) == 0
    assert len(_losses(out)) == 3


@pytest.mark.parametrize("task", ["i2v", "video-edit", "v2t"])
def test_cli_other_video_tasks(task, upstream_root, tmp_path):
    """One step and a validation output of each other video task through the command."""
    from PIL import Image

    from lance_mlx.train.cli import main

    data = _clips(tmp_path / "data", n=1, size=(64, 64))
    media = data / "v0.mp4"
    if task == "video-edit":
        _clip(data / "v0_target.mp4", size=(64, 64), seed=3)
    if task == "i2v":
        media = tmp_path / "first.png"
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(media)
    out = tmp_path / "run"
    assert main(["--task", task, "--data", str(data), "--out", str(out), "--model", str(upstream_root), "--dtype",
                 "float32", "--resolution", "128", "--num-frames", "5", "--rank", "2", "--steps", "1",
                 "--validate-every", "1", "--validation-prompt", "what happens?", "--validation-image", str(media),
                 "--validation-steps", "1"]) == 0
    assert (out / "validation" / f"step_0000001_0.{'txt' if task == 'v2t' else 'mp4'}").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["lance_mlx"]["task"] == task

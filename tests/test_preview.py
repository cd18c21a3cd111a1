"""Live previews: the latent→RGB map against numpy and against the latent space it was fit for, preview sizes of
images and videos, a step's data prediction, outputs unchanged by previews, and the CLI's --preview file."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from lance_mlx import cmd_generate, preview, sampler
from lance_mlx.config import SamplingParams
from lance_mlx.media import to_uint8
from lance_mlx.tasks import TextToImage, TextToVideo
from lance_mlx.vae_wan22 import LATENTS_MEAN, LATENTS_STD

# The per-channel statistics ComfyUI's Wan22 latent format normalises with before its sampler sees a latent
# (comfy/latent_formats.py, class Wan22, latents_mean / latents_std; process_in = (raw - mean) / std, scale 1):
# the space its latent_rgb_factors were fit in.
COMFY_WAN22_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
COMFY_WAN22_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


def test_factors_are_for_our_latent_space(upstream_root):
    """Lance samples, and our VAE encodes to and decodes from, (mu - LATENTS_MEAN) / LATENTS_STD: the same
    normalisation ComfyUI's Wan22 factors assume, so the map applies to our latents unchanged."""
    from lance_mlx.loading import load_vae

    assert LATENTS_MEAN == COMFY_WAN22_MEAN and LATENTS_STD == COMFY_WAN22_STD
    vae = load_vae(upstream_root / "Wan2.2_VAE.pth")  # as the pipeline loads it
    assert np.allclose(np.array(vae.mean), COMFY_WAN22_MEAN) and np.allclose(1 / np.array(vae.inv_std),
                                                                              COMFY_WAN22_STD, rtol=1e-6)
    f = np.array(preview.WAN22_LATENT_RGB)
    assert f.shape == (48, 3) and len(preview.WAN22_LATENT_RGB_BIAS) == 3
    # the mean latent (0 after normalisation) maps to the bias: a mid grey within the VAE's [-1, 1] pixel range
    assert np.all(np.abs(np.array(preview.WAN22_LATENT_RGB_BIAS)) < 0.2)


def test_fast_map_matches_numpy():
    rng = np.random.default_rng(3)
    grid = (2, 3, 5)
    x = rng.standard_normal((30, 48)).astype(np.float32) * 2
    f64 = x.astype(np.float64) @ np.array(preview.WAN22_LATENT_RGB) + np.array(preview.WAN22_LATENT_RGB_BIAS)
    got = np.array(preview.latent_rgb(mx.array(x)))
    np.testing.assert_allclose(got, f64, rtol=1e-5, atol=1e-5)
    rgb = preview.fast_rgb(mx.array(x), grid)
    ref = np.round((np.clip(f64, -1, 1) * 0.5 + 0.5) * 255).reshape(2, 3, 5, 3)
    assert rgb.shape == (2, 3, 5, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - ref).max() <= 1  # float32 vs float64 rounding at a level's edge
    assert (rgb.astype(int) == ref).mean() > 0.99


def _step(grid, t=0.6, frozen=None):
    rng = np.random.default_rng(0)
    n = int(np.prod(grid))
    x_t, v = (mx.array(rng.standard_normal((n, 48)).astype(np.float32)) for _ in range(2))
    t_at = t if frozen is None else mx.where(mx.array(frozen), 0.0, t)
    return sampler.Step(1, 4, t, x_t - 0.1 * v, grid, x_t, v, t_at)


def test_prediction_is_x_minus_t_v_and_frozen_tokens_stay():
    s = _step((1, 2, 2))
    np.testing.assert_allclose(np.array(s.prediction()), np.array(s.x_t) - 0.6 * np.array(s.v), rtol=1e-6)
    frozen = np.array([True, True, False, False, False, False, False, False])
    s = _step((2, 2, 2), frozen=frozen)
    pred = np.array(s.prediction())
    np.testing.assert_array_equal(pred[:2], np.array(s.x_t)[:2])
    np.testing.assert_allclose(pred[2:], np.array(s.x_t)[2:] - 0.6 * np.array(s.v)[2:], rtol=1e-6)


@pytest.mark.parametrize("grid,max_side,size", [((1, 2, 3), None, (48, 32)), ((1, 32, 20), None, (320, 512)),
                                                 ((1, 32, 20), 384, (240, 384)), ((3, 2, 3), None, (48, 32)),
                                                 ((13, 30, 53), 384, (384, 217))])
def test_fast_sizes(grid, max_side, size):
    out = _step(grid).preview("fast", max_side=max_side)
    frames = out if isinstance(out, list) else [out]
    assert isinstance(out, list) == (grid[0] > 1)
    assert len(frames) == grid[0] and all(f.size == size and f.mode == "RGB" for f in frames)


def test_preview_needs_a_known_mode_and_the_vae_for_full():
    from lance_mlx.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="not one of fast, full"):
        _step((1, 2, 2)).preview("slow")
    with pytest.raises(ValueError, match="VAE"):
        _step((1, 2, 2)).preview("full")
    with pytest.raises(ValueError, match="grid"):
        sampler.Step(1, 1, 1.0, mx.zeros((4, 48))).preview()


def _run(pipe, request, each=None):
    last = None
    for step in pipe.denoise(pipe.plan(request)):
        if each is not None:
            each(step)
        last = step
    return np.array(last.latents), last


def test_pipeline_previews_and_unchanged_results(tiny_pipe):
    """Previews of every step (fast and full) leave the sampled latents bit-equal; the last step's prediction is the
    result (Euler's last step goes to t = 0); sizes are the output's, a video's full preview is its first frame."""
    image = TextToImage("a red fox", 48, 32, SamplingParams(steps=3))
    plain, _ = _run(tiny_pipe, image)
    seen = []
    watched, last = _run(tiny_pipe, image, lambda s: seen.append((s.preview(), tiny_pipe.preview(s, "full"))))
    np.testing.assert_array_equal(plain, watched)
    assert [(f.size, g.size) for f, g in seen] == [((48, 32), (48, 32))] * 3
    np.testing.assert_array_equal(np.array(last.prediction()), plain)
    full = np.asarray(tiny_pipe.preview(last, "full"))
    np.testing.assert_array_equal(full, tiny_pipe.decode(mx.array(plain).reshape(1, 1, 2, 3, 48))[0])
    small = to_uint8(np.array(preview.latent_rgb(mx.array(plain))).reshape(2, 3, 3))
    np.testing.assert_array_equal(np.asarray(last.preview()), small.repeat(16, axis=0).repeat(16, axis=1))

    video = TextToVideo("waves", 9, 48, 32, sampling=SamplingParams(steps=2))
    plain, _ = _run(tiny_pipe, video)
    shots = []
    watched, last = _run(tiny_pipe, video, lambda s: shots.append((s.preview(), tiny_pipe.preview(s, "full"))))
    np.testing.assert_array_equal(plain, watched)
    fast, full = shots[-1]
    assert [f.size for f in fast] == [(48, 32)] * 3 and [f.size for f in full] == [(48, 32)]


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def checked_writes(monkeypatch):
    """Every preview write, checked right after it: the file at the preview path decodes as a whole image."""
    writes = []
    real_image, real_video = preview.save_image, preview.save_video

    def check(path):
        with Image.open(path) as im:
            im.load()
            writes.append((path, im.format, im.size, getattr(im, "n_frames", 1)))

    def save_image(img, path, metadata=None, **kw):
        real_image(img, path, metadata, **kw)
        check(path)

    def save_video(frames, path, **kw):
        real_video(frames, path, **kw)
        check(path)

    monkeypatch.setattr(preview, "save_image", save_image)
    monkeypatch.setattr(preview, "save_video", save_video)
    return writes


def _generate(upstream_root, *args):
    return cmd_generate.main(["--model", str(upstream_root), "--dtype", "float32", "--prompt", "a red fox",
                              "--steps", "5", *map(str, args)])


def test_cli_preview_file_every_write_and_output_unchanged(upstream_root, tmp_path, checked_writes, capsys):
    plain, shown = tmp_path / "plain.png", tmp_path / "shown.png"
    assert _generate(upstream_root, "--width", "48", "--height", "32", "--out", plain) == 0
    assert not checked_writes
    p = tmp_path / "live" / "preview.jpg"
    assert _generate(upstream_root, "--width", "48", "--height", "32", "--out", shown, "--preview", p,
                     "--preview-every", "2") == 0
    assert [w[1:] for w in checked_writes] == [("JPEG", (48, 32), 1)] * 3  # steps 2, 4 and the last, 5
    assert "denoising" in capsys.readouterr().err  # the progress bar still runs
    np.testing.assert_array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(shown)))
    assert not [f for f in p.parent.iterdir() if f.name != "preview.jpg"]  # no partial files left
    # a later run does not replace the preview without --force (it is an earlier output of ours)
    with pytest.raises(SystemExit) as e:
        _generate(upstream_root, "--width", "48", "--height", "32", "--out", tmp_path / "again.png", "--preview", p)
    assert e.value.code == 2 and "pass --force" in capsys.readouterr().err


def test_cli_video_preview_gif_and_full_mode(upstream_root, tmp_path, checked_writes):
    gif = tmp_path / "forming.gif"
    assert _generate(upstream_root, "--frames", "9", "--width", "48", "--height", "32", "--out", tmp_path / "v.gif",
                     "--preview", gif) == 0
    assert [w[1:] for w in checked_writes] == [("GIF", (48, 32), 3)] * 5  # one frame per latent frame
    checked_writes.clear()
    assert _generate(upstream_root, "--frames", "9", "--width", "48", "--height", "32", "--out", tmp_path / "w.gif",
                     "--preview", tmp_path / "first.png", "--preview-mode", "full", "--preview-every", "5") == 0
    assert [w[1:] for w in checked_writes] == [("PNG", (48, 32), 1)]


@pytest.mark.parametrize("args,message", [
    (["--preview", "{d}/p.tiff"], "is not an image name"),
    (["--preview", "{d}/p.gif"], "is not an image name"),  # a .gif preview is for videos
    (["--preview", "{d}/o.png"], "is the output itself"),
    (["--preview", "{d}/mine.png"], "not an output of lance-mlx"),
    (["--preview", "{d}/mine.png", "--force"], "not an output of lance-mlx"),
    (["--preview", "{d}/p.png", "--preview-every", "0"], "--preview-every must be 1 or more"),
    (["--preview", "{d}/p.png", "--preview-mode", "slow"], "invalid choice"),
])
def test_cli_preview_path_checked_before_loading(args, message, tmp_path, no_model, capsys):
    (tmp_path / "mine.png").write_bytes(b"a user's file")
    with pytest.raises(SystemExit) as e:
        cmd_generate.main(["--prompt", "a fox", "--out", str(tmp_path / "o.png"),
                           *[a.format(d=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert (tmp_path / "mine.png").read_bytes() == b"a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]


def test_cli_prompts_file_items_share_the_preview(upstream_root, tmp_path, checked_writes):
    (tmp_path / "p.txt").write_text("a red fox\na blue bird\n")
    assert cmd_generate.main(["--model", str(upstream_root), "--dtype", "float32", "--steps", "2", "--width", "48",
                              "--height", "32", "--prompts-file", str(tmp_path / "p.txt"), "--out",
                              str(tmp_path / "img.png"), "--preview", str(tmp_path / "p.png")]) == 0
    assert len(checked_writes) == 4 and {w[0] for w in checked_writes} == {tmp_path / "p.png"}


def test_edit_cli_writes_the_preview(upstream_root, tmp_path, checked_writes):
    from lance_mlx import cmd_edit, media

    rng = np.random.default_rng(0)
    media.save_image((rng.random((32, 48, 3)) * 255).astype(np.uint8), tmp_path / "in.png")
    assert cmd_edit.main(["--model", str(upstream_root), "--dtype", "float32", "--steps", "2", "--image",
                          str(tmp_path / "in.png"), "--instruction", "make it pink", "--preset", "image_256res",
                          "--out", str(tmp_path / "out.png"), "--preview", str(tmp_path / "p.webp")]) == 0
    assert [w[1:] for w in checked_writes] == [("WEBP", (304, 224), 1)] * 2  # the output's size, every step

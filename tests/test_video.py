"""Text-to-video, image-to-video and video edit: frame rules, cached == uncached per branch, the API end to end."""

import mlx.core as mx
import numpy as np
import pytest

from lance_mlx import conditioning as C
from lance_mlx import sequence as Q
from lance_mlx import tasks as T
from lance_mlx.config import SamplingParams
from lance_mlx.processing import Preset
from tiny_checkpoints import tiny_pipeline

PROMPT = [32, 8251, 1467, 13]
ATOL = 1e-4
TINY_VIDEO = Preset("tiny_video", 48, 56)  # 48x32 frames -> VAE 64x48 (4x3 latents), ViT 56x28


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return pipe.model


def frames(n, seed=0, size=(32, 48)):
    return (np.random.default_rng(seed).random((n, *size, 3)) * 255).astype(np.uint8)


def check_branches(model, seq, x, t, drops):
    ctx = model.prepare_generation(seq)
    v = model.velocity(ctx, x, t, 4.0)
    for got, drop in zip((v.v_cond, v.v_uncond), drops):
        ref = model.velocity_uncached(seq.branch(drop), x, t)
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=ATOL, rtol=ATOL)
    assert float(mx.abs(v.v_cond - v.v_uncond).max()) > 1e-3


# ---------------------------------------------------------------------------------------------- frame rules
@pytest.mark.parametrize("n,valid", [(50, (49, 53)), (10, (9, 13)), (2, (1, 5)), (0, (1,)), (9, (9,))])
def test_nearest_valid_frames(n, valid):
    assert T.nearest_valid_frames(n) == valid


def test_frame_count_errors(pipe):
    assert [T.latent_frames(n) for n in (1, 5, 49, 121)] == [1, 2, 13, 31]
    with pytest.raises(ValueError, match="4k\\+1.*use 49 or 53"):
        T.latent_frames(50)
    with pytest.raises(ValueError, match="at most 121 frames"):
        T.latent_frames(125)
    with pytest.raises(ValueError, match="use 121$"):
        T.latent_frames(122)  # 125 would be past the table
    with pytest.raises(ValueError, match="at most 121 frames"):
        pipe.generate_video("a boat", num_frames=125, width=48, height=32)
    with pytest.raises(ValueError, match="use 9 or 13"):
        pipe.generate_video("a boat", num_frames=10, width=48, height=32)
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate_video("a boat", num_frames=9, width=50, height=32)
    with pytest.raises(ValueError, match="source frame count 10 .* use 9 or 13"):
        pipe.edit_video(frames(10), "make it pink", steps=1, preset=TINY_VIDEO)
    with pytest.raises(ValueError, match="at least 5 frames"):
        pipe.generate_video("a boat", num_frames=1, image=frames(1)[0], resolution=TINY_VIDEO.vae_resolution)


# --------------------------------------------------------------------------------------- cached == uncached
def test_t2v_cached_equals_uncached(model):
    seq = Q.generation_sequence("t2v", PROMPT, (3, 2, 2))
    assert seq.splits[0].ids[3:3 + 32].tolist() == Q.SYSTEM_PROMPT_IDS["t2v"]
    x = mx.random.normal((12, 48), key=mx.random.key(0))
    check_branches(model, seq, x, 0.9, [(), (Q.MODALITY_TEXT,)])


def test_video_edit_cached_equals_uncached(model):
    rng = np.random.default_rng(1)
    emb = mx.array(rng.standard_normal((4, 64)).astype(np.float32))
    cond = mx.array(rng.standard_normal((1, 3, 2, 2, 48)).astype(np.float32))
    seq = C.EditInputs(emb, (2, 1, 2), cond).sequence(PROMPT, "video")
    x = mx.random.normal((12, 48), key=mx.random.key(1))
    check_branches(model, seq, x, 0.6, [(), (Q.MODALITY_TEXT,)])
    v = model.velocity(model.prepare_generation(seq, cfg=True, image_cfg=True), x, 0.6, 4.0, 2.0)
    ref = model.velocity_uncached(seq.branch(Q.TEXT_AND_VISION), x, 0.6)
    np.testing.assert_allclose(np.array(v.v_uncond_all), np.array(ref), atol=ATOL, rtol=ATOL)


def test_i2v_cached_equals_uncached_with_frozen_first_frame(model):
    shape = (3, 2, 2)
    seq = Q.generation_sequence("i2v", PROMPT, shape)
    frozen = C.first_frame_mask(shape)
    assert frozen.tolist() == [True] * 4 + [False] * 8
    tt = mx.where(mx.array(frozen), 0.0, 0.8)  # per-token times: the image's tokens sit at t = 0
    x = mx.random.normal((12, 48), key=mx.random.key(2))
    check_branches(model, seq, x, tt, [(), (Q.MODALITY_TEXT,)])


def test_i2v_sampling_keeps_the_first_frame(model):
    image = mx.random.uniform(-1, 1, (1, 32, 48, 3), key=mx.random.key(3))
    first = mx.random.normal((1, 3, 2, 3, 48), key=mx.random.key(4))
    noise = mx.random.normal((18, 48), key=mx.random.key(5))
    shape = (3, 2, 3)
    seq = Q.generation_sequence("i2v", PROMPT, shape)
    frozen_np = C.first_frame_mask(shape)

    def i2v(steps):  # what LancePipeline.plan does with an encoded first frame: fix its rows of the start latents
        x_start = mx.where(mx.array(frozen_np)[:, None], first.reshape(-1, 48), noise)
        return model.generate(seq, SamplingParams(steps=steps, noise=x_start), frozen_np)

    assert image.shape == (1, 32, 48, 3)  # the 48x32 first frame gives the (3, 2, 3) grid
    out = i2v(3)
    assert out.shape == (1, 3, 2, 3, 48)
    np.testing.assert_array_equal(np.array(out[:, 0]), np.array(first[:, 0]))
    assert float(mx.abs(out[:, 1:] - first[:, 1:]).min()) > 0  # the rest moved
    # one step by hand: frozen rows start from the encoding, carry t = 0, and enter the renorm norms
    one = i2v(1)
    frozen = mx.array(C.first_frame_mask((3, 2, 3)))
    x0 = mx.where(frozen[:, None], first.reshape(-1, 48), noise)
    ctx = model.prepare_generation(Q.generation_sequence("i2v", PROMPT, (3, 2, 3)))
    v = model.velocity(ctx, x0, mx.where(frozen, 0.0, 1.0), 4.0)
    ref = mx.where(frozen[:, None], x0, x0 - v.v * 1.0)
    np.testing.assert_allclose(np.array(one).reshape(-1, 48), np.array(ref), atol=1e-5)


def test_i2v_pixels():
    image = mx.ones((1, 16, 16, 3)) * 0.5
    px = C.i2v_pixels(image, 9, mx.random.key(0))
    assert px.shape == (9, 16, 16, 3)
    assert bool((px[:4] == 0.5).all()) and float(mx.abs(px[4:] - 0.5).max()) > 1.0  # N(0, 1) after frame 3
    px2 = C.i2v_pixels(image, 9, mx.random.key(0))
    np.testing.assert_array_equal(np.array(px), np.array(px2))


# ---------------------------------------------------------------------------------------------------- API
def test_generate_video_t2v(pipe):
    out = pipe.generate_video("a boat on a lake", num_frames=9, width=48, height=32, steps=2)
    assert out.shape == (9, 32, 48, 3) and out.dtype == np.uint8
    lat = pipe.latents(T.TextToVideo("a boat on a lake", 9, 48, 32, sampling=SamplingParams(steps=2)))
    assert lat.shape == (1, 3, 2, 3, 48)
    streamed = np.stack(list(pipe.iter_frames(lat)))
    np.testing.assert_array_equal(streamed, out)  # streamed decode == whole decode, and seeded runs repeat


def test_generate_video_i2v(pipe):
    img = frames(1)[0]
    lat = pipe.latents(T.ImageToVideo("the boat sails away", img, 5, TINY_VIDEO.vae_resolution,
                                      sampling=SamplingParams(steps=2)))
    assert lat.shape == (1, 2, 3, 4, 48)  # size from the bucketed image (64x48)
    k_pixels, k_eps = C.posterior_keys(None)
    from PIL import Image

    from lance_mlx.processing import preprocess_image

    pixels = preprocess_image(Image.fromarray(img), TINY_VIDEO, vit=False).vae_pixels
    first = C.encode_latent(pipe.vae, C.i2v_pixels(pixels, 5, k_pixels), True, k_eps)
    np.testing.assert_allclose(np.array(lat[:, 0]), np.array(first[:, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="takes its size from the image"):
        pipe.generate_video("x", num_frames=5, image=img, width=48, height=32)


def test_edit_video_api(pipe):
    out = pipe.edit_video(frames(9), "make it pink", steps=2, preset=TINY_VIDEO)
    assert out.shape == (9, 48, 64, 3) and out.dtype == np.uint8
    # a decoded clip with its fps is sampled like a file: 12 fps, 4k+1 frames over the whole clip
    lat = pipe.latents(T.VideoEdit(frames(24), "make it pink", TINY_VIDEO, input_fps=24,
                                   sampling=SamplingParams(steps=1)))
    assert lat.shape == (1, 3, 3, 4, 48)  # 1 s at 24 fps -> 12 frames at 12 fps -> 9 (4k+1) -> 3 latent frames

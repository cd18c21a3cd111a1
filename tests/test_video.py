"""Text-to-video, image-to-video and video edit: frame rules, cached == uncached per branch, the API end to end."""

import mlx.core as mx
import numpy as np
import pytest

from lance_mlx import editing as E
from lance_mlx import sequence as Q
from lance_mlx.processing import Preset
from tiny_checkpoints import tiny_lance

PROMPT = [32, 8251, 1467, 13]
ATOL = 1e-4
TINY_VIDEO = Preset("tiny_video", 48, 56)  # 48x32 frames -> VAE 64x48 (4x3 latents), ViT 56x28


@pytest.fixture(scope="module")
def model():
    return tiny_lance()


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
    assert E.nearest_valid_frames(n) == valid


def test_frame_count_errors(model):
    assert [E.latent_frames(n, 31) for n in (1, 5, 49, 121)] == [1, 2, 13, 31]
    with pytest.raises(ValueError, match="4k\\+1.*use 49 or 53"):
        E.latent_frames(50, 31)
    with pytest.raises(ValueError, match="at most 121 frames"):
        E.latent_frames(125, 31)
    with pytest.raises(ValueError, match="use 121$"):
        E.latent_frames(122, 31)  # 125 would be past the table
    with pytest.raises(ValueError, match="at most 121 frames"):
        model.generate_video("a boat", num_frames=125, width=48, height=32)
    with pytest.raises(ValueError, match="use 9 or 13"):
        model.generate_video("a boat", num_frames=10, width=48, height=32)
    with pytest.raises(ValueError, match="multiple of 16"):
        model.generate_video("a boat", num_frames=9, width=50, height=32)
    with pytest.raises(ValueError, match="source frame count 10 .* use 9 or 13"):
        model.edit_video(frames(10), "make it pink", num_steps=1, preset=TINY_VIDEO)
    with pytest.raises(ValueError, match="at least 5 frames"):
        model.generate_video("a boat", num_frames=1, image=frames(1)[0], preset=TINY_VIDEO)


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
    seq = E.build_edit_sequence(PROMPT, emb, (2, 1, 2), cond, "video")
    x = mx.random.normal((12, 48), key=mx.random.key(1))
    check_branches(model, seq, x, 0.6, [(), (Q.MODALITY_TEXT,)])
    v = E.guided_velocity(model, E.prepare_edit(model, seq, 4.0, 2.0), x, 0.6, 4.0, 2.0)
    ref = model.velocity_uncached(seq.branch(E.TEXT_AND_VISION), x, 0.6)
    np.testing.assert_allclose(np.array(v.v_uncond_all), np.array(ref), atol=ATOL, rtol=ATOL)


def test_i2v_cached_equals_uncached_with_frozen_first_frame(model):
    shape = (3, 2, 2)
    seq = Q.generation_sequence("i2v", PROMPT, shape)
    frozen = E.first_frame_mask(shape)
    assert frozen.tolist() == [True] * 4 + [False] * 8
    tt = mx.where(mx.array(frozen), 0.0, 0.8)  # per-token times: the image's tokens sit at t = 0
    x = mx.random.normal((12, 48), key=mx.random.key(2))
    check_branches(model, seq, x, tt, [(), (Q.MODALITY_TEXT,)])


def test_i2v_sampling_keeps_the_first_frame(model):
    image = mx.random.uniform(-1, 1, (1, 32, 48, 3), key=mx.random.key(3))
    first = mx.random.normal((1, 3, 2, 3, 48), key=mx.random.key(4))
    noise = mx.random.normal((18, 48), key=mx.random.key(5))
    out = E.i2v_latents(model, PROMPT, image, 9, num_steps=3, noise=noise, first_latent=first)
    assert out.shape == (1, 3, 2, 3, 48)
    np.testing.assert_array_equal(np.array(out[:, 0]), np.array(first[:, 0]))
    assert float(mx.abs(out[:, 1:] - first[:, 1:]).min()) > 0  # the rest moved
    # one step by hand: frozen rows start from the encoding, carry t = 0, and enter the renorm norms
    one = E.i2v_latents(model, PROMPT, image, 9, num_steps=1, noise=noise, first_latent=first)
    frozen = mx.array(E.first_frame_mask((3, 2, 3)))
    x0 = mx.where(frozen[:, None], first.reshape(-1, 48), noise)
    ctx = model.prepare_generation(Q.generation_sequence("i2v", PROMPT, (3, 2, 3)))
    v = model.velocity(ctx, x0, mx.where(frozen, 0.0, 1.0), 4.0)
    ref = mx.where(frozen[:, None], x0, x0 - v.v * 1.0)
    np.testing.assert_allclose(np.array(one).reshape(-1, 48), np.array(ref), atol=1e-5)


def test_i2v_pixels():
    image = mx.ones((1, 16, 16, 3)) * 0.5
    px = E.i2v_pixels(image, 9, mx.random.key(0))
    assert px.shape == (9, 16, 16, 3)
    assert bool((px[:4] == 0.5).all()) and float(mx.abs(px[4:] - 0.5).max()) > 1.0  # N(0, 1) after frame 3
    px2 = E.i2v_pixels(image, 9, mx.random.key(0))
    np.testing.assert_array_equal(np.array(px), np.array(px2))


# ---------------------------------------------------------------------------------------------------- API
def test_generate_video_t2v(model):
    out = model.generate_video("a boat on a lake", num_frames=9, width=48, height=32, num_steps=2)
    assert out.shape == (9, 32, 48, 3) and out.dtype == np.uint8
    lat = model.generate_video("a boat on a lake", num_frames=9, width=48, height=32, num_steps=2, decode=False)
    assert lat.shape == (1, 3, 2, 3, 48)
    streamed = np.stack(list(E.iter_frames(model.vae, lat)))
    np.testing.assert_array_equal(streamed, out)  # streamed decode == whole decode, and seeded runs repeat


def test_generate_video_i2v(model):
    img = frames(1)[0]
    lat = model.generate_video("the boat sails away", num_frames=5, image=img, num_steps=2, preset=TINY_VIDEO,
                               decode=False)
    assert lat.shape == (1, 2, 3, 4, 48)  # size from the bucketed image (64x48)
    k_pixels, k_eps = E.posterior_keys(None)
    from lance_mlx.processing import preprocess_image
    from PIL import Image

    pixels = preprocess_image(Image.fromarray(img), TINY_VIDEO, vit=False).vae_pixels
    first = E.encode_latent(model.vae, E.i2v_pixels(pixels, 5, k_pixels), True, k_eps)
    np.testing.assert_allclose(np.array(lat[:, 0]), np.array(first[:, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="takes its size from the image"):
        model.generate_video("x", num_frames=5, image=img, width=48, height=32)


def test_edit_video_api(model):
    out = model.edit_video(frames(9), "make it pink", num_steps=2, preset=TINY_VIDEO)
    assert out.shape == (9, 48, 64, 3) and out.dtype == np.uint8
    # a decoded clip with its fps is sampled like a file: 12 fps, 4k+1 frames over the whole clip
    lat = model.edit_video(frames(24), "make it pink", num_steps=1, preset=TINY_VIDEO, fps=24, decode=False)
    assert lat.shape == (1, 3, 3, 4, 48)  # 1 s at 24 fps -> 12 frames at 12 fps -> 9 (4k+1) -> 3 latent frames

"""Image edit: positions on worked examples, cached == uncached for every CFG branch, the edit API end to end."""

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from lance_mlx import conditioning as C
from lance_mlx import sampler as S
from lance_mlx import sequence as Q
from lance_mlx.config import SamplingParams
from lance_mlx.lance import Lance
from lance_mlx.processing import Preset, preprocess_image
from lance_mlx.tasks import ImageEdit, Posterior
from tiny_checkpoints import tiny_pipeline

INSTR = [32, 8251, 9982]  # three instruction tokens
ATOL = 1e-4  # float32 single forwards (tests/golden/README.md)
TINY_IMAGE = Preset("tiny_image", 48, 56)  # 48x32 source -> 4:3 buckets: VAE 64x48 (4x3 latents), ViT 56x28


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def model(pipe):
    return pipe.model


def source_image(seed=0, size=(32, 48)):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def edit_seq(model, vit_grid=(1, 3, 4), lat=(1, 2, 3), seed=0, vision_type="image"):
    rng = np.random.default_rng(seed)
    k = int(np.prod(vit_grid))
    emb = mx.array(rng.standard_normal((k, model.config.llm.hidden_size)).astype(np.float32))
    cond = mx.array(rng.standard_normal((1, *lat, 48)).astype(np.float32))
    return C.EditInputs(emb, vit_grid, cond).sequence(INSTR, vision_type)


def rows(pos, start, n):
    return pos[:, start:start + n].T.tolist()


# ------------------------------------------------------------------------------------------------ positions
def test_image_edit_positions_worked_example(model):
    """data/datasets_custom/validation_dataset.py::tiv2v_sample + data/common.py::shift_position_ids with a = 64
    (template head), ViT merged grid 3x4 (M = 4), latents 2x3 (Q = a + 2 + M = 70)."""
    seq = edit_seq(model)
    assert seq.split_lens == [64, 14, 8, 3, 5, 8, 1]
    pos = seq.position_ids()
    assert rows(pos, 0, 2) == [[0, 0, 0], [1, 1, 1]] and pos[:, 63].tolist() == [63, 63, 63]
    vit = pos[:, 64:78]
    assert vit[:, 0].tolist() == [1000, 64, 64]  # VS: only the temporal axis moves to 1000
    body = vit[:, 1:-1].reshape(3, 3, 4)
    assert (body[0] == 1001).all()
    np.testing.assert_array_equal(body[1], 65 + np.arange(3)[:, None] + 0 * np.arange(4))
    np.testing.assert_array_equal(body[2], 65 + 0 * np.arange(3)[:, None] + np.arange(4))
    assert vit[:, -1].tolist() == [1005, 69, 69]  # VE = (1001 + M, a + 1 + M, a + 1 + M)
    cond = pos[:, 78:86]
    assert cond[:, 0].tolist() == [70, 70, 70]
    assert cond[:, 1:-1].T.tolist() == [[71, 71 + i, 71 + j] for i in range(2) for j in range(3)]
    assert cond[:, -1].tolist() == [74, 74, 74]  # Q + 1 + max(h, w)
    assert rows(pos, 86, 3) == [[75] * 3, [76] * 3, [77] * 3]  # the instruction continues after the cond block
    assert rows(pos, 89, 5) == [[p] * 3 for p in range(78, 83)]
    np.testing.assert_array_equal(pos[:, 94:102], cond)  # the target takes the conditioning block's ids
    assert pos[:, 102].tolist() == [88, 88, 88]  # trailing <|im_end|> keeps its unshifted id

    uncond = seq.branch((Q.MODALITY_TEXT,))  # upstream's text-CFG branch: the instruction dropped
    assert [int(s.modality[0]) for s in uncond.context] == [-1, 4, 2, -1]
    assert uncond.context_positions[3].T.tolist() == [[p] * 3 for p in range(78, 83)]  # conditional ids kept
    np.testing.assert_array_equal(uncond.noise_positions, cond)

    vis = seq.branch(Q.TEXT_AND_VISION)  # our image-CFG branch: instruction, ViT and cond latents dropped
    assert [int(s.modality[0]) for s in vis.context] == [-1, -1]
    assert vis.context_positions[1].T.tolist() == [[p] * 3 for p in range(78, 83)]
    noise = vis.noise_positions  # recomputed on [A, E, F, G]: VS at 64 + 5 = 69, no shift left to apply
    assert noise[:, 0].tolist() == [69, 69, 69]
    assert noise[:, 1:-1].T.tolist() == [[70, 70 + i, 70 + j] for i in range(2) for j in range(3)]
    assert noise[:, -1].tolist() == [73, 73, 73]


def test_video_edit_positions_worked_example(model):
    """Video edit (data/datasets_custom/validation_dataset.py, data/common.py::shift_position_ids): ViT merged
    grid (2, 1, 2) (4 frames), latents (3, 2, 2) (9 frames); temporal ids step by 2."""
    seq = edit_seq(model, vit_grid=(2, 1, 2), lat=(3, 2, 2), vision_type="video")
    assert seq.split_lens == [64, 6, 14, 3, 5, 14, 1]
    pos = seq.position_ids()
    vit = pos[:, 64:70]
    assert vit[:, 0].tolist() == [1000, 64, 64]
    assert vit[:, 1:-1].T.tolist() == [[1001 + 2 * t, 65, 65 + j] for t in range(2) for j in range(2)]
    assert vit[:, -1].tolist() == [1004, 68, 68]  # 65 + max(2 (t - 1), h - 1, w - 1) + 1, t-axis shifted
    cond = pos[:, 70:84]
    assert cond[:, 0].tolist() == [69, 69, 69]
    assert cond[:, 1:-1].T.tolist() == [[70 + 2 * t, 70 + i, 70 + j]
                                        for t in range(3) for i in range(2) for j in range(2)]
    assert cond[:, -1].tolist() == [75, 75, 75]
    np.testing.assert_array_equal(pos[:, 92:106], cond)
    np.testing.assert_array_equal(seq.branch((Q.MODALITY_TEXT,)).noise_positions, cond)
    # the edit system prompt of a video names the video (U+2019 apostrophes), the image one the image
    assert seq.splits[0].ids[3:3 + 56].tolist() == Q.SYSTEM_PROMPT_IDS["video_edit"]
    assert edit_seq(model).splits[0].ids[3:3 + 56].tolist() == Q.SYSTEM_PROMPT_IDS["image_edit"]


def test_routing_of_the_conditioning_block(model):
    seq = edit_seq(model)
    vit, cond = seq.splits[1], seq.splits[2]
    assert (vit.kind, vit.attn, vit.gen_mask.any()) == ("vit", "full", False)  # ViT: und expert, full attention
    assert cond.attn == "full_noise" and cond.gen_mask.tolist() == [False] + [True] * 6 + [False]


# ------------------------------------------------------------------------------------------ cached == uncached
@pytest.mark.parametrize("t", [0.7, 1.0])
def test_image_edit_cached_equals_uncached(model, t):
    seq = edit_seq(model)
    ctx = model.prepare_generation(seq, cfg=True, image_cfg=True)
    x = mx.random.normal((6, 48), key=mx.random.key(1))
    v = model.velocity(ctx, x, t, 4.0, 1.5)
    refs = [model.velocity_uncached(seq.branch(drop), x, t) for drop in ((), (Q.MODALITY_TEXT,), Q.TEXT_AND_VISION)]
    for got, ref in zip((v.v_cond, v.v_uncond, v.v_uncond_all), refs):
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=ATOL, rtol=ATOL)
    assert float(mx.abs(v.v_cond - v.v_uncond).max()) > 1e-3  # the branches really differ
    assert float(mx.abs(v.v_uncond - v.v_uncond_all).max()) > 1e-3
    v_cfg = refs[2] + 4.0 * (refs[0] - refs[1]) + 1.5 * (refs[1] - refs[2])
    np.testing.assert_allclose(np.array(v.v_cfg), np.array(v_cfg), atol=5 * ATOL, rtol=ATOL)
    scale = min(1.0, float(mx.linalg.norm(refs[0]) / (mx.linalg.norm(v_cfg) + 1e-8)))
    np.testing.assert_allclose(np.array(v.v), np.array(v_cfg) * scale, atol=5 * ATOL, rtol=ATOL)


def test_image_scale_one_is_upstream_two_component(model):
    seq = edit_seq(model)
    ctx = model.prepare_generation(seq, cfg=True)
    assert ctx.vision is None
    x = mx.random.normal((6, 48), key=mx.random.key(2))
    ref = S.guide(model._v(model.noise_query(ctx, ctx.cond, model.noise_inputs(ctx, x, 0.8))),
                  model._v(model.noise_query(ctx, ctx.uncond, model.noise_inputs(ctx, x, 0.8))), None, 4.0, 1.0)
    np.testing.assert_array_equal(np.array(model.velocity(ctx, x, 0.8, 4.0, 1.0, batched=False).v), np.array(ref.v))
    # the batched step: equal within float32 rounding (a batched GEMM may sum in another order, e.g. on a GPU)
    v = np.array(model.velocity(ctx, x, 0.8, 4.0, 1.0).v)
    assert np.abs(v - np.array(ref.v)).max() <= 1e-5 * np.abs(np.array(ref.v)).max()
    # with the third branch built, s_img = 1 collapses to the same two-component velocity
    v3 = model.velocity(model.prepare_generation(seq, cfg=True, image_cfg=True), x, 0.8, 4.0, 1.0)
    np.testing.assert_allclose(np.array(v3.v), np.array(ref.v), atol=1e-5)


def test_contexts_prefilled_once_per_branch(model, monkeypatch):
    calls = []
    orig = Lance.prefill

    def counting(self, splits, *a, **k):
        calls.append(len(splits))
        return orig(self, splits, *a, **k)

    monkeypatch.setattr(Lance, "prefill", counting)
    seq = edit_seq(model)
    ctx = model.prepare_generation(seq, cfg=True, image_cfg=True)
    params = SamplingParams(steps=3, cfg_text=4.0, cfg_image=2.0)
    list(S.denoise(lambda x, t, s_t, s_i: model.velocity(ctx, x, t, s_t, s_i), mx.zeros((6, 48)), params))
    assert calls == [5, 4, 2]  # cond [A B C D E], text-dropped [A B C E], text-and-vision-dropped [A E]
    # the conditioning latent is one array shared by the branches (encoded once)
    assert ctx.cond.branch.context[2] is ctx.uncond.branch.context[2]


def test_guided_loop_equals_generate_without_image_cfg(model):
    seq = edit_seq(model)
    noise = mx.random.normal((6, 48), key=mx.random.key(3))
    params = SamplingParams(steps=3, noise=noise)
    ref = model.generate(seq, params)
    ctx3 = model.prepare_generation(seq, cfg=True, image_cfg=True)  # third branch built, image scale 1
    got = list(S.denoise(lambda x, t, s_t, s_i: model.velocity(ctx3, x, t, s_t, 1.0), noise, params))[-1].latents
    np.testing.assert_allclose(np.array(got).reshape(ref.shape), np.array(ref), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- API
def test_posterior_sample_and_mean(pipe):
    visual = preprocess_image(Image.fromarray(source_image()), TINY_IMAGE)
    assert visual.vae_pixels.shape == (1, 48, 64, 3) and visual.grid_thw == (1, 2, 4)
    a = C.encode_edit_inputs(pipe.vit, pipe.vae, visual, sample_posterior=True, posterior_seed=7)
    b = C.encode_edit_inputs(pipe.vit, pipe.vae, visual, sample_posterior=True, posterior_seed=7)
    c = C.encode_edit_inputs(pipe.vit, pipe.vae, visual, sample_posterior=True, posterior_seed=8)
    mean = C.encode_edit_inputs(pipe.vit, pipe.vae, visual, sample_posterior=False)
    assert a.vit_grid == (1, 1, 2) and a.vit_embeds.shape == (2, 64) and a.latent_shape == (1, 3, 4)
    np.testing.assert_array_equal(np.array(a.cond_latent), np.array(b.cond_latent))
    assert float(mx.abs(a.cond_latent - c.cond_latent).max()) > 1e-3
    # sample = mu_n + exp(0.5 log_var) eps (log_var raw), eps from the posterior key
    mu, log_var = pipe.vae.encode(mx.array(visual.vae_pixels)[None], return_log_var=True)
    eps = mx.random.normal(mu.shape, key=C.posterior_keys(7)[1])
    np.testing.assert_allclose(np.array(a.cond_latent), np.array(mu + mx.exp(0.5 * log_var) * eps), atol=1e-5)
    np.testing.assert_allclose(np.array(mean.cond_latent), np.array(mu), atol=1e-6)


def test_edit_image_api(pipe):
    img = source_image()
    out = pipe.edit_image(img, "make it pink", steps=2, preset=TINY_IMAGE)
    assert isinstance(out, Image.Image) and out.size == (64, 48)

    def latents(posterior=Posterior(), **sampling):
        return pipe.latents(ImageEdit(img, "make it pink", TINY_IMAGE, SamplingParams(steps=2, **sampling), posterior))

    lat = latents()
    assert lat.shape == (1, 1, 3, 4, 48)
    np.testing.assert_array_equal(np.asarray(out), pipe.decode(lat)[0])  # seeded: reproducible
    noise = mx.random.normal((1, 1, 3, 4, 48), key=mx.random.key(5))
    a = latents(Posterior(sample=False), noise=noise)
    b = latents(Posterior(sample=False, seed=99), noise=noise)
    np.testing.assert_array_equal(np.array(a), np.array(b))  # the mean ignores the posterior seed
    c = latents(noise=noise, cfg_image=2.0)
    assert c.shape == a.shape and bool(mx.isfinite(c).all())


@pytest.mark.parametrize("instruction", ["", "   ", None])
def test_empty_instruction(pipe, instruction):
    with pytest.raises(ValueError, match="instruction is empty"):
        pipe.edit_image(source_image(), instruction, steps=1, preset=TINY_IMAGE)


def test_unreadable_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        pipe.edit_image(bad, "make it pink", steps=1, preset=TINY_IMAGE)
    with pytest.raises(FileNotFoundError, match="not found"):
        pipe.edit_image(tmp_path / "missing.png", "make it pink", steps=1, preset=TINY_IMAGE)

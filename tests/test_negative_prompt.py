"""Negative prompts: an empty one is upstream's unconditional branch bit for bit on every task, a non-empty one
changes only the branches that drop the prompt, and the text is checked and counted before any weights load."""

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from lance_mlx import conditioning as C
from lance_mlx import sequence as Q
from lance_mlx import tasks as T
from lance_mlx.config import SamplingParams
from lance_mlx.errors import InvalidRequestError, LanceError
from lance_mlx.processing import Preset
from tiny_checkpoints import tiny_pipeline

PROMPT = [32, 8251, 9982]  # three prompt tokens
NEG = [14897, 11, 3347, 4271, 13]  # five negative tokens ("blurry, low quality.")
ATOL = 1e-4  # float32 single forwards (tests/golden/README.md)
TINY = Preset("tiny", 48, 56)  # 48x32 source -> VAE 64x48 (4x3 latents), ViT 56x28


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def source(n=None, seed=0):
    shape = (32, 48, 3) if n is None else (n, 32, 48, 3)
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def layouts(model, prompt=PROMPT):
    """One sequence per task layout: t2i, t2v, i2v (the same template as t2v) and image / video edit."""
    rng = np.random.default_rng(0)
    hidden = model.config.llm.hidden_size

    def edit(vit_grid, lat, kind):
        emb = mx.array(rng.standard_normal((int(np.prod(vit_grid)), hidden)).astype(np.float32))
        cond = mx.array(rng.standard_normal((1, *lat, 48)).astype(np.float32))
        return C.EditInputs(emb, vit_grid, cond).sequence(prompt, kind)

    return {"t2i": Q.generation_sequence("t2i", prompt, (1, 2, 3)),
            "t2v": Q.generation_sequence("t2v", prompt, (2, 2, 3)),
            "i2v": Q.generation_sequence("i2v", prompt, (2, 2, 3)),
            "image_edit": edit((1, 3, 4), (1, 2, 3), "image"),
            "video_edit": edit((2, 1, 2), (3, 2, 2), "video")}


DROPS = [(), (Q.MODALITY_TEXT,), Q.TEXT_AND_VISION]


def same_branch(a: Q.Branch, b: Q.Branch) -> None:
    assert [s.ids.tolist() for s in a.context] == [s.ids.tolist() for s in b.context]
    assert [s.attn for s in a.context] == [s.attn for s in b.context]
    for p, q in zip(a.context_positions, b.context_positions):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(a.noise_positions, b.noise_positions)


# ------------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("task", ["t2i", "t2v", "i2v", "image_edit", "video_edit"])
def test_empty_negative_is_upstreams_branch_layout(pipe, task):
    seq = layouts(pipe.model)[task]
    for empty in ([], None, np.zeros(0, np.int64)):
        neg = seq.with_negative(empty)
        assert neg.negative is None
        for drop in DROPS:
            same_branch(neg.branch(drop), seq.branch(drop))


@pytest.mark.parametrize("task", ["t2i", "t2v", "image_edit", "video_edit"])
def test_negative_replaces_the_prompt_only_where_it_is_dropped(pipe, task):
    seq = layouts(pipe.model)[task]
    neg = seq.with_negative(NEG)
    same_branch(neg.branch(()), seq.branch(()))  # the conditional branch is untouched
    for drop in DROPS[1:]:
        got, ref = neg.branch(drop), seq.branch(drop)
        k = next(i for i, s in enumerate(got.context) if s.modality[0] == Q.MODALITY_TEXT)
        assert got.context[k].ids.tolist() == NEG
        others = got.context[:k] + got.context[k + 1:]
        assert [s.ids.tolist() for s in others] == [s.ids.tolist() for s in ref.context]
        # the template splits keep their conditional positions, as in upstream's unconditional branch
        for p, q in zip(got.context_positions[:k] + got.context_positions[k + 1:], ref.context_positions):
            np.testing.assert_array_equal(p, q)
        # the negative and the noise block: positions of the shortened sequence with the negative in the
        # prompt's place, the negative right after the kept tokens before it
        before = got.context_positions[k - 1]
        start = int(before.max()) + 1
        np.testing.assert_array_equal(got.context_positions[k], np.broadcast_to(start + np.arange(len(NEG)), (3, 5)))
    # dropping only the prompt, the shortened sequence is the one built with the negative as the prompt
    built = layouts(pipe.model, NEG)[task].branch(())
    got = neg.branch((Q.MODALITY_TEXT,))
    np.testing.assert_array_equal(got.noise_positions, built.noise_positions)
    k = [int(s.modality[0]) for s in built.context].index(Q.MODALITY_TEXT)
    np.testing.assert_array_equal(got.context_positions[k], built.context_positions[k])


def test_t2i_negative_positions_worked_example():
    """t2i: [A = template head (a tokens)] [prompt (3)] [assistant (5)] [target 1x2x3]. Upstream's text-dropped
    branch keeps A at 0.. and the assistant split at its conditional a+3..a+7; its noise block starts at a+5 (the
    prompt removed). With a 5-token negative the negative takes a..a+4 and the noise block a+10.."""
    seq = Q.generation_sequence("t2i", PROMPT, (1, 2, 3)).with_negative(NEG)
    a = len(seq.splits[0])
    b = seq.branch((Q.MODALITY_TEXT,))
    assert [len(s) for s in b.context] == [a, 5, 5]
    assert b.context_positions[1][0].tolist() == list(range(a, a + 5))
    assert b.context_positions[2][0].tolist() == list(range(a + 3, a + 8))  # conditional ids kept
    assert b.noise_positions[:, 0].tolist() == [a + 10] * 3  # <|vision_start|> after negative + assistant
    assert b.noise_positions[:, 1:-1].T.tolist() == [[a + 11, a + 11 + i, a + 11 + j] for i in range(2)
                                                     for j in range(3)]


# ----------------------------------------------------------------------------------------------- velocities
@pytest.mark.parametrize("task", ["t2i", "t2v", "image_edit", "video_edit"])
def test_negative_changes_only_the_unconditional_velocities(pipe, task):
    model = pipe.model
    seq = layouts(model)[task]
    edit = task.endswith("edit")
    n = int(np.prod(seq.splits[seq.noise_index].grid))
    x = mx.random.normal((n, 48), key=mx.random.key(1))
    ctx = model.prepare_generation(seq, cfg=True, image_cfg=edit)
    neg = model.prepare_generation(seq.with_negative(NEG), cfg=True, image_cfg=edit)
    scale = 2.0 if edit else 1.0
    v, vn = (model.velocity(c, x, 0.7, 4.0, scale, batched=False) for c in (ctx, neg))
    assert np.array_equal(np.array(v.v_cond), np.array(vn.v_cond))  # bit-equal
    assert float(mx.abs(v.v_uncond - vn.v_uncond).max()) > 1e-4
    if edit:  # the image-guidance branch carries the negative too (diffusers' InstructPix2Pix convention)
        assert float(mx.abs(v.v_uncond_all - vn.v_uncond_all).max()) > 1e-4
    # the cached negative branch equals one uncached forward of the same layout
    for got, drop in ((vn.v_uncond, (Q.MODALITY_TEXT,)), (vn.v_uncond_all, Q.TEXT_AND_VISION)):
        if got is not None:
            ref = model.velocity_uncached(seq.with_negative(NEG).branch(drop), x, 0.7)
            np.testing.assert_allclose(np.array(got), np.array(ref), atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------------------------------------- every task
def requests():
    s = SamplingParams(steps=2, cfg_text=4.0)
    return {"t2i": T.TextToImage("a red fox", 48, 32, s),
            "t2v": T.TextToVideo("a boat on a lake", 5, 48, 32, sampling=s),
            "i2v": T.ImageToVideo("the boat sails away", source(), 5, TINY.vae_resolution, sampling=s),
            "image_edit": T.ImageEdit(source(), "make it pink", TINY, s.replace(cfg_image=1.5)),
            "video_edit": T.VideoEdit(source(5), "make it pink", TINY, sampling=s.replace(cfg_image=1.5))}


@pytest.mark.parametrize("task", ["t2i", "t2v", "i2v", "image_edit", "video_edit"])
def test_empty_negative_prompt_gives_the_same_output_bit_for_bit(pipe, task):
    req = requests()[task]
    ref = pipe.latents(req)
    for empty in ("", "   "):
        got = pipe.latents(dataclasses.replace(req, negative_prompt=empty))
        assert np.array_equal(np.array(got), np.array(ref))
    steered = pipe.latents(dataclasses.replace(req, negative_prompt="blurry, low quality"))
    assert float(mx.abs(steered - ref).max()) > 1e-4


def test_python_api_negative_prompt(pipe):
    ref = pipe.generate_image("a red fox", 48, 32, steps=2)
    assert np.array_equal(np.asarray(pipe.generate_image("a red fox", 48, 32, steps=2, negative_prompt="")),
                          np.asarray(ref))
    other = pipe.generate_image("a red fox", 48, 32, steps=2, negative_prompt="blurry")
    assert not np.array_equal(np.asarray(other), np.asarray(ref))
    vid = pipe.generate_video("a boat", num_frames=5, width=48, height=32, steps=1, negative_prompt="blurry")
    assert vid.shape == (5, 32, 48, 3)


# ------------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("bad,err", [(3, "must be text"), ("\ud800", "not valid text"),
                                     ("x" * (T.MAX_PROMPT_CHARS + 1), "characters long")])
def test_bad_negative_prompt(bad, err):
    with pytest.raises(LanceError, match=err) as e:
        T.TextToImage("a fox", 32, 32, negative_prompt=bad)
    assert e.value.exit_code == 2
    assert "negative prompt" in str(e.value)


def test_negative_prompt_token_limit_before_loading(upstream_root, monkeypatch):
    from lance_mlx import loading
    from lance_mlx.pipeline import LancePipeline

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the negative prompt was counted")

    monkeypatch.setattr(loading, "load_components", refuse)
    req = T.TextToImage("a fox", 32, 32, negative_prompt="fox " * (T.MAX_PROMPT_TOKENS + 10))
    with pytest.raises(InvalidRequestError, match="negative prompt is .* tokens long"):
        LancePipeline.from_pretrained(upstream_root, request=req)


def test_understanding_has_no_negative_prompt():
    assert T.Understand(source(), "what is it?").negative_prompt == ""

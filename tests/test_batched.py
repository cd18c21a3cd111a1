"""Guidance branches batched into one compiled forward equal the branches run one after the other, on every task."""

import mlx.core as mx
import numpy as np
import pytest

from lance_mlx import conditioning as C
from lance_mlx import sequence as Q
from lance_mlx.config import SamplingParams
from tiny_checkpoints import tiny_lance

PROMPT = [32, 8251, 1467, 13]
INSTR = [32, 8251, 9982]
RTOL = 1e-5  # batched vs sequential: float32 rounding only (a batched GEMM may sum in another order)


@pytest.fixture(scope="module")
def model():
    return tiny_lance()  # our own copy: one test below changes a weight


def edit_seq(model, vision_type="image", vit_grid=(1, 3, 4), lat=(1, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    emb = mx.array(rng.standard_normal((int(np.prod(vit_grid)), model.config.llm.hidden_size)).astype(np.float32))
    cond = mx.array(rng.standard_normal((1, *lat, 48)).astype(np.float32))
    return C.EditInputs(emb, vit_grid, cond).sequence(INSTR, vision_type)


# task -> (sequence, prepare_generation kwargs, time t, text scale, image scale)
def case(model, task):
    if task == "t2i":
        return Q.generation_sequence("t2i", PROMPT, (1, 4, 6)), {}, 0.7, 4.0, 1.0
    if task == "t2v":
        return Q.generation_sequence("t2v", PROMPT, (3, 2, 2)), {}, 0.9, 4.0, 1.0
    if task == "i2v":  # per-token times: the first latent frame sits at t = 0
        return (Q.generation_sequence("i2v", PROMPT, (3, 2, 2)), {},
                mx.where(mx.array(C.first_frame_mask((3, 2, 2))), 0.0, 0.8), 4.0, 1.0)
    if task == "edit":
        return edit_seq(model), {"cfg": True}, 0.8, 4.0, 1.0
    if task == "edit+image-cfg":
        return edit_seq(model), {"cfg": True, "image_cfg": True}, 0.8, 4.0, 1.5
    if task == "video-edit":
        return edit_seq(model, "video", (2, 1, 2), (3, 2, 2), 1), {"cfg": True}, 0.6, 4.0, 1.0
    return edit_seq(model, "video", (2, 1, 2), (3, 2, 2), 1), {"cfg": True, "image_cfg": True}, 0.6, 4.0, 2.0


TASKS = ["t2i", "t2v", "i2v", "edit", "edit+image-cfg", "video-edit", "video-edit+image-cfg"]


def untemplated_sequence(shape=(1, 4, 6)):
    """Upstream's layout without the chat template (text_template false; validation_dataset.py::t2v_sample):
    [<bos> prompt <eos>] (all modality 0, causal) then the noise block. The text-dropped branch keeps no context
    at all: its noise block attends to itself only."""
    bos, eos = Q.IM_START, Q.IM_END  # upstream's new_token_ids bos / eos (data/data_utils.py)
    return Q.Sequence([Q.text_split([bos, *PROMPT, eos], Q.MODALITY_TEXT), Q.latent_split(shape, "target")])


def assert_close(got, ref, rtol=RTOL):
    got, ref = np.array(got), np.array(ref)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("task", TASKS)
def test_batched_equals_sequential(model, task):
    seq, kw, t, s_text, s_image = case(model, task)
    ctx = model.prepare_generation(seq, **kw)
    n = ctx.num_tokens
    x = mx.random.normal((n, 48), key=mx.random.key(TASKS.index(task)))
    ref = model.velocity(ctx, x, t, s_text, s_image, batched=False)
    rows = 3 if s_image > 1.0 else 2
    lengths = model.batched_step(ctx).batch.lengths
    assert len(lengths) == len(set(lengths)) == (3 if "image_cfg" in kw else 2)  # contexts of different lengths
    for compiled in (False, True):
        got = model.velocity(ctx, x, t, s_text, s_image, compiled=compiled)
        for name in ("v_cond", "v_uncond", "v_uncond_all", "v_cfg", "v"):
            if getattr(ref, name) is None:
                assert getattr(got, name) is None
            else:
                assert_close(getattr(got, name), getattr(ref, name))
    assert ref.v_uncond is not None and (ref.v_uncond_all is not None) == (rows == 3)
    # outside the guidance interval only the conditional branch runs: a batch of one
    assert_close(model.velocity(ctx, x, t, 1.0, 1.0).v, model.velocity(ctx, x, t, 1.0, 1.0, batched=False).v)


def test_untemplated_layout_empty_context(model):
    """A branch with an empty context (zero-length cache) is a row of the batch like any other."""
    seq = untemplated_sequence()
    ctx = model.prepare_generation(seq)
    assert ctx.uncond.cache[0].offset == 0 < ctx.cond.cache[0].offset
    assert model.batched_step(ctx).batch.lengths == [len(PROMPT) + 2, 0]
    x = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(11))
    ref = model.velocity(ctx, x, 0.7, 4.0, batched=False)
    # the empty row's noise block attends to itself only: the uncached forward of the branch alone
    assert_close(ref.v_uncond, model.velocity_uncached(ctx.uncond.branch, x, 0.7))
    for compiled in (False, True):
        got = model.velocity(ctx, x, 0.7, 4.0, compiled=compiled)
        for name in ("v_cond", "v_uncond", "v"):
            assert_close(getattr(got, name), getattr(ref, name))
    assert_close(model.velocity(ctx, x, 0.7, 1.0).v, model.velocity(ctx, x, 0.7, 1.0, batched=False).v)


def test_untemplated_layout_denoise_and_generate(model):
    seq = untemplated_sequence((1, 2, 3))
    params = SamplingParams(steps=4, cfg_text=4.0, cfg_interval=(0.8, 1.0),
                            noise=mx.random.normal((6, 48), key=mx.random.key(12)))
    ref = list(model.denoise(seq, params, batched=False))
    assert min(s.t for s in ref) <= 0.8 < max(s.t for s in ref)  # batches of 2 and of 1
    assert_close(list(model.denoise(seq, params))[-1].latents, ref[-1].latents)
    assert_close(model.generate(seq, params), ref[-1].latents.reshape(1, 1, 2, 3, 48))


@pytest.mark.parametrize("task", ["edit+image-cfg", "i2v"])
def test_denoise_loop_batched_equals_sequential(model, task):
    """Whole loops with steps in and out of the guidance interval (batches of 1 and of every branch)."""
    seq, kw, _, _, s_image = case(model, task)
    n = int(np.prod(seq.splits[seq.noise_index].grid))
    params = SamplingParams(steps=4, cfg_text=4.0, cfg_image=s_image, cfg_interval=(0.8, 1.0),
                            noise=mx.random.normal((n, 48), key=mx.random.key(9)))
    frozen = C.first_frame_mask((3, 2, 2)) if task == "i2v" else None
    ref = list(model.denoise(seq, params, frozen, batched=False))
    assert min(s.t for s in ref) <= 0.8 < max(s.t for s in ref)  # both kinds of step happen
    got = list(model.denoise(seq, params, frozen))[-1].latents
    assert_close(got, ref[-1].latents)


def test_compiled_once_per_batch_size(model):
    seq, kw, _, _, _ = case(model, "edit+image-cfg")
    ctx = model.prepare_generation(seq, **kw)
    step = model.batched_step(ctx)
    traces = []
    forward = step._forward
    step._forward = lambda *a: traces.append(a[2]["cos"].shape[0]) or forward(*a)
    x = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(4))
    for t in (0.9, 0.8, 0.7):  # new times and scales do not retrace: t is an array argument
        for s_text, s_image in ((4.0, 1.5), (3.0, 1.0), (1.0, 1.0), (5.0, 2.0)):
            mx.eval(model.velocity(ctx, x, t, s_text, s_image).v)
    assert sorted(traces) == [1, 2, 3]
    assert model.batched_step(ctx) is step  # kept on the context for the whole request


def test_single_branch_path_after_batching(model):
    """The per-branch pieces (noise_query against one branch's cache) stay valid after batched steps, which read
    the branch caches and never change them."""
    seq, kw, t, _, _ = case(model, "edit+image-cfg")
    ctx = model.prepare_generation(seq, **kw)
    x = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(5))
    h_in = model.noise_inputs(ctx, x, t)
    before = [np.array(model.noise_query(ctx, s, h_in)) for s in (ctx.cond, ctx.uncond, ctx.vision)]
    mx.eval(model.velocity(ctx, x, t, 4.0, 1.5).v)
    for state, ref in zip((ctx.cond, ctx.uncond, ctx.vision), before):
        np.testing.assert_array_equal(np.array(model.noise_query(ctx, state, h_in)), ref)
        assert state.cache[0].offset == state.branch.context_len


def test_compiled_step_reads_current_weights(model):
    seq, kw, t, _, _ = case(model, "t2i")
    ctx = model.prepare_generation(seq, **kw)
    x = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(6))
    before = model.velocity(ctx, x, t, 4.0).v_cond
    bias = model.llm2vae.bias
    try:
        model.llm2vae.bias = bias + 1.0
        after = model.velocity(ctx, x, t, 4.0).v_cond
    finally:
        model.llm2vae.bias = bias
    assert_close(after - before, mx.ones_like(before), rtol=1e-5)


def test_row_caches_serve_only_the_bidirectional_read():
    from lance_mlx.llm import KVCache, RowCaches

    c = KVCache()
    c.update_and_fetch(mx.zeros((1, 1, 3, 4)), mx.zeros((1, 1, 3, 4)))
    rows, q = RowCaches([c, c]), mx.zeros((2, 2, 5, 4))
    assert rows.attend(q, mx.zeros((2, 1, 5, 4)), mx.zeros((2, 1, 5, 4)), 0.5, "full", False).shape == (2, 5, 8)
    for attn, update in (("causal", False), ("full", True)):
        with pytest.raises(ValueError, match="read-only"):
            rows.attend(q, q[:, :1], q[:, :1], 0.5, attn, update)


def test_row_caches_empty_row_attends_to_its_block_only():
    from lance_mlx.llm import KVCache, RowCaches

    k0 = mx.random.normal((1, 1, 3, 4), key=mx.random.key(1))
    full = KVCache()
    full.update_and_fetch(k0, k0)
    q = mx.random.normal((2, 2, 5, 4), key=mx.random.key(2))
    k = mx.random.normal((2, 1, 5, 4), key=mx.random.key(3))
    out = RowCaches([full, KVCache()]).attend(q, k, k, 0.5, "full", False)  # (2, 5, 8)
    alone = mx.fast.scaled_dot_product_attention(q[1:], k[1:], k[1:], scale=0.5)  # (1, 2, 5, 4)
    np.testing.assert_array_equal(np.array(out[1]), np.array(alone[0].transpose(1, 0, 2).reshape(5, 8)))
    with_ctx = mx.fast.scaled_dot_product_attention(q[:1], mx.concatenate([k0, k[:1]], axis=2),
                                                    mx.concatenate([k0, k[:1]], axis=2), scale=0.5)
    np.testing.assert_array_equal(np.array(out[0]), np.array(with_ctx[0].transpose(1, 0, 2).reshape(5, 8)))

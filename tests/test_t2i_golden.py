"""Text-to-image parity with the official code's golden vectors, cached == uncached, bf16, full-size layout."""

import gc
import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from fixtures import GOLDEN, golden_lance_weights
from lance_mlx import sampler as S
from lance_mlx import sequence as Q
from lance_mlx.config import SamplingParams
from lance_mlx.lance import Lance, LanceConfig, TimestepEmbedder

PROMPT = 'A cat holds a poster with rainbow text "STOP"'
ATOL, RTOL = 1e-4, 1e-4  # tests/golden/README.md


def close(a, b, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.array(a), np.asarray(b), atol=atol, rtol=rtol)


def rel(a, b):
    a, b = np.array(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def config():
    return LanceConfig.from_dict(json.loads((GOLDEN / "llm_config.json").read_text()))


@pytest.fixture(scope="module")
def raw_weights():
    return golden_lance_weights()


def load(config, raw_weights, dtype=None):
    m = Lance(config)
    m.load_weights([(k, mx.array(v)) for k, v in Lance.sanitize(raw_weights).items()], strict=True)
    if dtype is not None:
        m.set_dtype(dtype)
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def model(config, raw_weights):
    return load(config, raw_weights)


@pytest.fixture(scope="module")
def tok():
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))


@pytest.fixture(scope="module")
def g1():
    return np.load(GOLDEN / "golden_t2i_step.npz")


@pytest.fixture(scope="module")
def g4():
    return np.load(GOLDEN / "golden_t2i_sample4.npz")


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return tok(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def ctx(model, prompt_ids):
    return model.prepare_generation(Q.generation_sequence("t2i", prompt_ids, (1, 4, 6)), keep_hidden=True)


# ------------------------------------------------------------------------------------------------- weights
def test_sanitize_and_strict_load(model, raw_weights):
    s = Lance.sanitize({**raw_weights, "vit_model.blocks.0.norm1.weight": np.ones(4)})
    assert set(raw_weights) - set(s) == {"latent_pos_embed.pos_embed"}
    names = dict(tree_flatten(model.parameters()))
    assert len(names) == len(raw_weights) - 1 and "latent_pos_embed.pos_embed" not in names
    assert not any(k.startswith("latent_pos") for k in names)


def test_latent_position_rows(model, g1, raw_weights):
    np.testing.assert_array_equal(model.latent_pos.row_ids((1, 4, 6)), g1["latent_pos_ids"])
    rows = np.array(model.latent_pos.rows((1, 4, 6)))
    np.testing.assert_allclose(rows, g1["latent_pos_embed_rows"], atol=1e-6, rtol=0)
    # the stored table is random on purpose: using it would not match
    stored = raw_weights["latent_pos_embed.pos_embed"][g1["latent_pos_ids"]]
    assert np.abs(stored - g1["latent_pos_embed_rows"]).max() > 0.1
    # a frame-1 row: t axis changes, h/w axes equal frame 0's
    r = np.array(model.latent_pos.rows((2, 1, 1)))
    assert np.allclose(r[0, 20:], r[1, 20:]) and not np.allclose(r[0, :20], r[1, :20])


def test_time_embedding_frequencies():
    t = mx.array([0.0, 0.7, 1.0])
    emb = np.array(TimestepEmbedder.timestep_embedding(t, 256))
    freqs = np.exp(-np.log(10000.0) * np.arange(128) / 128)
    args = np.array([0.0, 0.7, 1.0])[:, None] * freqs[None]
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], 1), atol=1e-6)  # cos first


# -------------------------------------------------------------------------------------------- ids, positions
def test_ids_and_positions(g1, prompt_ids, tok, ctx):
    seq = Q.generation_sequence("t2i", prompt_ids, (1, 4, 6), tokenizer=tok)
    np.testing.assert_array_equal(seq.input_ids, g1["input_ids"])
    np.testing.assert_array_equal(seq.input_ids[seq.modality != 0], g1["input_ids_uncond"])
    np.testing.assert_array_equal(seq.position_ids(), g1["position_ids_cond"])
    np.testing.assert_array_equal(seq.position_ids_without([0]), g1["position_ids_uncond"])
    np.testing.assert_array_equal(ctx.cond.branch.kv_position_ids, g1["kv_position_ids_cond"])
    np.testing.assert_array_equal(ctx.uncond.branch.kv_position_ids, g1["kv_position_ids_uncond"])
    np.testing.assert_array_equal(ctx.cond.branch.noise_positions, g1["noise_query_pos"][0])
    np.testing.assert_array_equal(ctx.uncond.branch.noise_positions, g1["noise_query_pos"][1])


def test_prefill_hidden_states(g1, ctx):
    # golden order of cache-building calls: cond A, uncond A, cond B, cond C, uncond C
    c, u = ctx.cond, ctx.uncond
    calls = [(c, 0), (u, 0), (c, 1), (c, 2), (u, 1)]
    hidden = np.concatenate([np.array(s.context_hidden[i][0]) for s, i in calls])
    pos = np.concatenate([s.branch.context_positions[i] for s, i in calls], axis=1)
    np.testing.assert_array_equal(pos, g1["prefill_pos"])
    assert [len(s.branch.context[i]) for s, i in calls] == g1["prefill_query_len"].tolist()
    assert all(s.branch.context[i].is_causal for s, i in calls) and not g1["prefill_token_is_gen"].any()
    close(hidden, g1["prefill_hidden_out"])


def test_noise_query_and_velocity(model, g1, ctx):
    x = mx.array(g1["x_init"])
    h_in = model.noise_inputs(ctx, x, 0.7)
    for b, state in enumerate([ctx.cond, ctx.uncond]):
        close(h_in[0], g1["noise_query_hidden_in"][b])
        h_out = model.noise_query(ctx, state, h_in)
        close(h_out[0], g1["noise_query_hidden_out"][b])
        close(model.llm2vae(h_out[0]), g1["llm2vae_out"][b])
    out = model.velocity(ctx, x, 0.7, cfg_scale=4.0)
    close(out.v_cond, g1["v_cond"][0])
    close(out.v_uncond, g1["v_uncond"][0])
    close(out.v_cfg, g1["v_cfg_prerenorm"][0])
    assert abs(float(out.scale) - float(g1["renorm_scale"][0])) < 1e-5
    close(out.v, g1["v_final"][0])
    close(mx.array(g1["x_init"]) - out.v * float(g1["dts"][0]), g1["x_final_tokens"])


def test_four_steps_match_golden(model, g4, prompt_ids, ctx):
    ts, dts = S.timesteps(4, 3.5)
    x = mx.array(g4["x_init"])
    for i, (t, dt) in enumerate(zip(ts.tolist(), dts.tolist())):
        assert S.cfg_active(t) == bool(g4["cfg_active"][i])
        close(x, g4["x_per_step"][i], atol=5e-4)  # the latents each step starts from
        out = model.velocity(ctx, x, t, 4.0)
        close(out.v_cond, g4["v_cond"][i], atol=2e-4)
        close(out.v_uncond, g4["v_uncond"][i], atol=2e-4)
        close(out.v_cfg, g4["v_cfg_prerenorm"][i], atol=5e-4)
        assert abs(float(out.scale) - float(g4["renorm_scale"][i])) < 1e-5
        close(out.v, g4["v_final"][i], atol=5e-4)
        x = S.euler_step(x, out.v, dt)
    close(x, g4["x_final_tokens"], atol=5e-4, rtol=0)
    lat = model.sample_t2i(prompt_token_ids=mx.array(prompt_ids, dtype=mx.int32), latent_shape=(1, 4, 6),
                           num_steps=4, timestep_shift=3.5, cfg_scale=4.0, noise=g4["x_init"],
                           special_token_ids={"bos": 151644, "image_token_id": 151655})
    assert lat.shape == (1, 1, 4, 6, 48) and lat.dtype == mx.float32
    close(lat[0], g4["x_final"], atol=5e-4, rtol=0)  # golden: (T, h, w, 48)


def test_prompt_text_path_equals_ids_path(model, tok, g4):
    a = model.sample_t2i(prompt=PROMPT, tokenizer=tok, latent_shape=(1, 4, 6), num_steps=2,
                         noise=g4["x_init"].reshape(1, 1, 4, 6, 48))
    b = model.sample_t2i(tok(PROMPT, add_special_tokens=False)["input_ids"], latent_shape=(1, 4, 6), num_steps=2,
                         noise=g4["x_init"])
    np.testing.assert_array_equal(np.array(a), np.array(b))
    c = model.sample_t2i([32, 8251], latent_shape=(1, 2, 3), num_steps=2, seed=7)
    d = model.sample_t2i([32, 8251], latent_shape=(1, 2, 3), num_steps=2, seed=7)
    np.testing.assert_array_equal(np.array(c), np.array(d))


def test_generate_with_frozen_first_frame(model):
    # i2v-style: the first latent frame stays as given (t = 0) while the rest is denoised
    seq = Q.generation_sequence("i2v", [32, 8251], (2, 2, 2))
    noise = mx.random.normal((8, 48), key=mx.random.key(9))
    frozen = np.array([True] * 4 + [False] * 4)
    lat = model.generate(seq, SamplingParams(steps=3, noise=noise), frozen=frozen)
    assert lat.shape == (1, 2, 2, 2, 48)
    out = np.array(lat).reshape(8, 48)
    np.testing.assert_array_equal(out[:4], np.array(noise)[:4])
    assert np.abs(out[4:] - np.array(noise)[4:]).max() > 1e-2


# ------------------------------------------------------------------------------------------ cached == uncached
def _check_cached_equals_uncached(model, seq, x, t):
    ctx = model.prepare_generation(seq)
    out = model.velocity(ctx, x, t, cfg_scale=4.0)
    for state, v in ((ctx.cond, out.v_cond), (ctx.uncond, out.v_uncond)):
        ref = model.velocity_uncached(state.branch, x, t)
        assert rel(v, ref) <= 1e-4, state.branch.noise_positions[:, 0]
    return out


def test_cached_equals_uncached_golden(model, ctx, g1):
    x = mx.array(g1["x_init"])
    out = _check_cached_equals_uncached(model, ctx.sequence, x, 0.7)
    close(out.v_cond, g1["v_cond"][0])


def test_cached_equals_uncached_video_grid(model):
    # a t2v-shaped case: other template, other prompt, 2x3x5 latents (temporal positions 2*t)
    seq = Q.generation_sequence("t2v", [34, 5562, 315, 264, 11079, 304, 279, 11794], (2, 3, 5))
    x = mx.random.normal((30, 48), key=mx.random.key(1))
    out = _check_cached_equals_uncached(model, seq, x, 0.55)
    assert out.v_cond.shape == (30, 48)
    # the branches really differ (the prompt matters)
    assert rel(out.v_uncond, out.v_cond) > 1e-2


def test_cached_equals_uncached_edit_layout(model, config):
    # conditioning splits (ViT block: full, und; conditioning latents: full, gen body at t = 0) in the cache
    hidden = config.llm.hidden_size
    vit = mx.random.normal((6, hidden), key=mx.random.key(2))
    cond = mx.random.normal((6, 48), key=mx.random.key(3))
    seq = Q.edit_sequence([7985, 279, 8251, 6303], (1, 2, 3), (1, 2, 3), vit_data=vit, cond_data=cond)
    x = mx.random.normal((6, 48), key=mx.random.key(4))
    _check_cached_equals_uncached(model, seq, x, 0.9)


# ------------------------------------------------------------------------------------------------------ bf16
def test_bfloat16_velocities(config, raw_weights, g1, prompt_ids):
    m = load(config, raw_weights, mx.bfloat16)
    assert m.language_model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    ctx = m.prepare_generation(Q.generation_sequence("t2i", prompt_ids, (1, 4, 6)))
    out = m.velocity(ctx, mx.array(g1["x_init"]), 0.7, 4.0)
    assert out.v.dtype == mx.float32
    assert rel(out.v_cond, g1["v_cond"][0]) < 2e-2
    assert rel(out.v_uncond, g1["v_uncond"][0]) < 2e-2
    # CFG multiplies the branch difference by 4, and the bf16 error with it
    assert rel(out.v, g1["v_final"][0]) < 5e-2
    lat = m.sample_t2i(prompt_ids, latent_shape=(1, 4, 6), num_steps=2, seed=0)
    assert lat.dtype == mx.float32 and np.isfinite(np.array(lat)).all()


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs(model):
    p = [32, 8251]
    with pytest.raises(ValueError, match="past the model's 3-D position table"):
        model.sample_t2i(p, latent_shape=(31, 64, 65))  # index 31*4096: one past the table's end
    with pytest.raises(ValueError, match="past the model's 3-D position table"):
        model.sample_t2i(p, latent_shape=(32, 4, 4))
    with pytest.raises(ValueError, match="positive"):
        model.sample_t2i(p, latent_shape=(1, 0, 4))
    with pytest.raises(ValueError, match="latent_shape"):
        model.sample_t2i(p, latent_shape=(4, 4))
    with pytest.raises(ValueError, match="empty"):
        model.sample_t2i([], latent_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="empty"):
        model.sample_t2i(prompt="", tokenizer=lambda s, **k: {"input_ids": []}, latent_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="tokenizer"):
        model.sample_t2i(prompt="a cat", latent_shape=(1, 2, 2))
    with pytest.raises(ValueError, match="noise"):
        model.sample_t2i(p, latent_shape=(1, 2, 2), noise=np.zeros((5, 48), np.float32))
    with pytest.raises(ValueError, match=r"\[0, 151936\)"):
        model.sample_t2i([151936], latent_shape=(1, 2, 2))
    saved = model.config
    model.config = replace(saved, llm=replace(saved.llm, max_position_embeddings=60))
    try:
        with pytest.raises(ValueError, match="context limit is 60"):
            model.sample_t2i([32] * 20, latent_shape=(1, 2, 2))
    finally:
        model.config = saved


# ------------------------------------------------------------------------------------------ full-size layout
def expected_full_size_table():
    """The 1021 tensors of Lance_3B/model.safetensors (modeling/lance/lance.py::Lance.__init__; docs/checkpoints.md),
    built from the key patterns."""
    H, I, KV, HD, V, Z = 2048, 11008, 256, 128, 151936, 48
    exp = {}
    for n in range(36):
        p = f"language_model.model.layers.{n}."
        for sfx in ("", "_moe_gen"):
            for proj, out in (("q", H), ("k", KV), ("v", KV)):
                exp[f"{p}self_attn.{proj}_proj{sfx}.weight"] = (out, H)
                exp[f"{p}self_attn.{proj}_proj{sfx}.bias"] = (out,)
            exp[f"{p}self_attn.o_proj{sfx}.weight"] = (H, H)
            exp[f"{p}self_attn.q_norm{sfx}.weight"] = (HD,)
            exp[f"{p}self_attn.k_norm{sfx}.weight"] = (HD,)
            mlp = "mlp" + sfx
            exp[f"{p}{mlp}.gate_proj.weight"] = (I, H)
            exp[f"{p}{mlp}.up_proj.weight"] = (I, H)
            exp[f"{p}{mlp}.down_proj.weight"] = (H, I)
            exp[f"{p}input_layernorm{sfx}.weight"] = (H,)
            exp[f"{p}post_attention_layernorm{sfx}.weight"] = (H,)
    exp.update({
        "language_model.model.embed_tokens.weight": (V, H), "language_model.lm_head.weight": (V, H),
        "language_model.model.norm.weight": (H,), "language_model.model.norm_moe_gen.weight": (H,),
        "vae2llm.weight": (H, Z), "vae2llm.bias": (H,), "llm2vae.weight": (Z, H), "llm2vae.bias": (Z,),
        "time_embedder.mlp.0.weight": (H, 256), "time_embedder.mlp.0.bias": (H,),
        "time_embedder.mlp.2.weight": (H, H), "time_embedder.mlp.2.bias": (H,),
        "latent_pos_embed.pos_embed": (4096, H),
    })
    return exp


def test_full_size_parameter_table():
    exp = expected_full_size_table()
    assert len(exp) == 1021
    assert sum(int(np.prod(s)) for s in exp.values()) == 6_185_205_808
    m = Lance(LanceConfig())  # lazy: parameters are never evaluated
    got = {k: tuple(v.shape) for k, v in tree_flatten(m.parameters())}
    assert got == {k: v for k, v in exp.items() if k != "latent_pos_embed.pos_embed"}
    assert sum(int(np.prod(s)) for s in got.values()) + 4096 * 2048 == 6_185_205_808
    assert m.latent_pos.dims == (682, 682, 684) and m.latent_pos.max_frames == 31
    del m, got
    gc.collect()

"""MoT language model pieces: per-token routing, mRoPE, KV cache prefill / query / decode, key names."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from lance_mlx.config import LLMConfig
from lance_mlx.llm import KVCache, Qwen2ForCausalLM, Routing, apply_rope, mrope_cos_sin, rope_inv_freq, text_positions
from lance_mlx.sequence import attention_mask

ARGS = LLMConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=(1, 1, 2), vocab_size=97, rope_theta=10000.0)


@pytest.fixture(scope="module")
def lm():
    mx.random.seed(3)
    m = Qwen2ForCausalLM(ARGS)
    # random norm weights so that a mis-routed token shows
    params = tree_flatten(m.parameters())
    upd = [(k, 1 + 0.2 * mx.random.normal(v.shape)) for k, v in params if "norm" in k]
    m.load_weights(upd, strict=False)
    mx.eval(m.parameters())
    return m


def rel(a, b):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_key_names_match_upstream():
    names = {k for k, _ in tree_flatten(Qwen2ForCausalLM(ARGS).parameters())}
    p = "model.layers.0."
    for k in ["self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight",
              "self_attn.k_proj_moe_gen.bias", "self_attn.o_proj_moe_gen.weight", "self_attn.q_norm.weight",
              "self_attn.k_norm_moe_gen.weight", "mlp.gate_proj.weight", "mlp_moe_gen.down_proj.weight",
              "input_layernorm.weight", "input_layernorm_moe_gen.weight", "post_attention_layernorm.weight",
              "post_attention_layernorm_moe_gen.weight"]:
        assert p + k in names
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.norm_moe_gen.weight", "lm_head.weight"} <= names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert len(names) == 2 * 28 + 4


@pytest.mark.parametrize("mask", [[0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1], [1, 1, 1], [0, 0]])
def test_routing_matches_per_token_reference(lm, mask):
    mask = np.array(mask, dtype=bool)
    L = len(mask)
    h = mx.random.normal((1, L, ARGS.hidden_size), key=mx.random.key(L))
    pos = text_positions(0, L)
    full = mx.array(attention_mask([L], ["full"]))
    out = lm.model(h, pos, routing=Routing(mask), attn=full)
    # reference: run every token through both experts and pick per token
    ref_und = lm.model(h, pos, routing=Routing(np.zeros(L, bool)), attn=full)
    ref_gen = lm.model(h, pos, routing=Routing(np.ones(L, bool)), attn=full)
    if mask.all() or not mask.any():
        np.testing.assert_allclose(np.array(out), np.array(ref_gen if mask.all() else ref_und), atol=1e-5)
    else:
        # mixing changes attention inputs, so compare one layer-0 routed projection instead
        layer = lm.model.layers[0]
        r = Routing(mask)
        q, k, v = r(h, layer._qkv_und, layer._qkv_gen)
        qu, _, _ = layer._qkv_und(h)
        qg, _, _ = layer._qkv_gen(h)
        ref = np.where(mask[None, :, None, None], np.array(qg), np.array(qu))
        np.testing.assert_allclose(np.array(q), ref, atol=1e-5)
    assert Routing(mask).kind == ("und" if not mask.any() else "gen" if mask.all()
                                  else "segments" if len(mask) <= 5 else "gather")


def test_gather_and_segments_agree(lm):
    mask = np.array([0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0], dtype=bool)  # 11 runs
    h = mx.random.normal((1, len(mask), ARGS.hidden_size), key=mx.random.key(7))
    pos = text_positions(0, len(mask))
    a = Routing(mask)
    saved = Routing.max_segments
    Routing.max_segments = 100
    try:
        c = Routing(mask)
    finally:
        Routing.max_segments = saved
    assert a.kind == "gather" and c.kind == "segments"
    oa = lm.model(h, pos, routing=a, attn="causal")
    oc = lm.model(h, pos, routing=c, attn="causal")
    np.testing.assert_allclose(np.array(oa), np.array(oc), atol=1e-5)


def test_mrope_reduces_to_1d_rope_for_text():
    hd = ARGS.head_dim
    x = mx.random.normal((1, 6, 2, hd), key=mx.random.key(1))
    inv = rope_inv_freq(hd, 10000.0)
    cos, sin = mrope_cos_sin(text_positions(5, 6), inv, ARGS.mrope_section)
    ours = apply_rope(x, cos, sin)
    ref = mx.fast.rope(x.transpose(0, 2, 1, 3), hd, traditional=False, base=10000.0, scale=1.0, offset=5)
    np.testing.assert_allclose(np.array(ours), np.array(ref.transpose(0, 2, 1, 3)), atol=1e-5)


def test_mrope_sections_pick_axes():
    hd = ARGS.head_dim  # 8: frequencies 0 -> t, 1 -> h, 2..3 -> w
    inv = rope_inv_freq(hd, 10000.0)
    pos = np.array([[3], [5], [7]])
    cos, _ = mrope_cos_sin(pos, inv, ARGS.mrope_section)
    ang = np.array([3 * inv[0], 5 * inv[1], 7 * inv[2], 7 * inv[3]])
    np.testing.assert_allclose(np.array(cos)[0], np.cos(np.concatenate([ang, ang])), atol=1e-6)
    assert np.array(mx.array(rope_inv_freq(128, 1e6, bf16=True)).astype(mx.bfloat16).astype(mx.float32)).tolist() \
        == rope_inv_freq(128, 1e6, bf16=True).tolist()


def test_prefill_in_splits_equals_uncached_mask(lm):
    L = 11
    h = mx.random.normal((1, L, ARGS.hidden_size), key=mx.random.key(11))
    pos = np.stack([np.arange(L), np.arange(L) * 2, np.arange(L) + 3])  # distinct axes
    gen = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    lens, modes = [4, 4, 3], ["causal", "full", "causal"]
    ref = lm.model(h, pos, routing=Routing(gen), attn=mx.array(attention_mask(lens, modes)))
    cache = lm.make_cache()
    outs, s = [], 0
    for n, m in zip(lens, modes):
        outs.append(lm.model(h[:, s:s + n], pos[:, s:s + n], routing=Routing(gen[s:s + n]), cache=cache,
                             attn="causal" if m == "causal" else "full"))
        s += n
    assert cache[0].offset == L
    assert rel(mx.concatenate(outs, axis=1), ref) < 1e-5


def test_query_mode_does_not_write(lm):
    h = mx.random.normal((1, 9, ARGS.hidden_size), key=mx.random.key(5))
    pos = text_positions(0, 9)
    cache = lm.make_cache()
    lm.model(h[:, :6], pos[:, :6], cache=cache)
    k0 = np.array(cache[0].state[0])
    q1 = lm.model(h[:, 6:], pos[:, 6:], cache=cache, attn="full", update_cache=False)
    q2 = lm.model(h[:, 6:], pos[:, 6:], cache=cache, attn="full", update_cache=False)
    assert cache[0].offset == 6
    np.testing.assert_array_equal(np.array(cache[0].state[0]), k0)
    np.testing.assert_array_equal(np.array(q1), np.array(q2))
    # equals the uncached forward with the noise-split mask
    ref = lm.model(h, pos, attn=mx.array(attention_mask([6, 3], ["causal", "noise"])))
    assert rel(q1, ref[:, 6:]) < 1e-5


def test_decode_matches_full_forward_and_cache_trim_copy(lm):
    ids = np.array([5, 17, 3, 88, 41, 9, 60, 2])
    full = lm(ids)  # (1, 8, vocab)
    cache = lm.make_cache()
    lm(ids[:5], cache=cache)
    steps = [lm(ids[i:i + 1], cache=cache) for i in range(5, 8)]
    assert cache[0].offset == 8
    assert rel(mx.concatenate(steps, axis=1), full[:, 5:]) < 1e-5
    snap = [c.copy() for c in cache]
    for c in cache:
        assert c.trim(2) == 2
    assert cache[0].offset == 6 and snap[0].offset == 8
    again = lm(ids[6:8], cache=cache)  # re-decode after trimming
    assert rel(again, full[:, 6:]) < 1e-5
    assert rel(lm(np.array([1]), cache=snap), lm(np.concatenate([ids, [1]]))[:, -1:]) < 1e-5


def test_cache_growth_beyond_step():
    c = KVCache()
    c.step = 4
    for i in range(3):
        k = mx.full((1, 2, 3, 5), float(i))
        keys, vals = c.update_and_fetch(k, k)
    assert c.offset == 9 and keys.shape == (1, 2, 9, 5)
    assert np.array(keys)[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    k2, _ = c.fetch_with(mx.zeros((1, 2, 1, 5)), mx.zeros((1, 2, 1, 5)))
    assert k2.shape[2] == 10 and c.offset == 9


def test_bfloat16_cast_runs(lm):
    m = Qwen2ForCausalLM(ARGS)
    m.update(lm.parameters())
    m.set_dtype(mx.bfloat16)
    ids = np.array([5, 17, 3, 88])
    out = m(ids)
    assert out.dtype == mx.bfloat16
    assert rel(out.astype(mx.float32), lm(ids)) < 3e-2
    assert isinstance(m.model.layers[0].self_attn, nn.Module)


def test_without_qk_norm():
    from dataclasses import replace

    m = Qwen2ForCausalLM(replace(ARGS, qk_norm=False))
    names = [k for k, _ in tree_flatten(m.parameters())]
    assert not any("q_norm" in k or "k_norm" in k for k in names) and len(names) == 2 * 24 + 4
    assert m(np.array([1, 2, 3])).shape == (1, 3, ARGS.vocab_size)

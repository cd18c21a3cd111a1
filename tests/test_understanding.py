"""Understanding (x2t): prompt layout, logits parity with transformers' Qwen2.5-VL, cached decode == recompute."""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from fixtures import GOLDEN, golden_lance_weights, write_golden_lance_folder, write_golden_vit_folder
from lance_mlx import sequence as Q
from lance_mlx import understanding as U
from lance_mlx.config import LanceConfig, ViTConfig
from lance_mlx.lance import Lance
from lance_mlx.pipeline import LancePipeline
from lance_mlx.processing import preprocess_image, preprocess_video
from lance_mlx.vit import VisionTransformer, sanitize_vit_weights

RTOL = 1e-4  # max |ours - ref| / max |ref|, float32


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _config(qk_norm=True):
    c = LanceConfig.from_dict(json.loads((GOLDEN / "llm_config.json").read_text()))
    c.llm = replace(c.llm, qk_norm=qk_norm)
    return c


def _lance(qk_norm=True):
    weights = Lance.sanitize(golden_lance_weights())
    if not qk_norm:  # plain Qwen2.5-VL has no q/k norms
        weights = {k: v for k, v in weights.items() if "q_norm" not in k and "k_norm" not in k}
    m = Lance(_config(qk_norm))
    m.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(m.parameters())
    return m


def _vit_weights():
    from safetensors.numpy import load_file

    return load_file(str(GOLDEN / "vit_tiny.safetensors"))


@pytest.fixture(scope="module")
def tok():
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))


@pytest.fixture(scope="module")
def vit():
    v = VisionTransformer(ViTConfig.from_dict(json.loads((GOLDEN / "vit_config.json").read_text())))
    v.load_weights(list(sanitize_vit_weights({k: mx.array(a) for k, a in _vit_weights().items()}).items()),
                   strict=True)
    mx.eval(v.parameters())
    return v


@pytest.fixture(scope="module")
def lance():
    return _lance(qk_norm=True)


def _image():
    return (np.random.default_rng(0).random((100, 140, 3)) * 255).astype(np.uint8)


def _frames(n=4):
    return (np.random.default_rng(1).random((n, 80, 80, 3)) * 255).astype(np.uint8)


VISUALS = {
    # 224-area presets keep the blocks small: image grid (1, 14, 18) -> 63 tokens; video (2, 16, 16) -> 128
    "image": lambda: preprocess_image(Image.fromarray(_image()), "image_256res", vae=False),
    "video": lambda: preprocess_video(_frames(), "video_192p", vae=False),
}


# ------------------------------------------------------------------------------------------------ layout
def test_prompt_layout_matches_template(tok):
    q = "What is in the picture?"
    p = U.build_prompt(tok, (1, 4, 6), "image", q)
    assert p.system_prompt == "Look at the image carefully and answer the question."
    # the same ids as the shared chat template with USER = [visual, question], cut after "assistant\n"
    sys_ids = tok(p.system_prompt, add_special_tokens=False)["input_ids"]
    q_ids = tok(q, add_special_tokens=False)["input_ids"]
    ref = Q.chat_sequence(sys_ids, [Q.vit_split((1, 2, 3)), q_ids], [])
    np.testing.assert_array_equal(p.input_ids, ref.input_ids[:-1])
    assert [s.attn for s in p.sequence.splits] == ["causal", "full", "causal"]
    assert p.input_ids[-3:].tolist() == [Q.IM_START, 77091, Q.NEWLINE]
    # positions: text 0..P, body (P+1, P+1+h, P+1+w), <|vision_end|> at P+1+max+1; no 1000 shift
    P = int(np.flatnonzero(p.input_ids == Q.VISION_START)[0])
    np.testing.assert_array_equal(p.positions[:, :P + 1], np.broadcast_to(np.arange(P + 1), (3, P + 1)))
    body = p.positions[:, P + 1:P + 7]
    np.testing.assert_array_equal(body[0], [P + 1] * 6)
    np.testing.assert_array_equal(body[1], P + 1 + np.repeat(np.arange(2), 3))
    np.testing.assert_array_equal(body[2], P + 1 + np.tile(np.arange(3), 2))
    assert p.positions[:, P + 7].tolist() == [P + 4] * 3
    assert p.last_position == p.positions.max() == p.positions[0, -1] == p.positions[2, -1]
    # the cache takes everything but the final "\n"
    splits, pos = p.context()
    assert sum(len(s) for s in splits) == len(p) - 1 and p.last_token == Q.NEWLINE
    np.testing.assert_array_equal(np.concatenate(pos, axis=1), p.positions[:, :-1])


def test_video_positions_and_caption_prompt(tok):
    p = U.build_prompt(tok, (3, 4, 4), "video")
    assert p.system_prompt == Q.caption_system_prompts("video")[0]  # deterministic choice, see docs
    assert U.build_prompt(tok, (1, 2, 2), "image", caption_index=2).system_prompt == \
        Q.caption_system_prompts("image")[2]
    ids = p.input_ids
    P = int(np.flatnonzero(ids == Q.VISION_START)[0])
    # no question: <|vision_end|> is followed directly by <|im_end|>
    assert ids[P + 13] == Q.VISION_END and ids[P + 14] == Q.IM_END
    np.testing.assert_array_equal(p.positions[0, P + 1:P + 13], P + 1 + 2 * np.repeat(np.arange(3), 4))
    assert p.positions[0, P + 13] == P + 1 + 4 + 1  # max(2 (t-1), h-1, w-1) + 1
    with pytest.raises(ValueError, match="special tokens"):
        U.build_prompt(tok, (1, 2, 2), "image", "look <|vision_start|> here")


# ------------------------------------------------------------------------------------- transformers parity
@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    d = json.loads((GOLDEN / "llm_config.json").read_text())
    d["tie_word_embeddings"] = False  # as Lance runs
    d["vision_config"] = json.loads((GOLDEN / "vit_config.json").read_text())
    cfg = Qwen2_5_VLConfig(**d)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval().float()
    lance_w = golden_lance_weights()
    sd = {}
    for k in model.state_dict():
        if k.startswith("model.visual."):
            continue
        src = "language_model.lm_head.weight" if k == "lm_head.weight" else \
            "language_model.model." + k[len("model.language_model."):]
        sd[k] = torch.from_numpy(lance_w[src])
    sd.update({"model.visual." + k: torch.from_numpy(v) for k, v in _vit_weights().items()})
    model.load_state_dict(sd, strict=True)
    return model


def _hf_run(hf, prompt, visual, bidirectional):
    import torch

    ids = torch.from_numpy(prompt.input_ids)[None]
    mm = (ids == Q.VIDEO_PAD).int() * 2  # 2 = video: the temporal rule of upstream's <|video_pad|> blocks
    grid = torch.tensor([visual.grid_thw])
    sec = torch.tensor([1.0])
    pos, _ = hf.model.get_rope_index(ids, mm, video_grid_thw=grid, second_per_grid_ts=sec)
    kw = {}
    # Lance: the ViT block (markers included) attends both ways (modeling/lance/lance.py::validation_und_KVcache)
    if bidirectional:
        L = ids.shape[1]
        a = int(np.flatnonzero(prompt.input_ids == Q.VISION_START)[0])
        b = int(np.flatnonzero(prompt.input_ids == Q.VISION_END)[0]) + 1
        allowed = torch.ones(L, L).tril().bool()
        allowed[a:b, a:b] = True
        mask = torch.zeros(L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
        kw = dict(attention_mask=mask[None, None], position_ids=pos)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values_videos=torch.from_numpy(visual.vit_patches), video_grid_thw=grid,
                 second_per_grid_ts=sec, mm_token_type_ids=mm, use_cache=False, **kw)
        feats = hf.model.get_video_features(torch.from_numpy(visual.vit_patches), grid).pooler_output[0]
    return out.logits[0].numpy(), pos[:, 0].numpy(), feats.numpy()


@pytest.fixture(scope="module")
def plain_lance():
    return _lance(qk_norm=False)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_prompt_logits_match_transformers(kind, tok, vit, plain_lance, hf_model):
    """Same weights in transformers' Qwen2_5_VLForConditionalGeneration (video placeholder path, eager,
    float32) and in ours with q/k norms off: positions, ViT features and prompt logits agree.

    Plain Qwen2.5-VL is causal everywhere, so the first comparison runs our ViT block causally; the second gives
    transformers an explicit 4-D mask with the block bidirectional, which is Lance's layout."""
    visual = VISUALS[kind]()
    embeds = U.encode_visual(vit, visual.vit_patches, visual.grid_thw)
    prompt = U.build_prompt(tok, visual.grid_thw, kind, "Describe the scene.", vit_embeds=embeds)
    ref_logits, ref_pos, ref_feats = _hf_run(hf_model, prompt, visual, bidirectional=False)
    np.testing.assert_array_equal(prompt.positions, ref_pos)
    assert rel_err(embeds, ref_feats) < RTOL
    ours = U.prompt_logits(plain_lance, prompt.with_visual_attention("causal"))
    assert rel_err(ours, ref_logits) < RTOL

    ref_bi, _, _ = _hf_run(hf_model, prompt, visual, bidirectional=True)
    ours_bi = U.prompt_logits(plain_lance, prompt)
    assert rel_err(ours_bi, ref_bi) < RTOL
    # the two attention layouts really differ (inside and after the block)
    assert rel_err(ref_bi, ref_logits) > 1e-3


# --------------------------------------------------------------------------------------------- decoding
@pytest.fixture(scope="module")
def image_prompt(tok, vit):
    visual = VISUALS["image"]()
    embeds = U.encode_visual(vit, visual.vit_patches, visual.grid_thw)
    return U.build_prompt(tok, visual.grid_thw, "image", "What color is it?", vit_embeds=embeds)


def test_cached_prefill_equals_uncached_mask(lance, image_prompt):
    """Lance layout with q/k norms: split-wise cached prefill == one forward with upstream's sparse mask."""
    assert rel_err(U.prompt_logits(lance, image_prompt), U.sequence_logits(lance, image_prompt)) < RTOL


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_p=0.9, seed=3)])
def test_cached_decode_equals_recompute(lance, tok, image_prompt, sampling):
    n = 10
    res = U.generate(lance, image_prompt, tok, max_tokens=n, keep_logits=True, **sampling).run()
    assert res.finish_reason == "length" and len(res.token_ids) == n == len(res.logits)
    ref = U.sequence_logits(lance, image_prompt, res.token_ids[:-1])[len(image_prompt) - 1:]
    ref = np.array(ref[:, :len(tok)])
    cached = np.concatenate([np.array(l) for l in res.logits])
    assert cached.shape == ref.shape and rel_err(cached, ref) < RTOL
    if not sampling:
        assert res.token_ids == ref.argmax(-1).tolist()
    assert res.prompt_tokens == len(image_prompt) and res.tokens_per_second > 0 and res.prompt_seconds > 0


def test_vocab_mask_and_stop(lance, tok, image_prompt):
    res = U.generate(lance, image_prompt, tok, max_tokens=12, keep_logits=True).run()
    assert max(res.token_ids) < len(tok) == 151665
    # the golden lm_head is 4x larger on the rows beyond the tokenizer, so without upstream's mask the argmax
    # would land there: recompute the unmasked logits and check
    full = np.array(U.sequence_logits(lance, image_prompt, res.token_ids[:-1])[len(image_prompt) - 1:])
    assert (full.argmax(-1) >= len(tok)).any()
    # stop: a decoder that sees <|im_end|> as its first choice stops after one token with empty text
    always_stop = lambda logits: mx.full((1,), Q.IM_END, dtype=mx.int32)
    r = U.generate(lance, image_prompt, tok, max_tokens=5, sampler=always_stop).run()
    assert r.token_ids == [Q.IM_END] and r.finish_reason == "stop" and r.text == ""


def test_sampling_is_seeded(lance, tok, image_prompt):
    run = lambda seed: U.generate(lance, image_prompt, tok, max_tokens=6, temperature=1.5, seed=seed).run()
    a, b, c = run(1), run(1), run(2)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    with pytest.raises(ValueError, match="max_tokens"):
        U.generate(lance, image_prompt, tok, max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        U.generate(lance, image_prompt, tok, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        U.generate(lance, image_prompt, tok, temperature=-1)


def test_streaming_detokenizer_handles_multibyte(tok):
    text = "naïve 日本語 🙂🦜 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # the emoji bytes are split across tokens, so a naive per-token decode would print U+FFFD
    assert any(tok.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    d = U.StreamingDetokenizer(tok)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# ------------------------------------------------------------------------------------------ task API
@pytest.fixture(scope="module")
def pipeline_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("x2t")
    write_golden_lance_folder(root / "Lance_3B")
    write_golden_vit_folder(root / "Qwen2.5-VL-ViT")
    return LancePipeline.from_pretrained(root / "Lance_3B", task="x2t_image", dtype="float32")


def test_understand_api(pipeline_model):
    m = pipeline_model
    text = m.understand(_image(), "What is this?", max_tokens=4)
    assert isinstance(text, str) and text
    stream = m.understand(_image(), "What is this?", max_tokens=4, stream=True)
    pieces = list(stream)
    assert "".join(pieces).strip() == stream.result.text == text
    # a (T, H, W, 3) array is a video (video system prompt)
    res = m.understand(_frames(2), max_tokens=2, stream=True, preset="video_192p").run()
    assert res.generated_tokens == 2
    with pytest.raises(ValueError, match="max_tokens"):
        m.understand(_image(), max_tokens=0)

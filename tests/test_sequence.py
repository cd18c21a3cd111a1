"""Chat templates, splits, position ids and CFG branches of lance_mlx.sequence against upstream's rules."""

import numpy as np
import pytest

from fixtures import GOLDEN
from lance_mlx import sequence as Q

PROMPT = 'A cat holds a poster with rainbow text "STOP"'


@pytest.fixture(scope="module")
def tok():
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "golden_t2i_step.npz")


def test_builtin_system_prompt_ids_match_tokenizer(tok):
    for task in ("t2i", "t2v", "i2v", "image_edit", "video_edit"):
        assert Q.system_prompt_ids(task) == Q.system_prompt_ids(task, tok), task
    # the edit prompts carry U+2019, not ASCII "'"
    assert "\u2019" in Q.SYSTEM_PROMPTS["image_edit"] and "'" not in Q.SYSTEM_PROMPTS["image_edit"]
    assert Q.SYSTEM_PROMPTS["video_edit"].count("video") == 3
    # fixed template pieces
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert Q.HEAD_IDS == ids("<|im_start|>system\n")
    assert Q.USER_IDS == ids("<|im_end|>\n<|im_start|>user\n")
    assert Q.ASSISTANT_IDS == ids("<|im_end|>\n<|im_start|>assistant\n")
    assert [Q.VISION_START, Q.VIDEO_PAD, Q.VISION_END] == ids("<|vision_start|><|video_pad|><|vision_end|>")


def test_t2i_template_matches_golden(tok, golden):
    p = tok(PROMPT, add_special_tokens=False)["input_ids"]
    seq = Q.generation_sequence("t2i", p, (1, 4, 6), tokenizer=tok)
    np.testing.assert_array_equal(seq.input_ids, golden["input_ids"])
    assert seq.split_lens == golden["split_lens"].tolist()
    assert seq.attn_modes == golden["attn_modes"].tolist()
    np.testing.assert_array_equal(seq.modality, golden["sample_modality"])
    np.testing.assert_array_equal(np.flatnonzero(seq.gen_mask), golden["packed_vae_token_indexes"])
    np.testing.assert_array_equal(seq.position_ids(), golden["position_ids_cond"])
    # the rendered text the official code tokenized
    assert tok.decode(seq.input_ids.tolist()) == str(golden["input_text"])


def test_t2i_branches_match_golden(golden):
    p = golden["input_ids"][34:45]
    seq = Q.generation_sequence("t2i", p, (1, 4, 6))
    np.testing.assert_array_equal(seq.input_ids[seq.modality != 0], golden["input_ids_uncond"])
    np.testing.assert_array_equal(seq.position_ids_without([0]), golden["position_ids_uncond"])
    cond, uncond = seq.cfg_branches()
    np.testing.assert_array_equal(cond.kv_position_ids, golden["kv_position_ids_cond"])
    np.testing.assert_array_equal(uncond.kv_position_ids, golden["kv_position_ids_uncond"])
    np.testing.assert_array_equal(cond.noise_positions, golden["noise_query_pos"][0])
    np.testing.assert_array_equal(uncond.noise_positions, golden["noise_query_pos"][1])
    assert cond.context_len == golden["noise_query_kv_len"][0] and uncond.context_len == golden["noise_query_kv_len"][1]
    # modeling/lance/lance.py::validation_gen_KVcache (uncond_split_pro_kvcache): cached splits keep their
    # conditional ids, the noise block is recomputed (starts at 39)
    assert uncond.context_positions[1][0].tolist() == [45, 46, 47, 48, 49]
    assert uncond.noise_positions[0, 0] == 39
    assert [s.attn for s in uncond.context] == ["causal", "causal"]


def test_video_latent_positions():
    p = [32, 8251, 1467]
    t, h, w = 3, 2, 5
    seq = Q.generation_sequence("t2v", p, (t, h, w))
    pos = seq.position_ids()
    k = seq.noise_index
    start = sum(seq.split_lens[:k])
    P = start  # text positions are consecutive before the block
    assert (pos[:, start] == P).all()
    body = pos[:, start + 1:start + 1 + t * h * w].reshape(3, t, h, w)
    ti, hi, wi = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    np.testing.assert_array_equal(body[0], P + 1 + 2 * ti)  # tokens_per_second 2
    np.testing.assert_array_equal(body[1], P + 1 + hi)
    np.testing.assert_array_equal(body[2], P + 1 + wi)
    ve = P + 2 + max(2 * (t - 1), h - 1, w - 1)
    assert (pos[:, start + 1 + t * h * w] == ve).all()
    assert (pos[:, -1] == ve + 1).all()


def test_image_pad_collapses_time():
    ids = [1, Q.VISION_START] + [Q.IMAGE_PAD] * 8 + [Q.VISION_END, 2]
    pos = Q.get_rope_index(ids, [(2, 4, 4)])
    assert (pos[0, 2:10] == 2).all()  # temporal index 0 for every frame of an image_pad block


def test_edit_layout_and_shift():
    instr = [32, 8251, 9982]
    vit_grid, lat = (1, 3, 4), (1, 2, 3)
    seq = Q.edit_sequence(instr, vit_grid, lat)
    assert seq.attn_modes == ["causal", "full", "full_noise", "causal", "causal", "noise", "causal"]
    mods = [int(s.modality[0]) for s in seq.splits]
    assert mods == [-1, 4, 2, 0, -1, 1, -1]
    pos = seq.position_ids()
    lens = seq.split_lens
    st = np.cumsum([0] + lens)
    a, M = lens[0], max(vit_grid[1], vit_grid[2])
    vit = pos[:, st[1]:st[2]]
    assert vit[:, 0].tolist() == [1000, a, a]  # VS: t-axis shifted to 1000 only
    assert vit[:, 1].tolist() == [1001, a + 1, a + 1]
    assert vit[:, -1].tolist() == [1001 + M, a + 1 + M, a + 1 + M]
    Qs = a + 2 + M
    cond = pos[:, st[2]:st[3]]
    assert (cond[:, 0] == Qs).all() and cond[:, 1].tolist() == [Qs + 1] * 3
    assert (cond[:, -1] == Qs + 1 + max(lat[1], lat[2])).all()
    np.testing.assert_array_equal(pos[:, st[5]:st[6]], cond)  # the target reuses the conditioning ids
    # gen routing: conditioning and target latents, not their markers
    assert seq.splits[2].gen_mask.tolist() == [False] + [True] * 6 + [False]
    cond_b, uncond_b = seq.cfg_branches()
    assert len(uncond_b.context) == 4  # A, ViT, cond latents, E (the instruction dropped)
    np.testing.assert_array_equal(uncond_b.noise_positions, cond)
    np.testing.assert_array_equal(uncond_b.context_positions[3], pos[:, st[4]:st[5]])  # E keeps its cond ids


def test_attention_mask_semantics():
    lens, modes = [2, 3, 2, 3, 1], ["causal", "full", "causal", "noise", "causal"]
    m = Q.attention_mask(lens, modes)
    assert m.shape == (11, 11)
    assert m[1, 0] and not m[0, 1]  # causal text
    assert m[2, 4] and m[4, 2]  # bidirectional inside the full split
    assert m[5, 4] and not m[5, 6]  # text after it: causal
    assert m[7:10, 7:10].all()  # noise block bidirectional
    assert m[7, :7].all()  # sees all context
    assert not m[10, 7:10].any() and m[10, 10] and m[10, :7].all()  # nothing outside sees the noise block
    assert Q.attention_mask([2, 2], ["causal", "full_noise"])[2, 3]  # full_noise acts as full


def test_prompt_located_by_first_occurrence():
    # Upstream searches the prompt's ids in the whole sequence: a prompt that repeats the start of the system
    # prompt is found there, so that span is the dropped one.
    sys_ids = Q.system_prompt_ids("t2i")
    seq = Q.generation_sequence("t2i", sys_ids[:3], (1, 2, 2))
    assert seq.split_lens[:3] == [3, 3, 23 + 5 + 3 + 5]
    assert (seq.splits[1].modality == 0).all()


def test_prompt_not_found_raises():
    with pytest.raises(ValueError, match="prompt"):
        Q.chat_sequence(Q.system_prompt_ids("t2i"), [[1, 2]], [Q.latent_split((1, 1, 1))], prompt_ids=[3, 4])


def test_split_validation():
    with pytest.raises(ValueError, match="attention mode"):
        Q.Split(ids=[1], attn="bidirectional", modality=-1)
    with pytest.raises(ValueError, match="latent role"):
        Q.latent_split((1, 1, 1), role="reference")

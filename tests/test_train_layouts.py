"""Training examples against upstream's training data code: the packed fields its dataset + pack_sequence build for
t2i, image edit and i2t rows (tests/golden/golden_train_layouts.npz, tests/golden/README.md) must be ours.

Upstream facts pinned here (bytedance/Lance at 4baeee08):
- token order: t2i USER = [caption], ASSISTANT = [target]; edit USER = [ViT block, conditioning latents,
  instruction] (dataset_x2v_interleave.py rotates the text to the end), the source in its own aspect bucket;
  i2t USER = [ViT block, question], ASSISTANT = [answer] (dataset_x2t_interleave.py); template
  data/system_prompt_render.py, rendered then stripped;
- system prompts: t2i generate_system_prompt("t2v", "image") (t2i_local.yaml sets no sample_task), edit
  generate_system_prompt("edit", "image"), neither sampled; i2t the row's caption_i (data/common.py);
- drops: text (TEXT_COND_DROPOUT_PROB) leaves the caption / instruction out, nothing in its place; the ViT drop
  (VIT_COND_DROPOUT_PROB) leaves out the ViT block and the conditioning latents; i2t has none;
- conditioning latents at timestep -inf (t = 0 after the sigmoid), the target at one z per block
  (dataset_base_train.py::pack_sequence); MSE on the target body, CE on the answer and <|im_end|> from the token
  before each (expand_and_index_by_token_ids_new + pack_sequence); positions by Lance.forward's get_rope_index +
  data/common.py::shift_position_ids.
"""

import random

import numpy as np
import pytest

from fixtures import GOLDEN

CASES = {  # name -> (task, text drop, vision drop): a drop probability of 1 always drops, 0 never
    "t2i": ("t2i", 0.0, 0.0), "t2i_droptext": ("t2i", 1.0, 0.0),
    "edit": ("edit", 0.0, 0.0), "edit_droptext": ("edit", 1.0, 0.0), "edit_dropvision": ("edit", 0.0, 1.0),
    "edit_dropboth": ("edit", 1.0, 1.0), "edit_aspect": ("edit", 0.0, 0.0), "i2t_q": ("i2t", 0.0, 0.0),
    "i2t_noq": ("i2t", 0.0, 0.0),
}


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "golden_train_layouts.npz")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))


class LayoutModel:
    """Stands in for Lance in `objective.pack`: records the timestep each block is embedded at."""

    def __init__(self):
        self.t = {}

    def embed_split(self, split, x=None, t=0.0):
        import mlx.core as mx

        self.t[split.attn] = float(mx.array(t).item())
        return mx.zeros((1, len(split), 2))


def item_of(golden, name):
    from lance_mlx.train.data import Item

    inp = (lambda k: str(golden[f"inputs/{k}"]))
    task = CASES[name][0]
    if task == "i2t":
        return Item(name, inp("caption_a"), b"", question=inp("caption_q") if name == "i2t_q" else None,
                    system=inp("caption_i"))
    return Item(name, inp("caption" if task == "t2i" else "instruction"), b"")


def features_of(golden, tok, item, task, name=""):
    """An item's features with zero latents / ViT features on the golden grids (only the layout matters); case
    `edit_aspect`: a pair whose source and target fall in different aspect buckets."""
    import mlx.core as mx

    from lance_mlx.train import data as D

    f = D.text_features(item, tok)
    shape = tuple(int(v) for v in golden["inputs/latent_grid"])
    vit_grid = tuple(int(v) for v in golden["inputs/vit_grid"])
    zeros = mx.zeros((int(np.prod(shape)), 48))
    if task in ("t2i", "edit"):
        f.target_mu, f.target_log_var, f.shape = zeros, zeros, shape
    if task == "edit":
        f.source_mu, f.source_log_var = zeros, zeros
    if name == "edit_aspect":
        f.source_shape, f.shape = shape, tuple(int(v) for v in golden["inputs/edit_aspect_target_grid"])
        f.target_mu = f.target_log_var = mx.zeros((int(np.prod(f.shape)), 48))
    if task in ("edit", "i2t"):
        f.vit, f.vit_grid = mx.zeros((int(np.prod(vit_grid)), 8)), vit_grid
    return f


def check_layout(golden, name, ex):
    """Every packed field of upstream's sample equals ours."""
    import mlx.core as mx

    from lance_mlx.train import objective as O

    g = (lambda k: golden[f"{name}/{k}"])
    seq = ex.seq
    assert seq.input_ids.tolist() == g("input_ids").tolist()
    assert seq.split_lens == g("split_lens").tolist()
    assert seq.attn_modes == [str(m) for m in g("attn_modes")]
    assert seq.modality.tolist() == g("modality").tolist()
    assert np.array(seq.rope_grids).reshape(-1, 3).tolist() == g("grids").tolist()

    model = LayoutModel()
    targets = ex.target_splits
    z = [float(v) for v in g("packed_timesteps")[np.isfinite(g("packed_timesteps"))][:1]] if targets else []
    draws = [O.Draw(z, [mx.zeros((int(np.prod(seq.splits[i].grid)), 48)) for i in targets])]
    packed = O.pack(model, [ex], draws)
    assert packed.positions.tolist() == g("positions").tolist()
    gen = np.nonzero(packed.gen_mask)[0]
    assert gen.tolist() == (g("packed_vae_token_indexes").tolist() if f"{name}/packed_vae_token_indexes" in golden
                            else [])
    starts = np.cumsum([0] + seq.split_lens)
    vit = [j for i, s in enumerate(seq.splits) if s.kind == "vit" for j in range(starts[i] + 1, starts[i + 1] - 1)]
    assert vit == (g("packed_vit_token_indexes").tolist() if f"{name}/packed_vit_token_indexes" in golden else [])
    text = sorted(set(range(len(seq))) - set(gen.tolist()) - set(vit))
    assert text == g("text_indexes").tolist()
    if targets:  # the target body at its z, conditioning latents at upstream's -inf, i.e. t = 0
        assert packed.mse_index.tolist() == g("mse_loss_indexes").tolist()
        ts = g("packed_timesteps")
        assert np.isfinite(ts).sum() == len(packed.mse_index) and len(set(ts[np.isfinite(ts)])) == 1
        assert model.t["noise"] == pytest.approx(float(O.shifted_timestep(z[0]).item()))
        assert ("full_noise" in model.t) == bool(np.isneginf(ts).any())
        assert model.t.get("full_noise", 0.0) == 0.0
    else:
        assert f"{name}/mse_loss_indexes" not in golden and len(packed.mse_index) == 0
    if ex.ce_index is not None:
        assert packed.ce_index.tolist() == g("ce_loss_indexes").tolist()
        assert packed.labels.tolist() == g("packed_label_ids").tolist()
    else:
        assert f"{name}/ce_loss_indexes" not in golden


@pytest.mark.parametrize("name", list(CASES))
def test_examples_match_upstream_training_data(golden, tok, name):
    import mlx.core as mx

    from lance_mlx.train import data as D

    task, text_drop, vision_drop = CASES[name]
    f = features_of(golden, tok, item_of(golden, name), task, name)
    ex = D.build_example(f, task, random.Random(0), mx.random.key(0), text_drop, vision_drop,
                         D.understanding_prompts(tok) if task == "i2t" else None)
    check_layout(golden, name, ex)


def test_i2t_parquet_rows_build_upstreams_samples(golden, tok, tmp_path):
    """Upstream's image2text parquet (image_bytes, caption_i, caption_q, caption_a) read by `find_items` gives the
    samples upstream builds from the same rows: its caption_i as the system prompt, "" as no question."""
    import io

    import mlx.core as mx
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from lance_mlx.train import data as D

    buf = io.BytesIO()
    Image.new("RGB", (84, 56), "green").save(buf, "PNG")
    inp = (lambda k: str(golden[f"inputs/{k}"]))
    rows = {"image_bytes": [buf.getvalue()] * 2, "caption_i": [inp("caption_i")] * 2,
            "caption_q": [inp("caption_q"), ""], "caption_a": [inp("caption_a")] * 2}
    pq.write_table(pa.table(rows), tmp_path / "i2t.parquet")
    items = D.find_items(tmp_path / "i2t.parquet", "i2t")
    assert [(i.system, i.question, i.text) for i in items] == [
        (inp("caption_i"), inp("caption_q"), inp("caption_a")), (inp("caption_i"), None, inp("caption_a"))]
    for item, name in zip(items, ("i2t_q", "i2t_noq")):
        ex = D.build_example(features_of(golden, tok, item, "i2t"), "i2t", random.Random(0), mx.random.key(0),
                             prompts=D.understanding_prompts(tok))
        check_layout(golden, name, ex)


def test_generation_system_prompts_are_fixed(tok):
    """t2i and edit train with one system prompt each (upstream's lists have one entry); the t2i one is
    generate_system_prompt("t2v", vision_type="image"), not the t2i inference prompt."""
    import mlx.core as mx

    from lance_mlx.sequence import SYSTEM_PROMPT_T2V, system_prompt_ids
    from lance_mlx.train import data as D

    assert tok.decode(D.T2I_TRAIN_SYSTEM_IDS) == SYSTEM_PROMPT_T2V.replace("video", "image")
    assert D.T2I_TRAIN_SYSTEM_IDS != system_prompt_ids("t2i")
    f = D.Features(text_ids=np.array([64, 3015]), target_mu=mx.zeros((4, 48)), target_log_var=mx.zeros((4, 48)),
                   shape=(1, 2, 2))
    heads = {tuple(D.build_example(f, "t2i", random.Random(s), mx.random.key(s), 0.0).seq.input_ids[:40])
             for s in range(8)}
    assert len(heads) == 1


def test_manifest_system_prompt(golden, tok, tmp_path):
    """A JSONL i2t row's "system" is the item's system prompt, like a parquet row's caption_i."""
    import json

    import mlx.core as mx
    from PIL import Image

    from lance_mlx.train import data as D

    Image.new("RGB", (84, 56), "green").save(tmp_path / "a.png")
    inp = (lambda k: str(golden[f"inputs/{k}"]))
    row = {"image": "a.png", "answer": inp("caption_a"), "question": inp("caption_q"), "system": inp("caption_i")}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(dict(row, system="  ")) + "\n")
    items = D.find_items(tmp_path / "m.jsonl", "i2t")
    assert [i.system for i in items] == [inp("caption_i"), None]
    ex = D.build_example(features_of(golden, tok, items[0], "i2t"), "i2t", random.Random(0), mx.random.key(0),
                         prompts=D.understanding_prompts(tok))
    check_layout(golden, "i2t_q", ex)


def test_edit_pair_of_two_aspects_trains(tmp_path):
    """A source and target in different aspect buckets are cached with their own grids (the features cache keeps
    the source's; an older cache without it reads as the target's) and give a finite loss on the tiny model."""
    import json

    import mlx.core as mx
    from PIL import Image

    from lance_mlx.train import data as D
    from lance_mlx.train import objective as O
    from tiny_checkpoints import tiny_pipeline

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 96, 3), dtype=np.uint8)).save(tmp_path / "a.png")  # wide source
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a_target.png")
    (tmp_path / "a.txt").write_text("make it square")
    pipe = tiny_pipeline()
    f = D.cache_features(D.find_items(tmp_path, "edit"), "edit", pipe, tmp_path / "cache", 128, 112)[0]
    assert f.source_shape != f.shape and f.source_mu.shape[0] == int(np.prod(f.source_shape))
    ex = D.build_example(f, "edit", random.Random(0), mx.random.key(0), 0.0, 0.0)
    cond = [s for s in ex.seq.splits if s.attn == "full_noise"]
    assert [s.grid for s in cond] == [f.source_shape] and ex.seq.splits[ex.seq.noise_index].grid == f.shape
    r = O.losses(pipe.model, O.pack(pipe.model, [ex], [O.draw(ex, mx.random.key(1))]))
    assert np.isfinite(float(r.loss.item())) and r.mse_tokens == int(np.prod(f.shape))

    path = next((tmp_path / "cache").glob("*.safetensors"))
    arrays, meta = mx.load(str(path), return_metadata=True)
    del meta["source_shape"]
    mx.save_safetensors(str(path), arrays, metadata=meta)
    assert D.load_features(path).source_shape is None and json.loads(meta["shape"]) == list(f.shape)

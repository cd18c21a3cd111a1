"""LancePipeline.from_pretrained on the upstream layout: components per task, dtype handling, size checks."""

import mlx.core as mx
import numpy as np
import pytest

from lance_mlx import Lance, LancePipeline
from lance_mlx.loading import Precision
from lance_mlx.tasks import latent_grid


@pytest.fixture(scope="module")
def root(upstream_root):
    return upstream_root


def test_components_follow_the_task(root):
    t2i = LancePipeline.from_pretrained(root, task="t2i", dtype="float32")
    assert t2i.vae is not None and t2i.vit is None and len(t2i.tokenizer) == 151665
    x2t = LancePipeline.from_pretrained(root, task="x2t_image", dtype="float32")
    assert x2t.vit is not None and x2t.vae is None
    with pytest.raises(ValueError, match="has no vae"):
        x2t.generate_image("a cat", width=32, height=32)


def test_bf16_load_rounds_rope_frequencies_like_upstream(root):
    m = LancePipeline.from_pretrained(root, task="t2i", dtype="bfloat16").model
    assert m.language_model.model.rope_bf16_inv_freq is True
    assert m.language_model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert LancePipeline.from_pretrained(root, task="t2i", dtype="float32").model \
        .language_model.model.rope_bf16_inv_freq is False
    assert LancePipeline.from_pretrained(root, task="t2i", dtype="bfloat16", rope_bf16=False).model \
        .language_model.model.rope_bf16_inv_freq is False


def test_precision_groups_the_dtype_keywords(root):
    """`precision=Precision(...)` loads as its fields passed as keywords; a keyword overrides the same field."""
    m = LancePipeline.from_pretrained(root, task="t2i", precision=Precision(dtype="bfloat16", rope_bf16=False,
                                                                            compute_dtype="float32")).model
    assert m.language_model.model.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert m.language_model.model.rope_bf16_inv_freq is False and m.compute_dtype == mx.float32
    m = LancePipeline.from_pretrained(root, task="t2i", precision=Precision(dtype="bfloat16"), dtype="float32").model
    assert m.language_model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    with pytest.raises(TypeError, match="dtyp"):
        LancePipeline.from_pretrained(root, task="t2i", dtyp="float32")


def test_generate_image_is_sample_t2i_then_decode(root):
    m = LancePipeline.from_pretrained(root, task="t2i", dtype="float32")
    noise = mx.random.normal((1, 1, 2, 3, 48), key=mx.random.key(3))
    img = m.generate_image("a red fox", width=48, height=32, steps=2, noise=noise)
    latent = m.model.sample_t2i(prompt="a red fox", tokenizer=m.tokenizer, latent_shape=(1, 2, 3), num_steps=2,
                                noise=noise)
    assert img.size == (48, 32)
    assert np.array_equal(np.asarray(img), m.decode(latent)[0])


@pytest.mark.parametrize("w,h,msg", [(30, 32, "use e.g. 16 or 32"), (32, 0, "not a positive multiple"),
                                     (16, 31760, "past the model's 3-D position table")])
def test_output_size_errors(w, h, msg):
    with pytest.raises(ValueError, match=msg):
        latent_grid(w, h)
    assert latent_grid(1024, 576) == (36, 64)


def test_empty_prompt(root):
    m = LancePipeline.from_pretrained(root, task="t2i", dtype="float32")
    with pytest.raises(ValueError, match="prompt is empty"):
        m.generate_image("   ", width=32, height=32)


def test_seed_api_strict_load_of_a_raw_upstream_file(tmp_path):
    """The seed's hand-wired loading: Lance(build_lance_config(json)) + load_weights(mx.load(...), strict=True)."""
    import json

    from fixtures import write_golden_lance_folder
    from lance_mlx import build_lance_config

    folder = write_golden_lance_folder(tmp_path / "Lance_3B")
    model = Lance(build_lance_config(json.loads((folder / "llm_config.json").read_text())))
    raw = mx.load(str(folder / "model.safetensors"))
    assert "latent_pos_embed.pos_embed" in raw  # stored upstream, rebuilt here
    model.load_weights(list(raw.items()), strict=True)
    model.load_weights(str(folder / "model.safetensors"), strict=True)
    assert mx.array_equal(model.vae2llm.weight, raw["vae2llm.weight"])
    latent = model.sample_t2i(prompt_token_ids=mx.array([32, 8251], dtype=mx.int32), latent_shape=(1, 2, 2),
                              num_steps=1, seed=0,
                              special_token_ids={"bos": 151644, "eos": 151645, "image_token_id": 151655})
    assert latent.shape == (1, 1, 2, 2, 48)

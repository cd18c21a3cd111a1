"""Qwen2.5-VL ViT: parity with transformers' reference, weight sanitizing, full-size parameter layout."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from fixtures import GOLDEN, write_golden_vit_folder
from lance_mlx import vit as vit_mod
from lance_mlx.config import ViTConfig
from lance_mlx.vit import VisionTransformer, load_vit, merged_token_count, sanitize_vit_weights

GOLDEN_CFG = json.loads((GOLDEN / "vit_config.json").read_text())
# A second small geometry: 2x2-unit windows (56 px), two full-attention blocks, head_dim 16.
FRESH_CFG = dict(depth=3, hidden_size=64, hidden_act="silu", intermediate_size=96, num_heads=4, in_channels=3,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=56,
                 out_hidden_size=48, fullatt_block_indexes=[0, 2])

# (t, h, w) patch grids. Merged 6x10 with 4x4 windows -> 2x3 windows, the bottom/right ones partial;
# 8x12 (224x336 px) -> windows tile exactly (upstream appends empty windows and drops them);
# a 6-frame video (3 temporal patches) of 5x7 merged tokens; and an image + video in one call.
CASES = {
    "image_uneven_windows": [(1, 12, 20)],
    "image_224x336": [(1, 16, 24)],
    "video_6_frames": [(3, 10, 14)],
    "image_and_video": [(1, 12, 20), (3, 10, 14)],
}


def _golden_weights_np():
    from safetensors.numpy import load_file

    return load_file(str(GOLDEN / "vit_tiny.safetensors"))


def _random_weights_np(cfg, seed=0):
    """Every tensor random (norm weights around 1, biases non-zero) in PyTorch layout and bare key names."""
    import torch
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in
                  Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**cfg)).state_dict().items()}
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in shapes.items():
        if "norm" in k or "ln_q" in k:
            out[k] = (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
        else:
            fan_in = int(np.prod(s[1:])) if len(s) > 1 else s[0]
            out[k] = (rng.standard_normal(s) / np.sqrt(fan_in)).astype(np.float32)
    return out


def _reference(cfg, weights_np, x, grids):
    import torch
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    c = Qwen2_5_VLVisionConfig(**cfg)
    c._attn_implementation = "eager"
    model = Qwen2_5_VisionTransformerPretrainedModel(c).eval().float()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights_np.items()}, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.tensor(grids)).pooler_output.numpy()


def _ours(cfg, weights_np):
    model = VisionTransformer(ViTConfig.from_dict(cfg))
    weights = sanitize_vit_weights({k: mx.array(v) for k, v in weights_np.items()})
    model.load_weights(list(weights.items()), strict=True)
    return model


def _rel_err(a, b):
    """max |a - b| / max |b|."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _inputs(grids, seed=1):
    n = sum(t * h * w for t, h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, 1176)).astype(np.float32)


@pytest.mark.parametrize("weights", ["golden", "fresh"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(weights, case):
    cfg = GOLDEN_CFG if weights == "golden" else FRESH_CFG
    w = _golden_weights_np() if weights == "golden" else _random_weights_np(FRESH_CFG)
    grids = CASES[case]
    x = _inputs(grids)
    ref = _reference(cfg, w, x, grids)
    out = _ours(cfg, w)(mx.array(x), grids)
    assert out.shape == ref.shape == (merged_token_count(grids), cfg["out_hidden_size"])
    assert _rel_err(out, ref) < 1e-4


def test_grid_forms_and_chunked_attention_agree(monkeypatch):
    model = _ours(GOLDEN_CFG, _golden_weights_np())
    grids = CASES["image_and_video"]
    x = mx.array(_inputs(grids))
    base = model(x, grids)
    np.testing.assert_array_equal(np.array(model(x, np.array(grids))), np.array(base))
    np.testing.assert_array_equal(np.array(model(x, mx.array(grids))), np.array(base))
    # Force one segment per SDPA call (the memory-bounded path) on fresh index plans.
    monkeypatch.setattr(vit_mod, "_SCORE_BUDGET", 1)
    vit_mod._plan.cache_clear()
    np.testing.assert_allclose(np.array(model(x, grids)), np.array(base), rtol=1e-5, atol=1e-6)
    vit_mod._plan.cache_clear()


def test_bad_inputs_raise():
    model = _ours(GOLDEN_CFG, _golden_weights_np())
    with pytest.raises(ValueError, match="needs"):
        model(mx.zeros((10, 1176)), [(1, 4, 4)])
    with pytest.raises(ValueError, match="multiples of 2"):
        model(mx.zeros((15, 1176)), [(1, 3, 5)])


def test_bfloat16_close_to_float32():
    model = _ours(GOLDEN_CFG, _golden_weights_np())
    grids = CASES["video_6_frames"]
    x = mx.array(_inputs(grids))
    ref = np.array(model(x, grids))
    model.set_dtype(mx.bfloat16)
    out = model(x, grids)
    assert out.dtype == mx.bfloat16
    assert _rel_err(out.astype(mx.float32), ref) < 5e-2


def test_golden_checkpoint_loads_strictly_and_sanitize_is_idempotent(tmp_path):
    raw = {k: mx.array(v) for k, v in _golden_weights_np().items()}
    assert raw["patch_embed.proj.weight"].shape == (32, 3, 2, 14, 14)  # PyTorch Conv3d layout on disk
    cfg = ViTConfig.from_dict(GOLDEN_CFG)
    once = sanitize_vit_weights(raw, cfg)
    assert once["patch_embed.proj.weight"].shape == (32, 2, 14, 14, 3)
    for twice in (sanitize_vit_weights(once, cfg), sanitize_vit_weights(once)):
        assert twice.keys() == once.keys()
        for k in once:
            assert twice[k].shape == once[k].shape and mx.array_equal(twice[k], once[k]).item()
    assert sanitize_vit_weights(raw).keys() == once.keys()  # without a config: same decision

    model = VisionTransformer(cfg)
    model.load_weights(list(once.items()), strict=True)
    names = dict(tree_flatten(model.parameters()))
    assert names.keys() == raw.keys()

    # The folder loader (config.json + vit.safetensors) gives the same model.
    loaded = load_vit(write_golden_vit_folder(tmp_path / "Qwen2.5-VL-ViT"))
    grids = CASES["image_uneven_windows"]
    x = mx.array(_inputs(grids))
    np.testing.assert_array_equal(np.array(loaded(x, grids)), np.array(model(x, grids)))


def test_sanitize_strips_prefixes_and_drops_other_tensors():
    raw = {k: mx.array(v) for k, v in _golden_weights_np().items()}
    bundled = {f"vit_model.{k}": v for k, v in raw.items()}
    bundled["language_model.model.norm.weight"] = mx.ones((8,))  # a Lance_3B_Video checkpoint holds both
    hf = {f"visual.{k}": v for k, v in raw.items()}
    hf["visual.rotary_pos_emb.inv_freq"] = mx.ones((4,))
    expected = sanitize_vit_weights(raw)
    for w in (bundled, hf, {f"model.visual.{k}": v for k, v in raw.items()}):
        out = sanitize_vit_weights(w)
        assert out.keys() == expected.keys()
        assert out["patch_embed.proj.weight"].shape == (32, 2, 14, 14, 3)
    with pytest.raises(ValueError, match="expected"):
        sanitize_vit_weights({"patch_embed.proj.weight": mx.zeros((32, 3, 2, 16, 16))}, ViTConfig.from_dict(GOLDEN_CFG))


def _spec_vit_shapes():
    """Key/shape table of Qwen2.5-VL-ViT/vit.safetensors (PyTorch layout, modeling/vit/qwen2_5_vl_vit.py) for the
    full-size ViT."""
    shapes = {"patch_embed.proj.weight": (1280, 3, 2, 14, 14)}
    for n in range(32):
        b = f"blocks.{n}."
        shapes.update({
            b + "norm1.weight": (1280,), b + "norm2.weight": (1280,),
            b + "attn.qkv.weight": (3840, 1280), b + "attn.qkv.bias": (3840,),
            b + "attn.proj.weight": (1280, 1280), b + "attn.proj.bias": (1280,),
            b + "mlp.gate_proj.weight": (3420, 1280), b + "mlp.gate_proj.bias": (3420,),
            b + "mlp.up_proj.weight": (3420, 1280), b + "mlp.up_proj.bias": (3420,),
            b + "mlp.down_proj.weight": (1280, 3420), b + "mlp.down_proj.bias": (1280,),
        })
    shapes.update({
        "merger.ln_q.weight": (1280,),
        "merger.mlp.0.weight": (5120, 5120), "merger.mlp.0.bias": (5120,),
        "merger.mlp.2.weight": (2048, 5120), "merger.mlp.2.bias": (2048,),
    })
    return shapes


def test_full_size_parameter_layout():
    model = VisionTransformer(ViTConfig())  # arrays stay lazy: nothing is evaluated here
    params = dict(tree_flatten(model.parameters()))
    spec = _spec_vit_shapes()
    assert len(params) == len(spec) == 390
    assert params.keys() == spec.keys()
    for k, shape in spec.items():
        want = (1280, 2, 14, 14, 3) if k == "patch_embed.proj.weight" else shape  # MLX conv layout
        assert tuple(params[k].shape) == want, k
    assert sum(int(np.prod(v.shape)) for v in params.values()) == 668_684_288


def test_bfloat16_rotary_table_matches_torch_bf16_buffer():
    """Upstream casts the ViT to bf16, so inv_freq, the position arange, their product and cos/sin are bf16."""
    import torch

    model = VisionTransformer(ViTConfig())
    n = 83  # up to a 1162 px side: positions past 64 round coarsely in bf16 angles
    pos = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2).astype(np.int32)
    cos, sin = model._rotary_tables(pos, bf16=True)
    dim = 1280 // 16 // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).to(torch.bfloat16)
    freqs = torch.outer(torch.arange(n, dtype=torch.bfloat16), inv_freq)[torch.from_numpy(pos).long()].flatten(1)
    emb = torch.cat([freqs, freqs], dim=-1)
    np.testing.assert_array_equal(np.array(cos[:, 0]), emb.cos().float().numpy())
    np.testing.assert_array_equal(np.array(sin[:, 0]), emb.sin().float().numpy())
    cos32, _ = model._rotary_tables(pos, bf16=False)
    assert np.abs(np.array(cos32[:, 0]) - emb.cos().float().numpy()).max() > 0.1  # the emulation matters

"""Model-folder resolution, safetensors validation and hub errors (no network needed)."""

import json

import mlx.core as mx
import pytest

from fixtures import write_golden_lance_folder, write_golden_vit_folder
from lance_mlx import checkpoints, loading
from lance_mlx.conversion import ConversionOptions, convert
from lance_mlx.errors import WeightsError


@pytest.fixture(scope="module")
def upstream_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    write_golden_lance_folder(root / "Lance_3B")
    write_golden_vit_folder(root / "Qwen2.5-VL-ViT")
    (root / "Wan2.2_VAE.pth").write_bytes(b"placeholder")
    return root


def test_locate_upstream_root_and_subfolder(upstream_root):
    f = checkpoints.locate(upstream_root, "t2i")
    assert f.layout == "upstream" and f.llm_weights == [upstream_root / "Lance_3B" / "model.safetensors"]
    assert f.vae_weights == upstream_root / "Wan2.2_VAE.pth" and f.vit_weights is None
    g = checkpoints.locate(upstream_root / "Lance_3B", "image_edit")  # a checkpoint folder: ViT/VAE found beside it
    assert g.vit_weights == upstream_root / "Qwen2.5-VL-ViT" / "vit.safetensors"
    assert g.tokenizer_dir == upstream_root / "Lance_3B"


def test_checkpoint_kind_of_upstream_folders(upstream_root, tmp_path):
    assert checkpoints.locate(upstream_root, "t2i").checkpoint == "image"
    assert checkpoints.locate(upstream_root / "Lance_3B", "t2i").checkpoint == "image"
    (tmp_path / "Wan2.2_VAE.pth").write_bytes(b"placeholder")
    write_golden_lance_folder(tmp_path / "Lance_3B_Video")
    # a folder picked by its llm_config.json goes by its own name; a mismatch with the task is not an error here
    assert checkpoints.locate(tmp_path / "Lance_3B_Video", "t2i").checkpoint == "video"
    write_golden_lance_folder(tmp_path / "renamed")
    assert checkpoints.locate(tmp_path / "renamed", "t2i").checkpoint is None


def test_checkpoint_kind_for_each_task():
    assert {t: checkpoints.checkpoint_kind_for(t) for t in checkpoints.TASKS} == {
        "t2i": "image", "image_edit": "image", "x2t_image": "image",
        "t2v": "video", "i2v": "video", "video_edit": "video", "x2t_video": "video"}
    with pytest.raises(ValueError, match="unknown task"):
        checkpoints.checkpoint_kind_for("paint")


def test_missing_parts_are_named_with_the_fix(upstream_root, tmp_path):
    with pytest.raises(WeightsError, match=r"Lance_3B_Video.*hf download"):
        checkpoints.locate(upstream_root, "t2v")
    (tmp_path / "Lance_3B").mkdir()
    (tmp_path / "Lance_3B" / "llm_config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"no model.safetensors.*hf download"):
        checkpoints.locate(tmp_path, "x2t_image")
    with pytest.raises(WeightsError, match="not a Lance model folder"):
        checkpoints.locate(upstream_root / "Qwen2.5-VL-ViT", "t2i")
    with pytest.raises(WeightsError, match="not found"):
        checkpoints.locate(tmp_path / "nope", "t2i")
    with pytest.raises(ValueError, match="unknown task"):
        checkpoints.locate(upstream_root, "paint")


def test_vit_missing_for_understanding(tmp_path):
    write_golden_lance_folder(tmp_path / "Lance_3B")
    with pytest.raises(WeightsError, match=r"vit.safetensors.*Qwen2.5-VL-ViT"):
        checkpoints.locate(tmp_path, "x2t_image")


def test_truncated_and_corrupt_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    mx.save_safetensors(str(good), {"x": mx.ones((64, 64))})
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-1000])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    (tmp_path / "text.safetensors").write_bytes(b"hello world, not weights at all")
    assert set(loading.load_safetensors([good])) == {"x"}
    with pytest.raises(WeightsError, match="truncated"):
        loading.load_safetensors([tmp_path / "cut.safetensors"])
    for name in ("junk", "text"):
        with pytest.raises(WeightsError, match="corrupt"):
            loading.load_safetensors([tmp_path / f"{name}.safetensors"])
    w = loading.load_safetensors([good], dtype=mx.bfloat16)
    assert w["x"].dtype == mx.bfloat16


def test_sharded_index_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    mx.save_safetensors(str(tmp_path / "model-00001-of-00002.safetensors"), {"a": mx.zeros((2,))})
    with pytest.raises(WeightsError, match=r"missing weight shards \['model-00002-of-00002.safetensors'\]"):
        checkpoints.sharded_files(tmp_path)


def test_check_keys_lists_problems():
    from mlx import nn

    m = nn.Linear(4, 3)
    with pytest.raises(WeightsError) as e:
        loading.check_keys(m, {"weight": mx.zeros((3, 5)), "extra": mx.zeros((1,))}, "test model")
    msg = str(e.value)
    assert "missing keys (1): bias" in msg and "unexpected keys (1): extra" in msg
    assert "weight (3, 5) vs expected (3, 4)" in msg


def test_dtype_names():
    assert loading.parse_dtype("bfloat16") == mx.bfloat16
    with pytest.raises(ValueError, match="use one of float32, bfloat16, float16"):
        loading.parse_dtype("fp8")


def test_hub_patterns_fetch_only_what_a_task_needs():
    p = checkpoints.hub_patterns(checkpoints.UPSTREAM_REPO, None, "t2i", converted=False)
    assert "Lance_3B/model.safetensors" in p and "Wan2.2_VAE.pth" in p
    assert not any("Video" in x or "ViT" in x for x in p)
    p = checkpoints.hub_patterns(checkpoints.UPSTREAM_REPO, None, "x2t_video", converted=False)
    assert "Lance_3B_Video/model.safetensors" in p and "Qwen2.5-VL-ViT/vit.safetensors" in p
    assert "Wan2.2_VAE.pth" not in p
    p = checkpoints.hub_patterns("me/lance-mlx", None, "t2i", converted=True)
    assert "vae.safetensors" in p and "vit.safetensors" not in p


def test_offline_without_cache_names_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(WeightsError) as e:
        checkpoints.resolve("bytedance-research/Lance", "t2i")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "Lance_3B/model.safetensors" in msg and "hf download" in msg


def _offline_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def test_conversion_from_an_uncached_repo_offline_names_every_file(tmp_path, monkeypatch):
    _offline_empty_cache(tmp_path, monkeypatch)
    with pytest.raises(WeightsError) as e:
        convert("bytedance-research/Lance", tmp_path / "out", options=ConversionOptions(video=True), progress=False)
    msg = str(e.value)
    for name in ("Lance_3B_Video/model.safetensors", "Qwen2.5-VL-ViT/vit.safetensors", "Wan2.2_VAE.pth",
                 "HF_HUB_OFFLINE"):
        assert name in msg
    assert not (tmp_path / "out").exists()


def test_single_folder_repo_offline_names_its_files(tmp_path, monkeypatch):
    _offline_empty_cache(tmp_path, monkeypatch)
    with pytest.raises(WeightsError) as e:
        checkpoints.resolve("someone/Lance-3B-MLX", "t2i")
    msg = str(e.value)
    assert "config.json" in msg and "model*.safetensors" in msg and "vae.safetensors" in msg


def test_offline_conversion_from_the_cache(tmp_path, monkeypatch):
    """A repo id served from a populated HF cache with HF_HUB_OFFLINE=1 (as after one online run)."""
    import tiny_checkpoints as tiny
    cache = _offline_empty_cache(tmp_path, monkeypatch)
    repo = cache / "models--bytedance-research--Lance"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny.write_tiny_upstream_root(repo / "snapshots" / commit)
    out = convert("bytedance-research/Lance", tmp_path / "out", options=ConversionOptions(dtype="float32"),
                  progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlx_layout"] and cfg["conversion"]["source"] == "bytedance-research/Lance"


def test_other_port_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    mx.save_safetensors(str(tmp_path / "model.safetensors"),
                        {"layers.0.mlp.gate_proj.weight": mx.zeros((2, 2)), "embed_tokens.weight": mx.zeros((2, 2))})
    with pytest.raises(WeightsError, match="no tokenizer files"):
        checkpoints.locate(tmp_path, "t2i")


def test_key_styles_map_to_upstream_names():
    stripped = {"embed_tokens.weight": 1, "layers.3.self_attn.q_proj_moe_gen.scales": 2, "norm_moe_gen.weight": 3,
                "lm_head.weight": 4, "vae_in_proj.vae2llm.bias": 5, "time_embedder.proj_out.weight": 6,
                "llm2vae.llm2vae.weight": 7, "llm2vae.bias": 8, "latent_pos_embed.pos_embed": 9}
    assert checkpoints.llm_key_style(stripped) == "stripped"
    assert loading.normalize_llm_keys(stripped, "stripped") == {
        "language_model.model.embed_tokens.weight": 1,
        "language_model.model.layers.3.self_attn.q_proj_moe_gen.scales": 2,
        "language_model.model.norm_moe_gen.weight": 3, "language_model.lm_head.weight": 4, "vae2llm.bias": 5,
        "time_embedder.mlp.2.weight": 6, "llm2vae.weight": 7, "llm2vae.bias": 8, "latent_pos_embed.pos_embed": 9}
    assert checkpoints.llm_key_style(["language_model.model.layers.0.mlp.up_proj.weight"]) == "upstream"
    assert checkpoints.llm_key_style(["transformer.h.0.weight"]) is None
    assert loading.normalize_vae_keys({"encoder.conv1.conv.weight": 1, "encoder.head.0.gamma": 2}) == {
        "encoder.conv1.weight": 1, "encoder.head.0.gamma": 2}
    assert loading.normalize_vae_keys({"decoder.upsamples.0.upsamples.0.residual.layer_2.weight": 1,
                                 "decoder.middle.1.to_qkv_weight": 2, "decoder.middle.1.proj_bias": 3,
                                 "decoder.upsamples.1.upsamples.3.resample_weight": 4,
                                 "decoder.upsamples.1.upsamples.3.time_conv.bias": 5}) == {
        "decoder.upsamples.0.upsamples.0.residual.2.weight": 1, "decoder.middle.1.to_qkv.weight": 2,
        "decoder.middle.1.proj.bias": 3, "decoder.upsamples.1.upsamples.3.resample.1.weight": 4,
        "decoder.upsamples.1.upsamples.3.time_conv.bias": 5}

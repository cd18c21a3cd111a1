"""Config parsing: upstream llm_config.json, our config.json, unknown keys."""

import json
from pathlib import Path

from lance_mlx.config import LanceConfig, LLMConfig, build_lance_config

ROOT = Path(__file__).parent.parent
GOLDEN = Path(__file__).parent / "golden"


def test_repo_config_is_the_release_architecture():
    cfg = LanceConfig.from_file(ROOT / "config.json")
    assert cfg == LanceConfig()
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.head_dim) == (2048, 36, 128)
    assert cfg.llm.mrope_section == (16, 24, 24)
    assert cfg.vit.fullatt_block_indexes == (7, 15, 23, 31)
    assert (cfg.vae.c_dim, cfg.vae.dec_dim, cfg.vae.z_dim) == (160, 256, 48)
    assert cfg.max_latent_frames == 31


def test_upstream_llm_config():
    d = json.loads((GOLDEN / "llm_config.json").read_text())
    cfg = build_lance_config(d)
    assert cfg.llm.hidden_size == 64 and cfg.llm.mrope_section == (2, 3, 3)
    assert cfg.llm.tie_word_embeddings is False  # upstream unties despite the file's flag
    assert cfg.vit.depth == 2 and cfg.vit.out_hidden_size == 64
    assert cfg.video_pad_token_id == 151656 and cfg.image_pad_token_id == 151655
    assert cfg.im_start_token_id == 151644  # the config's bos (151643) is not the template's <|im_start|>


def test_unknown_keys_are_ignored_and_round_trip():
    d = LanceConfig().to_dict()
    d["llm"]["something_new"] = 1
    d["extra"] = {"a": 1}
    assert LanceConfig.from_dict(d) == LanceConfig()
    assert LLMConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2}).head_dim == 4

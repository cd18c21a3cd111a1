"""Configuration dataclasses for Lance (LLM, ViT, VAE, generation constants) and their JSON forms."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

# Source tags used in comments below:
#   [llm_config]  upstream Lance_3B/llm_config.json (Qwen2.5-VL-3B text tower)
#   [sh]          upstream inference_lance.sh (flags passed to the official inference)
#   [ckpt]        implied by tensor shapes in Lance_3B/model.safetensors
#   [vit_config]  upstream Qwen2.5-VL-ViT/config.json
#   [wan]         Wan2.2 vae2_2.py (`_video_vae` / `Wan2_2_VAE` arguments)


def _from_dict(cls, d: Dict[str, Any]):
    """Build dataclass `cls` from `d`, ignoring unknown keys (Hugging Face style configs carry many)."""
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k in names:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


@dataclass
class LLMConfig:
    """The Qwen2.5-VL-3B text tower with Lance's Mixture-of-Transformers (und + gen) experts."""

    hidden_size: int = 2048  # [llm_config], [ckpt]
    intermediate_size: int = 11008  # [llm_config], [ckpt]
    num_hidden_layers: int = 36  # [llm_config], [ckpt]
    num_attention_heads: int = 16  # [llm_config]
    num_key_value_heads: int = 2  # [llm_config], [ckpt] k_proj (256, 2048)
    rms_norm_eps: float = 1e-6  # [llm_config]; also used by the q/k norms
    rope_theta: float = 1_000_000.0  # [llm_config]
    mrope_section: Tuple[int, ...] = (16, 24, 24)  # [llm_config] rope_scaling.mrope_section
    vocab_size: int = 151936  # [llm_config], [ckpt] embed_tokens rows
    max_position_embeddings: int = 128000  # [llm_config]
    # [llm_config] says true, but upstream runs with --tie_word_embeddings false and stores lm_head [sh], [ckpt].
    tie_word_embeddings: bool = False
    # Per-head RMSNorm on q and k before RoPE, both experts ([sh] --llm_qk_norm true). Plain Qwen2.5-VL has none;
    # False is only used to compare with reference Qwen2.5-VL implementations.
    qk_norm: bool = True
    # Vision timing used by the mRoPE index rule: tokens_per_second * second_per_grid_t (1.0) [vit_config].
    tokens_per_second: int = 2
    spatial_merge_size: int = 2  # [vit_config]; VAE grids are passed doubled so the merge yields the latent grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LLMConfig":
        d = dict(d)
        rope = d.get("rope_scaling") or {}
        if "mrope_section" in rope and "mrope_section" not in d:
            d["mrope_section"] = rope["mrope_section"]
        vision = d.get("vision_config") or {}
        for k in ("tokens_per_second", "spatial_merge_size"):
            if k in vision and k not in d:
                d[k] = vision[k]
        # Upstream always unties lm_head regardless of the file's flag (see field comment).
        d.pop("tie_word_embeddings", None)
        return _from_dict(cls, d)


@dataclass
class ViTConfig:
    """The Qwen2.5-VL vision tower shipped as Qwen2.5-VL-ViT/."""

    depth: int = 32  # [vit_config]
    hidden_size: int = 1280  # [vit_config]
    intermediate_size: int = 3420  # [vit_config]
    num_heads: int = 16  # [vit_config]
    in_channels: int = 3  # [vit_config] (in_chans)
    patch_size: int = 14  # [vit_config]
    temporal_patch_size: int = 2  # [vit_config]
    spatial_merge_size: int = 2  # [vit_config]
    tokens_per_second: int = 2  # [vit_config]
    window_size: int = 112  # [vit_config] pixels: 4x4 merged tokens per window
    out_hidden_size: int = 2048  # [vit_config] merger output = LLM hidden size
    fullatt_block_indexes: Tuple[int, ...] = (7, 15, 23, 31)  # [vit_config]
    hidden_act: str = "silu"  # [vit_config]
    rms_norm_eps: float = 1e-6  # Qwen2.5-VL vision RMSNorm default

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ViTConfig":
        d = dict(d)
        if "in_chans" in d and "in_channels" not in d:
            d["in_channels"] = d["in_chans"]
        return _from_dict(cls, d)


@dataclass
class VAEConfig:
    """Wan 2.2 VAE as built by upstream Lance."""

    z_dim: int = 48  # [wan]
    c_dim: int = 160  # [wan] encoder base width (`dim`)
    dec_dim: int = 256  # [wan] decoder base width; differs from c_dim in the release
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)  # [wan]
    num_res_blocks: int = 2  # [wan]
    temperal_downsample: Tuple[bool, ...] = (False, True, True)  # [wan] (upstream spelling)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VAEConfig":
        return _from_dict(cls, d)


@dataclass
class LanceConfig:
    """Everything needed to build and run a Lance checkpoint."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)

    latent_channels: int = 48  # VAE z_dim; one token per latent voxel (latent_patch_size 1 1 1) [sh]
    latent_patch_size: int = 1  # [sh] --latent_patch_size 1 1 1
    max_latent_size: int = 64  # [sh] ⇒ at most 64 latent rows/cols = 1024 px per side
    max_num_frames: int = 121  # [sh] ⇒ 121 // 4 + 1 = 31 latent frames in the 3-D position table
    vae_spatial_stride: int = 16  # [wan] 2x2 patchify then three stride-2 stages
    vae_temporal_stride: int = 4  # [wan] two temporal stride-2 stages
    timestep_frequency_dim: int = 256  # upstream TimestepEmbedder frequency_embedding_size

    # Token ids of the Qwen2.5-VL tokenizer used by the pipelines (upstream data_utils.add_special_tokens).
    pad_token_id: int = 151643  # <|endoftext|>
    im_start_token_id: int = 151644  # <|im_start|> (upstream "bos")
    im_end_token_id: int = 151645  # <|im_end|> (upstream "eos"; ends understanding answers)
    vision_start_token_id: int = 151652  # <|vision_start|>
    vision_end_token_id: int = 151653  # <|vision_end|>
    image_pad_token_id: int = 151655  # <|image_pad|> (unused by upstream's template)
    video_pad_token_id: int = 151656  # <|video_pad|>: upstream's placeholder for images and videos alike
    # len(tokenizer): logits for ids at or above it are masked to -inf when decoding text (upstream lance.py).
    tokenizer_vocab_size: int = 151665

    # Set by convert.py: weights on disk are already in MLX layout (no remapping needed at load).
    mlx_layout: bool = False
    # {"bits": 4|8, "group_size": N, "experts": "all"|"und"|"gen"} when the LLM linears are quantized.
    quantization: Optional[Dict[str, Any]] = None

    @property
    def max_latent_frames(self) -> int:
        return self.max_num_frames // self.vae_temporal_stride + 1

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LanceConfig":
        """Accepts upstream `llm_config.json` (a Qwen2.5-VL config) or our own `config.json`."""
        d = dict(d)
        if "llm" in d:  # our layout: {"llm": {...}, "vit": {...}, "vae": {...}, ...}
            llm = LLMConfig.from_dict(d.pop("llm"))
            vit = ViTConfig.from_dict(d.pop("vit", {}))
            vae = VAEConfig.from_dict(d.pop("vae", {}))
        else:  # upstream llm_config.json: the LLM fields at top level, ViT under vision_config
            llm = LLMConfig.from_dict(d)
            vit = ViTConfig.from_dict(d.get("vision_config", {}))
            vae = VAEConfig()
            d = {k: v for k, v in d.items() if k.endswith("_token_id")}
            # Qwen2.5-VL's config calls <|image_pad|> image_token_id and <|video_pad|> video_token_id.
            for ours, theirs in (("image_pad_token_id", "image_token_id"), ("video_pad_token_id", "video_token_id")):
                if theirs in d:
                    d[ours] = d.pop(theirs)
            d.pop("bos_token_id", None)  # the config's bos is <|endoftext|>; pipelines use <|im_start|>
            d.pop("eos_token_id", None)
            d.pop("vision_token_id", None)
        cfg = _from_dict(cls, d)
        cfg.llm, cfg.vit, cfg.vae = llm, vit, vae
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path) -> "LanceConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-convert the model folder") from None
        return cls.from_dict(data)


def build_lance_config(cfg_json: Dict[str, Any]) -> LanceConfig:
    """Build a `LanceConfig` from a parsed `config.json` / `llm_config.json` dict."""
    return LanceConfig.from_dict(cfg_json)

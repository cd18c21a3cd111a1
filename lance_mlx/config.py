"""Configuration dataclasses for Lance (LLM, ViT, VAE, generation constants) and their JSON forms."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from .errors import WeightsError, WeightsNotFoundError

# Source tags used in comments below:
#   [llm_config]  upstream Lance_3B/llm_config.json (Qwen2.5-VL-3B text tower)
#   [sh]          upstream inference_lance.sh (flags passed to the official inference)
#   [factory]     upstream config/config_factory.py (defaults the script does not override)
#   [infer]       upstream inference_lance.py
#   [ckpt]        implied by tensor shapes in Lance_3B/model.safetensors
#   [vit_config]  upstream Qwen2.5-VL-ViT/config.json
#   [wan]         Wan2.2 vae2_2.py (`_video_vae` / `Wan2_2_VAE` arguments)

# Token ids of the Qwen2.5-VL vocabulary used by every template (upstream data/data_utils.py::add_special_tokens,
# which adds nothing new to this tokenizer; inference_lance.py uses <|video_pad|> as the image token too).
ENDOFTEXT = 151643  # <|endoftext|>
IM_START = 151644  # <|im_start|> (upstream "bos")
IM_END = 151645  # <|im_end|> (upstream "eos"; ends understanding answers)
VISION_START = 151652  # <|vision_start|>
VISION_END = 151653  # <|vision_end|>
IMAGE_PAD = 151655  # <|image_pad|> (never produced by upstream's template)
VIDEO_PAD = 151656  # <|video_pad|>: upstream's placeholder for images and videos alike
NEWLINE = 198  # "\n"
TOKENIZER_VOCAB_SIZE = 151665  # len(tokenizer): ids at or above it never decode to text [infer]

# Upstream's global seed ([factory] `global_seed = 2025`): it, not the noise seed, drives the VAE posterior sample
# of conditioning latents and the pixel noise of image-to-video.
POSTERIOR_SEED = 2025
# Upstream saves generated videos at 12 fps ([infer] `save_fps`).
OUTPUT_FPS = 12.0
# Longest understanding answer ([infer] MAX_GENERATION_LENGTH = 256, greedy).
MAX_ANSWER_TOKENS = 256


class ConfigValueError(WeightsError):
    """A config.json value of the wrong type; the loaders add the file's name."""


def _check_type(cls, name: str, default, value) -> None:
    """A config value must have its default's type (ints for ints, numbers for floats, lists for tuples)."""
    if default is None or isinstance(default, dict):
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        for x in value if ok and default else ():
            _check_type(cls, f"{name}[]", default[0], x)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a finite number", tuple: "a list",
                str: "a string"}.get(type(default), type(default).__name__)
        raise ConfigValueError(f"{cls.__name__} value {name!r} must be {kind}, got {type(value).__name__} {value!r}")


def _from_dict(cls, d: Dict[str, Any]):
    """Build dataclass `cls` from `d`, ignoring unknown keys (Hugging Face style configs carry many); values of
    the wrong type raise ConfigValueError naming the key."""
    if not isinstance(d, dict):
        raise ConfigValueError(f"{cls.__name__} must be a JSON object, got {type(d).__name__}")
    kwargs = {}
    for f in fields(cls):
        if f.name in d:
            v = d[f.name]
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is None and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            _check_type(cls, f.name, default, v)
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
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
        if isinstance(rope, dict) and "mrope_section" in rope and "mrope_section" not in d:
            d["mrope_section"] = rope["mrope_section"]
        vision = d.get("vision_config") or {}
        for k in () if not isinstance(vision, dict) else ("tokens_per_second", "spatial_merge_size"):
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
    max_latent_size: int = 64  # [sh] ⇒ table entry t*64*64 + h*64 + w; wider grids wrap (sizes.TABLE_ROWS)
    max_num_frames: int = 121  # [sh] ⇒ 121 // 4 + 1 = 31 latent frames in the 3-D position table
    # [wan] 2x2 patchify then three stride-2 stages; output sizes are multiples of it
    vae_spatial_stride: int = 16
    # [wan] frame 0 is encoded alone, then groups of 4: pixel frame counts are 4k + 1
    vae_temporal_stride: int = 4
    timestep_frequency_dim: int = 256  # upstream TimestepEmbedder frequency_embedding_size

    # Token ids of the Qwen2.5-VL tokenizer used by the pipelines (upstream data_utils.add_special_tokens).
    pad_token_id: int = ENDOFTEXT
    im_start_token_id: int = IM_START
    im_end_token_id: int = IM_END
    vision_start_token_id: int = VISION_START
    vision_end_token_id: int = VISION_END
    image_pad_token_id: int = IMAGE_PAD
    video_pad_token_id: int = VIDEO_PAD
    # len(tokenizer): logits for ids at or above it are masked to -inf when decoding text (upstream lance.py).
    tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE

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
            raise WeightsNotFoundError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path} is not valid JSON ({e}); re-download or re-convert the model folder") from None
        return cls.from_dict(data)


def build_lance_config(cfg_json: Dict[str, Any]) -> LanceConfig:
    """Build a `LanceConfig` from a parsed `config.json` / `llm_config.json` dict."""
    return LanceConfig.from_dict(cfg_json)


# ---------------------------------------------------------------------------------------------------------------
# Sampling settings

# Flow-matching solvers (lance_mlx/solvers.py, docs/solvers.md); upstream samples with Euler steps
# (lance.py::validation_gen_KVcache), the default.
SAMPLERS = ("euler", "dpm++2m", "unipc")
MAX_STEPS = 1000  # our bound: far past any useful schedule, small enough to fail fast on a typo
MAX_GUIDANCE = 50.0  # our bound on guidance scales (upstream uses 4.0; beyond ~20 images saturate)
MAX_SHIFT = 100.0  # our bound on the schedule shift (upstream 3.5; 0 would give t = 0 at every step)
MAX_SEED = 2**63  # seeds are integers in [0, 2**63)


def check_number(name: str, value, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    """`value` as int/float, or InvalidRequestError / InvalidTypeError naming `name`, the range and the fix.
    A one-word `name` is also the error's `param`."""
    import math
    import numbers

    from .errors import InvalidRequestError, InvalidTypeError

    param = name if " " not in name else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "an integer" if integer else "a number"
        raise InvalidTypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}", param)
    if not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", param)
    if integer:
        if not float(value).is_integer():
            raise InvalidRequestError(f"{name} must be a whole number, got {value!r}; use e.g. {int(value)}", param)
        value = int(value)
    else:
        value = float(value)
    if value < lo or value > hi or (lo_open and value == lo):
        if integer and hi == MAX_SEED - 1:
            span = f"[{lo}, 2**63)"
        else:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise InvalidRequestError(f"{name} {value!r} is out of range: use a value in {span}", param)
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How a generation task samples: upstream's defaults, once. Validated on construction.

    Defaults: 30 Euler steps, schedule shift 3.5, text guidance 4.0, seed 42 ([sh] NUM_STEPS, TIMESTEP_SHIFT,
    CFG_TEXT_SCALE, SEED); guidance active for 0.4 < t <= 1.0 with global renorm clamped below at 0.0 ([factory]
    cfg_interval, cfg_renorm_type "global", cfg_renorm_min). `cfg_image` > 1 turns on our three-branch image
    guidance for edits (upstream's cfg_vit path cannot run; docs/editing.md); 1.0 is off, exactly upstream.
    `noise` (optional) replaces the seeded initial noise: (N, 48) or (1, t, h, w, 48), for exact comparisons.
    """

    steps: int = 30
    shift: float = 3.5
    cfg_text: float = 4.0
    cfg_image: float = 1.0
    cfg_interval: Tuple[float, float] = (0.4, 1.0)
    renorm_min: float = 0.0
    seed: int = 42
    noise: Any = field(default=None, compare=False, repr=False)
    sampler: str = "euler"

    def __post_init__(self):
        from .errors import InvalidRequestError, InvalidTypeError

        set_ = object.__setattr__  # frozen: normalize in place once
        set_(self, "steps", check_number("steps", self.steps, 1, MAX_STEPS, integer=True))
        set_(self, "shift", check_number("timestep shift", self.shift, 0.0, MAX_SHIFT, lo_open=True))
        set_(self, "cfg_text", check_number("text guidance scale (cfg)", self.cfg_text, 0.0, MAX_GUIDANCE))
        set_(self, "cfg_image", check_number("image guidance scale (cfg-img)", self.cfg_image, 0.0, MAX_GUIDANCE))
        set_(self, "renorm_min", check_number("renorm minimum", self.renorm_min, 0.0, 1.0))
        set_(self, "seed", check_number("seed", self.seed, 0, MAX_SEED - 1, integer=True))
        interval = self.cfg_interval
        if isinstance(interval, str) or not hasattr(interval, "__len__") or len(interval) != 2:
            raise InvalidTypeError(f"the guidance interval must be two numbers LO,HI, got {interval!r}")
        lo = check_number("guidance interval start", interval[0], 0.0, 1.0)
        hi = check_number("guidance interval end", interval[1], 0.0, 1.0)
        if lo >= hi:
            raise InvalidRequestError(f"the guidance interval ({lo:g}, {hi:g}] is empty: its start must be below its "
                                      "end, e.g. 0.4,1.0 (upstream)")
        set_(self, "cfg_interval", (lo, hi))
        if not isinstance(self.sampler, str):
            raise InvalidTypeError(f"the sampler must be a name ({', '.join(SAMPLERS)}), got "
                                   f"{type(self.sampler).__name__}", "sampler")
        sampler = self.sampler.strip().lower()
        if sampler not in SAMPLERS:
            raise InvalidRequestError(f"unknown sampler {self.sampler!r}: use one of {', '.join(SAMPLERS)}", "sampler")
        set_(self, "sampler", sampler)

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some settings changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            from .errors import InvalidTypeError

            raise InvalidTypeError(f"unknown sampling setting(s) {', '.join(unknown)}: use "
                                   f"{', '.join(f.name for f in fields(self))}")
        return dataclasses.replace(self, **changes)

    def as_metadata(self) -> Dict[str, Any]:
        """The settings as plain values for output metadata (noise left out)."""
        return {"steps": self.steps, "timestep_shift": self.shift, "cfg_text": self.cfg_text,
                "cfg_img": self.cfg_image, "cfg_interval": f"{self.cfg_interval[0]:g},{self.cfg_interval[1]:g}",
                "renorm_min": self.renorm_min, "seed": self.seed, "sampler": self.sampler}


DEFAULT_SAMPLING = SamplingParams()

"""Peak memory of a request, estimated before anything loads, and the check that refuses what cannot fit.

The model is the one `bench/memory.py` measures (docs/memory.md "How the table is measured"): the weights each
phase holds plus the largest phase's activations (the guided step per noise token, the context prefill and KV
caches per context token, the ViT per patch, the VAE encode and streamed decode per pixel). The per-token and
per-pixel bytes below are that bench's calibration at the full-size model (bf16 LLM and ViT, float32 VAE,
MLX's fused attention), scaled to the model's width and to the dtypes asked for.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from .errors import InsufficientMemoryError, InvalidRequestError

GIB = 2**30

# Calibration of bench/memory.py (docs/memory.md, "Peak memory per task"): activation bytes at hidden size 2048.
CALIBRATION_HIDDEN = 2048
STEP_PER_NOISE_TOKEN = 280_135  # a guided step, both guidance branches batched, bf16
PREFILL_PER_TOKEN = 33_669  # context prefill, transient, per context token of one branch, bf16
VIT_PER_PATCH = 103_941  # ViT forward per (unmerged) patch row, bf16
# VAE (float32), lines through two measured sizes (bytes = a + b * output pixels): image decodes at 512² (1.32 GiB)
# and 768² (2.77 GiB); video decodes (chunks of 4 frames, streamed: independent of length) at 256² (1.27 GiB) and
# 448x256 (2.12 GiB); the encode of a 768² image (1.02 GiB) per pixel.
IMAGE_DECODE = (1.32 * GIB - 262_144 * (1.45 * GIB / 327_680), 1.45 * GIB / 327_680)
VIDEO_DECODE = (1.27 * GIB - 65_536 * (0.85 * GIB / 49_152), 0.85 * GIB / 49_152)
ENCODE_PER_PIXEL = 1.02 * GIB / 589_824
VIDEO_ENCODE_CHUNK = 4  # assumed, not measured: a video encode holds one 4-frame chunk like the decode
TEXT_TOKENS_OVERHEAD = 80  # template and special tokens around a prompt (bench: 23 for t2i, 73 for an edit)
CHARS_PER_TOKEN = 3  # a prompt's tokens estimated from its length before the tokenizer loads (generous)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SKIP_ENV = "LANCE_MLX_SKIP_MEMORY_CHECK"  # set to 1 to run without the check (like --skip-memory-check)
AVAILABLE_ENV = "LANCE_MLX_AVAILABLE_MEMORY"  # override what counts as available, e.g. "12G" or bytes


@dataclass(frozen=True)
class MemoryOptions:
    """The loading options that change the peak, as `LancePipeline.from_pretrained` takes them; `config` is the
    model's geometry (default: the full-size Lance)."""

    dtype: str = "bfloat16"
    compute_dtype: Optional[str] = None
    low_memory: bool = False
    und_bits: Optional[int] = None
    vae_dtype: Optional[str] = None
    config: object = None  # LanceConfig
    vae_scale: float = 1.0  # a VAE narrower than Wan 2.2's (test checkpoints): its weights and activations scale

    @classmethod
    def from_args(cls, args, config=None, vae_scale: float = 1.0) -> "MemoryOptions":
        return cls(args.dtype, args.compute_dtype, args.low_memory, args.und_bits, None, config, vae_scale)


@dataclass(frozen=True)
class Weights:
    """Bytes of each component's weights as loaded."""

    llm: int
    vit: int
    vae: int


# -------------------------------------------------------------------------------- composition (one definition)
def generation_peak(w: Weights, encode: float, prefill: float, step: float, decode: float, *, low_memory: bool,
                    vit_loaded: bool, vae_encodes: bool) -> float:
    """Peak of a generation run. Default: every weight the task loads + the largest phase. Low-memory
    (pipeline.py): the encoders sit beside the LLM only while encoding, the LLM with its caches while
    denoising, the VAE alone while decoding."""
    vit = w.vit if vit_loaded else 0
    if not low_memory:
        return w.llm + vit + w.vae + max(encode, prefill, step, decode)
    encoders = vit + w.vae + encode if vae_encodes else 0
    return max(w.llm + encoders, w.llm + max(prefill, step), w.vae + decode)


def understanding_peak(w: Weights, vit_run: float, prompt_run: float, *, low_memory: bool) -> float:
    """Peak of an understanding run: LLM + ViT, then the prompt's prefill and KV caches; low-memory releases the
    ViT after its embeddings are evaluated."""
    if not low_memory:
        return w.llm + w.vit + max(vit_run, prompt_run)
    return max(w.llm + w.vit + vit_run, w.llm + prompt_run)


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Keys and values of one context token of one branch over all layers."""
    llm = config.llm
    return 2 * llm.num_key_value_heads * llm.head_dim * dtype_bytes * llm.num_hidden_layers


# ------------------------------------------------------------------------------------------------- weights
def _full_config():
    from .config import LanceConfig

    return LanceConfig()


def _parameter_bytes(module, dtype_bytes: int, und_bits: Optional[int] = None) -> int:
    """Bytes of a lazily built module's parameters (nothing is evaluated), with the und expert's quantizable
    linears at `und_bits` (weights + bf16 scales and biases per group of 64) when given."""
    from mlx import nn
    from mlx.utils import tree_flatten

    from .quantize import is_quantized_linear

    total = sum(v.size for _, v in tree_flatten(module.parameters())) * dtype_bytes
    if und_bits:
        for path, m in module.named_modules():
            if isinstance(m, nn.Linear) and is_quantized_linear(path, "und", m.weight.shape[-1], 64):
                n = m.weight.size
                total -= n * dtype_bytes - (n * und_bits // 8 + 2 * (n // 64) * 2)
    return total


_WEIGHTS = {}  # (config, dtypes, und_bits) -> Weights: building the lazy model takes ~0.5 s


def weight_bytes(options: MemoryOptions) -> Weights:
    """Weights as loaded: parameter counts of the model built lazily from its config (no memory is allocated)."""
    key = repr((options.config, options.dtype, options.vae_dtype, options.und_bits))
    if key not in _WEIGHTS:
        _WEIGHTS[key] = _weight_bytes(options)
    return _WEIGHTS[key]


def _weight_bytes(options: MemoryOptions) -> Weights:
    from .lance import Lance
    from .vae_wan22 import Wan2_2_VAE
    from .vit import VisionTransformer

    cfg = options.config or _full_config()
    b = DTYPE_BYTES.get(options.dtype, 2)
    vb = DTYPE_BYTES.get(options.vae_dtype or options.dtype, 2)
    llm_cfg = replace(cfg, quantization=None) if getattr(cfg, "quantization", None) else cfg
    llm = _parameter_bytes(Lance(llm_cfg), b, options.und_bits)
    q = getattr(cfg, "quantization", None)
    if q and q.get("bits"):  # a quantized folder: both experts' linears (or the stored selection) at its bits
        llm = int(llm * (q["bits"] / 8 / b + 0.15))
    vae = _parameter_bytes(Wan2_2_VAE().model, vb) * options.vae_scale
    return Weights(llm, _parameter_bytes(VisionTransformer(cfg.vit), b), int(vae))


# ----------------------------------------------------------------------------------------------- activations
def _width_scale(cfg, compute_bytes: int) -> float:
    return cfg.llm.hidden_size / CALIBRATION_HIDDEN * compute_bytes / 2


def _decode(t: int, h: int, w: int, vae_bytes: float) -> float:
    a, b = VIDEO_DECODE if t > 1 else IMAGE_DECODE
    return (a + b * 256 * h * w) * vae_bytes / 4


def _vit_patches(width: int, height: int, frames: int, resolution: int) -> int:
    from .processing import VIT_CROP, nearest_bucket

    bh, bw = nearest_bucket(width, height, resolution)
    bh, bw = bh - bh % VIT_CROP, bw - bw % VIT_CROP
    return (frames + 1) // 2 * (bh // 14) * (bw // 14)  # rows of 2 frames (an image is duplicated to 2)


def _vae_grid(width: int, height: int, resolution: int) -> Tuple[int, int]:
    from .processing import nearest_bucket

    bh, bw = nearest_bucket(width, height, resolution)
    return bh // 16, bw // 16


def _text_tokens(request) -> int:
    return len(request.text or "") // CHARS_PER_TOKEN + TEXT_TOKENS_OVERHEAD


def _media_size(media) -> Tuple[int, int, int]:
    """(width, height, frames) of a request's checked input: a PIL image or (T, H, W, 3) frames."""
    if hasattr(media, "size") and not hasattr(media, "shape"):
        return media.size[0], media.size[1], 1
    frames = list(media) if not hasattr(media, "shape") else media
    first = frames[0]
    h, w = (first.size[1], first.size[0]) if hasattr(first, "size") and not hasattr(first, "shape") else first.shape[:2]
    return int(w), int(h), len(frames)


def estimate_peak_bytes(request, options: MemoryOptions = MemoryOptions()) -> int:
    """Estimated peak bytes of running `request` (a checked tasks.* request) with `options`."""
    cfg = options.config or _full_config()
    w = weight_bytes(options)
    compute = DTYPE_BYTES.get(options.compute_dtype or options.dtype, 2)
    scale = _width_scale(cfg, compute)
    kv_tok = kv_bytes_per_token(cfg, compute)
    vae_bytes = DTYPE_BYTES.get(options.vae_dtype or options.dtype, 2) * options.vae_scale
    text = _text_tokens(request)
    if request.task.startswith("x2t"):
        width, height, frames = _media_size(request.media)
        patches = _vit_patches(width, height, frames, request.preset.vit_resolution)
        ctx = patches // 4 + text
        vit_run = VIT_PER_PATCH * patches * scale
        prompt_run = (PREFILL_PER_TOKEN * scale + kv_tok) * ctx
        return int(understanding_peak(w, vit_run, prompt_run, low_memory=options.low_memory))
    encode, ctx, vit_loaded = 0.0, text, False
    if request.task in ("t2i", "t2v"):
        t, h, wl = request.latent_shape
    elif request.task == "i2v":
        width, height, _ = _media_size(request.image)
        h, wl = _vae_grid(width, height, request.resolution)
        t = (request.num_frames - 1) // 4 + 1
        encode = ENCODE_PER_PIXEL * 256 * h * wl * VIDEO_ENCODE_CHUNK * vae_bytes / 4
    else:  # image_edit, video_edit: the source's latents and ViT tokens join the context
        media = request.image if request.task == "image_edit" else request.video
        width, height, frames = _media_size(media)
        h, wl = _vae_grid(width, height, request.preset.vae_resolution)
        t = (frames - 1) // 4 + 1
        patches = _vit_patches(width, height, frames, request.preset.vit_resolution)
        ctx += t * h * wl + patches // 4
        pixels = 256 * h * wl * (1 if frames == 1 else VIDEO_ENCODE_CHUNK)
        encode = max(VIT_PER_PATCH * patches * scale, ENCODE_PER_PIXEL * pixels * vae_bytes / 4)
        vit_loaded = True
    kv = 2 * kv_tok * ctx  # the two guidance branches
    prefill = PREFILL_PER_TOKEN * scale * ctx + kv
    step = STEP_PER_NOISE_TOKEN * scale * t * h * wl + kv
    decode = _decode(t, h, wl, vae_bytes)
    return int(generation_peak(w, encode, prefill, step, decode, low_memory=options.low_memory,
                               vit_loaded=vit_loaded, vae_encodes=request.task in ("image_edit", "video_edit", "i2v")))


# --------------------------------------------------------------------------------------------- availability
def _parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise InvalidRequestError(f"{AVAILABLE_ENV}={text!r} is not a size (e.g. 12G or 12884901888)")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " "))


def available_memory_bytes() -> int:
    """Memory a run can use now. Linux: /proc/meminfo MemAvailable (free + reclaimable caches). macOS and others:
    the total physical memory (os.sysconf), because unified memory is shared with the GPU and macOS compresses
    and pages out idle memory, so its "free" pages understate what a run can get. `LANCE_MLX_AVAILABLE_MEMORY`
    (e.g. "12G") overrides both."""
    override = os.environ.get(AVAILABLE_ENV)
    if override:
        return _parse_bytes(override)
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout
        return int(out.strip() or 0)


# ---------------------------------------------------------------------------------------------------- check
def _smaller(request, fits) -> Optional[str]:
    """The largest smaller t2i/t2v request (frames first, then size at the same aspect) for which `fits`."""
    from .tasks import FRAME_STRIDE, SIZE_STRIDE

    if request.task not in ("t2i", "t2v"):
        return None
    frames = getattr(request, "num_frames", 1)
    if request.task == "t2v":
        for n in range(frames - FRAME_STRIDE, 0, -FRAME_STRIDE):
            if fits(replace(request, num_frames=n)):
                return f"--frames {n}"
    for k in range(100, 0, -5):
        w = max(SIZE_STRIDE, round(request.width * k / 100 / SIZE_STRIDE) * SIZE_STRIDE)
        h = max(SIZE_STRIDE, round(request.height * k / 100 / SIZE_STRIDE) * SIZE_STRIDE)
        if (w, h) != (request.width, request.height) and fits(replace(request, width=w, height=h)):
            return f"--width {w} --height {h}"
    return None


def check_memory(request, options: MemoryOptions = MemoryOptions(), available: Optional[int] = None) -> int:
    """Raise InsufficientMemoryError (one line: the estimate, what is available, a size or frame count that would
    fit, the --low-memory / --und-bits hints) when the estimate exceeds the available memory; else the estimate."""
    need = estimate_peak_bytes(request, options)
    have = available_memory_bytes() if available is None else available
    if need <= have:
        return need
    hints = []
    smaller = _smaller(request, lambda r: estimate_peak_bytes(r, options) <= have)
    if smaller:
        hints.append(f"{smaller} would fit")
    lean = replace(options, low_memory=True, und_bits=options.und_bits or 4)
    if lean != options:
        flags = " ".join(f for f, on in (("--low-memory", not options.low_memory),
                                         ("--und-bits 4", not options.und_bits)) if on)
        hints.append(f"with {flags} it needs about {estimate_peak_bytes(request, lean) / GIB:.1f} GiB")
    hints.append(f"--skip-memory-check (or {SKIP_ENV}=1) runs it anyway")
    raise InsufficientMemoryError(f"this {request.task} request needs about {need / GIB:.1f} GiB of memory (estimate, "
                                  f"docs/memory.md) and {have / GIB:.1f} GiB is available; " + "; ".join(hints))


def skip_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(SKIP_ENV, "") not in ("", "0")


def options_for_model(args, task: str) -> MemoryOptions:
    """The command's loading flags with the geometry of the model (its config, and the size of its VAE file next
    to Wan 2.2's in bf16). The folder is resolved as the load will (a hub repo is downloaded first; that takes
    disk, not memory), so a missing folder or an unreachable repo is reported with its own message."""
    from . import checkpoints

    files = checkpoints.resolve(args.model, task)
    config = checkpoints.read_lance_config(files)
    vae_scale = 1.0
    if files.vae_weights is not None and files.vae_weights.is_file():
        full = weight_bytes(MemoryOptions()).vae  # Wan 2.2 in bf16
        vae_scale = min(1.0, files.vae_weights.stat().st_size / full)
    return MemoryOptions.from_args(args, config, vae_scale)


def check_before_loading(args, request) -> None:
    """The commands' check: refuse (exit 2, one line) before any weight loads, unless --skip-memory-check or
    LANCE_MLX_SKIP_MEMORY_CHECK=1."""
    if not skip_requested(getattr(args, "skip_memory_check", False)):
        check_memory(request, options_for_model(args, request.task))


__all__ = ["MemoryOptions", "Weights", "available_memory_bytes", "check_before_loading", "check_memory",
           "estimate_peak_bytes", "generation_peak", "kv_bytes_per_token", "options_for_model", "skip_requested",
           "understanding_peak", "weight_bytes"]

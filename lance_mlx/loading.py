"""Reading weights into MLX and building a model folder's components (LLM, tokenizer, ViT, VAE) for a task."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .checkpoints import TASKS, TOKENIZER_FILES, ModelFiles, check_safetensors, read_lance_config, tensor_names
from .config import ViTConfig
from .errors import InvalidRequestError, WeightsError
from .quantize import quantize_lance

if TYPE_CHECKING:
    from .lance import Lance
    from .vae_wan22 import Wan2_2_VAE
    from .vit import VisionTransformer

__all__ = [
    "DTYPES",
    "Components",
    "Precision",
    "check_keys",
    "check_safetensors",
    "dtype_name",
    "component_loaders",
    "load_components",
    "load_lance",
    "load_llm_weights",
    "load_safetensors",
    "load_tokenizer",
    "load_vae",
    "load_vision",
    "normalize_llm_keys",
    "normalize_vae_keys",
    "parse_dtype",
    "tensor_names",
]

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def parse_dtype(name) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        return name
    try:
        return DTYPES[str(name).replace("mlx.core.", "")]
    except KeyError:
        raise InvalidRequestError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass(frozen=True)
class Precision:
    """The dtypes a pipeline loads and computes in (`LancePipeline.from_pretrained`). `dtype`: the weights of the LLM
    and ViT; `vae_dtype`: the VAE's (None: `dtype`); `compute_dtype`: what the LLM computes in (None: `dtype`;
    "float32" over bfloat16 weights is faster on CPUs without a bf16 GEMM, `Lance.compute_dtype`); `rope_bf16`:
    round the RoPE frequencies like upstream's bf16-cast buffer (None: when `dtype` is bfloat16)."""

    dtype: str | mx.Dtype = "bfloat16"
    vae_dtype: str | mx.Dtype | None = None
    compute_dtype: str | mx.Dtype | None = None
    rope_bf16: bool | None = None


# --------------------------------------------------------------------------------------------------------------
# Tensors


def load_safetensors(paths: Iterable[Path], dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """Load (lazily, memory-mapped by MLX) and optionally cast every tensor of the given files."""
    weights: dict[str, mx.array] = {}
    for p in paths:
        check_safetensors(p)
        for k, v in mx.load(str(p)).items():
            if dtype is not None and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype:
                v = v.astype(dtype)
            weights[k] = v
    return weights


def check_keys(module, weights: dict[str, mx.array], what: str) -> None:
    """Strict key and shape check with a message that lists what is wrong (before MLX's own strict load)."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{what}: the weights do not match the model architecture."]

    def show(title, keys, fmt=str):
        more = " …" if len(keys) > 12 else ""
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(fmt(k) for k in keys[:12]) + more)

    if missing:
        show("missing keys", missing)
    if unexpected:
        show("unexpected keys", unexpected)
    if wrong:
        show("shape mismatches", wrong,
             lambda k: f"{k} {tuple(weights[k].shape)} vs expected {tuple(expected[k].shape)}")
    lines.append("  The file is incomplete, of another model, or its config does not match: re-download or "
                 "re-convert the folder, and check that its config.json belongs to these weights.")
    raise WeightsError("\n".join(lines))


# --------------------------------------------------------------------------------------------------------------
# Key names of the known layouts (docs/checkpoints.md has the tables)
#
# "upstream": bytedance-research/Lance names (`language_model.model.layers.N…`, `vae2llm`, `time_embedder.mlp.0`).
#   Also used, unchanged, by RockTalk/Lance-3B-MLX and avlp12/Lance-3B-MLX-Traced (byte-identical F32 exports).
# "stripped": the xocialize/lance-mlx converter (scripts/02_convert.py, published as mlx-community/Lance-3B-*):
#   `language_model.model.` / `language_model.` dropped, `vae2llm` under `vae_in_proj.`, the time embedder's
#   `mlp.0` / `mlp.2` renamed `proj_in` / `proj_out`; its runtime wraps `llm2vae` in a module of the same name, so
#   both `llm2vae.*` and `llm2vae.llm2vae.*` are accepted. The bundled ViT goes to vit.safetensors, prefix dropped.

_STRIPPED_RULES = (
    (re.compile(r"^(embed_tokens|layers|norm|norm_moe_gen)\."), r"language_model.model.\1."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^vae_in_proj\.vae2llm\."), "vae2llm."),
    (re.compile(r"^llm2vae\.llm2vae\."), "llm2vae."),
    (re.compile(r"^time_embedder\.proj_in\."), "time_embedder.mlp.0."),
    (re.compile(r"^time_embedder\.proj_out\."), "time_embedder.mlp.2."),
)


def normalize_llm_keys(weights: dict[str, Any], style: str) -> dict[str, Any]:
    """Rename an LLM checkpoint's tensors to upstream names (ours); quantization suffixes follow their module."""
    if style == "upstream":
        return weights
    if style != "stripped":
        raise WeightsError(f"unknown key style {style!r}")
    out = {}
    for k, v in weights.items():
        for pat, repl in _STRIPPED_RULES:
            if pat.match(k):
                k = pat.sub(repl, k, count=1)
                break
        out[k] = v
    return out


_MLX_VIDEO_VAE_RULES = (
    (re.compile(r"\.layer_(\d+)\."), r".\1."),  # nn.Sequential indices kept as attribute names
    (re.compile(r"\.(to_qkv|proj)_(weight|bias)$"), r".\1.\2"),
    (re.compile(r"\.resample_(weight|bias)$"), r".resample.1.\1"),
)


def normalize_vae_keys(weights: dict[str, Any]) -> dict[str, Any]:
    """Official Wan VAE names for the key styles of MLX ports (layouts are fixed later by shape):

    - mlx-video's `wan_2/vae22.py` (used for mlx-community/Lance-3B-* vae.safetensors): `residual.layer_2.weight`,
      `head.layer_0.gamma`, `middle.1.to_qkv_weight`, `resample_weight` -> `residual.2.weight`, `head.0.gamma`,
      `middle.1.to_qkv.weight`, `resample.1.weight`;
    - each convolution nested in a `.conv` sub-module (`encoder.conv1.conv.weight` -> `encoder.conv1.weight`).
    The official VAE has no parameter these patterns could hit by accident; anything still unknown is reported by
    the strict load."""
    out = {}
    for k, v in weights.items():
        k = re.sub(r"\.conv\.(weight|bias)$", r".\1", k)
        for pat, repl in _MLX_VIDEO_VAE_RULES:
            k = pat.sub(repl, k)
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------------------------
# Components


def load_llm_weights(files: ModelFiles, dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """The LLM checkpoint of any layout, lazily loaded (memory-mapped) and cast, under upstream names."""
    return normalize_llm_keys(load_safetensors(files.llm_weights, dtype=dtype), files.key_style)


def load_vae(path: Path, dtype: mx.Dtype = mx.float32, lazy: bool = False) -> Wan2_2_VAE:
    """A `Wan2_2_VAE` built from the configuration its own weights imply (so any width works), reading the file
    once: `Wan2.2_VAE.pth` (safe reader), our vae.safetensors, or another MLX port's (`normalize_vae_keys`)."""
    from .vae_wan22 import Wan2_2_VAE, infer_vae_config, load_vae_checkpoint

    raw = normalize_vae_keys(load_vae_checkpoint(path))
    cfg = infer_vae_config(raw)
    for k in list(raw):  # cast now, one tensor at a time: the float32 numpy copy is freed as we go
        raw[k] = mx.array(raw.pop(k)).astype(dtype)
        mx.eval(raw[k])
    vae = Wan2_2_VAE(z_dim=cfg["z_dim"], c_dim=cfg["dim"], dec_dim=cfg["dec_dim"], dim_mult=cfg["dim_mult"],
                     temperal_downsample=cfg["temperal_downsample"], num_res_blocks=cfg["num_res_blocks"],
                     dtype=dtype)
    vae.load_weights(raw, source=path)
    del raw
    if not lazy:
        mx.eval(vae.model.parameters())
    return vae


_TOKENIZERS: dict = {}  # (folder, its tokenizer files' sizes and mtimes) -> tokenizer


def load_tokenizer(folder: Path, shared: bool = True):
    """The folder's tokenizer, built once per process: building one takes ~1 s of pure Python (holding the GIL),
    and a server or a prompt-length check asks for the same one again. A changed file builds it anew.
    `shared=False` builds one of the caller's own (fast tokenizers must not be used from two threads at once)."""
    folder = Path(folder).resolve()
    if not shared:
        return _build_tokenizer(folder)
    stamp = tuple((n, st.st_size, st.st_mtime_ns) for n in TOKENIZER_FILES + ("config.json",)
                  if (f := folder / n).is_file() and (st := f.stat()))
    key = (str(folder), stamp)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _build_tokenizer(folder)
    return _TOKENIZERS[key]


def _build_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    # A config.json without a transformers model_type beside the tokenizer (convert.py folders) makes
    # transformers 5 suspect a Mistral tokenizer and warn; the Qwen2 tokenizer needs no regex fix.
    extra = {"fix_mistral_regex": False} if (Path(folder) / "config.json").is_file() else {}
    try:
        return AutoTokenizer.from_pretrained(str(folder), **extra)
    except Exception as e:  # noqa: BLE001 (transformers raises many types for unreadable tokenizer files)
        raise WeightsError(f"cannot load the tokenizer from {folder}: {e}; re-download the tokenizer files "
                           f"({', '.join(TOKENIZER_FILES)})") from None


def load_vision(config: ViTConfig, files: ModelFiles, bundled: dict[str, mx.array], dtype: mx.Dtype,
                lazy: bool = False) -> VisionTransformer:
    """The ViT: the video checkpoint's bundled `vit_model.*` tensors when present (upstream loads them last, so
    they win; docs/upstream-notes.md), else `vit.safetensors`."""
    from .vit import VisionTransformer, sanitize_vit_weights

    vit = VisionTransformer(config)
    weights = bundled if bundled else load_safetensors([files.vit_weights], dtype=dtype)
    weights = sanitize_vit_weights(weights, config)
    vit.set_dtype(dtype)
    check_keys(vit, weights, "ViT")
    vit.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(vit.parameters())
    return vit


@dataclass
class Components:
    """What a task runs with: the Lance LLM, its tokenizer, and the ViT / VAE (None when the task does not use
    them or the folder lacks them)."""

    model: Lance
    tokenizer: Any  # a transformers tokenizer
    vit: VisionTransformer | None = None
    vae: Wan2_2_VAE | None = None


def load_lance(files: ModelFiles, dtype: mx.Dtype, lazy: bool = False, rope_bf16: bool | None = None,
               und_bits: int | None = None) -> tuple[Lance, dict[str, mx.array]]:
    """The Lance LLM of a located folder and the ViT tensors bundled in its file (video checkpoint), if any.
    `und_bits` (4 or 8) quantizes the understanding expert's linears after loading (quantize.py; docs/memory.md)."""
    from .lance import Lance

    config = read_lance_config(files)
    model = Lance(config)
    model.language_model.model.rope_bf16_inv_freq = (dtype == mx.bfloat16) if rope_bf16 is None else rope_bf16
    weights = load_llm_weights(files, dtype=dtype)
    bundled_vit = {k: v for k, v in weights.items() if k.startswith("vit_model.")}
    weights = model.sanitize(weights)
    model.set_dtype(dtype)
    if config.quantization or any(k.endswith(".scales") for k in weights):
        # The module structure must be quantized before the quantized tensors can be loaded into it.
        quantize_lance(model, config.quantization or {}, weights=weights)
    check_keys(model, weights, f"Lance LLM ({', '.join(p.name for p in files.llm_weights)})")
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if und_bits is not None and not config.quantization:
        quantize_lance(model, {"bits": und_bits, "experts": "und"})
    if not lazy:
        mx.eval(model.parameters())
    return model, bundled_vit


def load_components(files: ModelFiles, task: str, dtype: str | mx.Dtype = "bfloat16",
                    vae_dtype: str | mx.Dtype | None = None, lazy: bool = False,
                    rope_bf16: bool | None = None, low_memory: bool = False,
                    und_bits: int | None = None) -> Components:
    """Build the components `task` needs from a located model folder (`checkpoints.resolve` / `locate`).

    `dtype` is the compute dtype of the LLM and ViT (quantized folders keep their quantized linears); the VAE uses
    `vae_dtype` (default: the same) and the configuration its own weights imply. Weights are memory-mapped and
    cast lazily, so peak memory stays near the size of the result; `lazy` skips the final evaluation. `rope_bf16`
    rounds the LLM's RoPE frequencies to bfloat16 as upstream's bf16-cast buffer does (default: when `dtype` is
    bfloat16, so a bf16 run reproduces upstream's angles). `low_memory` loads the LLM and tokenizer only: the ViT
    and VAE come later from `component_loaders` when a phase needs them. `und_bits` as `load_lance`.
    """
    dt = parse_dtype(dtype)
    vae_dt = parse_dtype(vae_dtype) if vae_dtype is not None else dt
    model, bundled_vit = load_lance(files, dt, lazy, rope_bf16, und_bits)
    components = Components(model=model, tokenizer=load_tokenizer(files.tokenizer_dir))
    if low_memory:  # loaded later, for their phases: refuse broken files now, not after the denoising
        check_encoder_files(files)
        return components
    if files.vit_weights is not None or (TASKS[task][2] and bundled_vit):
        components.vit = load_vision(model.config.vit, files, bundled_vit, dt, lazy)
    del bundled_vit
    if files.vae_weights is not None:
        components.vae = load_vae(files.vae_weights, vae_dt, lazy)
    return components


def check_encoder_files(files: ModelFiles) -> None:
    """Check the ViT and VAE files without reading their tensors (headers, and a `.pth`'s pickle and records)."""
    from .torch_checkpoint import check_torch_checkpoint

    if files.vit_weights is not None:
        check_safetensors(files.vit_weights)
    if files.vae_weights is not None:
        if files.vae_weights.suffix == ".safetensors":
            check_safetensors(files.vae_weights)
        else:
            check_torch_checkpoint(files.vae_weights)


def component_loaders(files: ModelFiles, task: str, dtype: str | mx.Dtype = "bfloat16",
                      vae_dtype: str | mx.Dtype | None = None, rope_bf16: bool | None = None,
                      und_bits: int | None = None) -> dict[str, Any]:
    """{"model" | "vit" | "vae": a function that loads it}: what `load_components` would load for `task`, one
    component at a time, so a pipeline can load each only for the phase that needs it and release it after."""
    dt = parse_dtype(dtype)
    vae_dt = parse_dtype(vae_dtype) if vae_dtype is not None else dt
    loaders: dict[str, Any] = {"model": lambda: load_lance(files, dt, rope_bf16=rope_bf16, und_bits=und_bits)[0]}
    if files.vae_weights is not None:
        loaders["vae"] = lambda: load_vae(files.vae_weights, vae_dt)

    def vit():
        # the video checkpoint's bundled tensors are read from the memory-mapped file, nothing else
        bundled = {k: v for k, v in load_llm_weights(files, dt).items() if k.startswith("vit_model.")}
        return load_vision(read_lance_config(files).vit, files, bundled, dt)

    if files.vit_weights is not None or TASKS[task][2]:
        loaders["vit"] = vit
    return loaders

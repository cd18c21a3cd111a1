"""Lance weights: finding and downloading model folders, loading every known layout, quantization, conversion."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

UPSTREAM_REPO = "bytedance-research/Lance"
IMAGE_LLM_DIR = "Lance_3B"
VIDEO_LLM_DIR = "Lance_3B_Video"
VIT_DIR = "Qwen2.5-VL-ViT"
VAE_PTH = "Wan2.2_VAE.pth"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
# Copied along with the tokenizer by convert.py when present.
TOKENIZER_EXTRAS = ("special_tokens_map.json", "added_tokens.json", "generation_config.json", "chat_template.json",
                    "chat_template.jinja")
# VAE file names used by single-folder MLX layouts: ours / mlx-community, and RockTalk's companion download.
FLAT_VAE_FILES = ("vae.safetensors", "wan22_vae.safetensors")

# Which checkpoint and components each task needs (upstream inference_lance.py::TASK_DEFAULT_CONFIGS).
TASKS = {
    "t2i": (IMAGE_LLM_DIR, True, False),
    "image_edit": (IMAGE_LLM_DIR, True, True),
    "x2t_image": (IMAGE_LLM_DIR, False, True),
    "t2v": (VIDEO_LLM_DIR, True, False),
    "i2v": (VIDEO_LLM_DIR, True, False),
    "video_edit": (VIDEO_LLM_DIR, True, True),
    "x2t_video": (VIDEO_LLM_DIR, False, True),
}

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# Quantization of the LLM linears (mlx affine group-wise quantization).
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
QUANT_EXPERTS = ("all", "und", "gen")

SHARD_BYTES = 5 * 10**9  # largest model-*.safetensors shard convert.py writes


class WeightsError(ValueError):
    """A model folder or weight file is missing, incomplete or of an unknown layout."""


def parse_dtype(name) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        return name
    try:
        return DTYPES[str(name).replace("mlx.core.", "")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: mx.Dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


# --------------------------------------------------------------------------------------------------------------
# Safetensors files


def check_safetensors(path: Path) -> Dict[str, dict]:
    """Parse a safetensors header and check that the file holds every byte it promises; returns the header."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise WeightsError(
            f"{path} is not a safetensors file (unreadable header): the file is corrupt or not a weight file; "
            "download or convert it again") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated ({size} bytes, header promises {8 + n + end}): an incomplete download or copy; "
            "download it again (huggingface_hub resumes partial downloads)")
    return header


def tensor_names(paths: Iterable[Path]) -> List[str]:
    """Tensor names stored in safetensors files (headers only)."""
    return [k for p in paths for k in check_safetensors(p) if k != "__metadata__"]


def load_safetensors(paths: Iterable[Path], dtype: Optional[mx.Dtype] = None) -> Dict[str, mx.array]:
    """Load (lazily, memory-mapped by MLX) and optionally cast every tensor of the given files."""
    weights: Dict[str, mx.array] = {}
    for p in paths:
        check_safetensors(p)
        for k, v in mx.load(str(p)).items():
            if dtype is not None and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype:
                v = v.astype(dtype)
            weights[k] = v
    return weights


def sharded_files(folder: Path, stem: str = "model") -> List[Path]:
    """`model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{folder} is missing weight shards {missing} listed in {index.name}; "
                               "download or convert the folder again")
        return files
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    ema = folder / "ema.safetensors"  # upstream falls back to the EMA weights file
    if stem == "model" and ema.is_file():
        return [ema]
    raise WeightsError(f"no {stem}.safetensors (or sharded index) in {folder}")


def check_keys(model, weights: Dict[str, mx.array], what: str) -> None:
    """Strict key and shape check with a message that lists what is wrong (before MLX's own strict load)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{what}: the weights do not match the model architecture."]

    def show(title, keys, fmt=str):
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(fmt(k) for k in keys[:12]) + (" …" if len(keys) > 12 else ""))

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
# Key names of the known layouts
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


def llm_key_style(names: Iterable[str]) -> Optional[str]:
    """"upstream" or "stripped" (see above) from the tensor names of an LLM checkpoint, None if neither."""
    names = list(names)
    if any(k.startswith("language_model.model.layers.") for k in names):
        return "upstream"
    if "embed_tokens.weight" in names and any(re.match(r"layers\.\d+\.", k) for k in names):
        return "stripped"
    return None


def normalize_llm_keys(weights: Dict[str, Any], style: str) -> Dict[str, Any]:
    """Rename an LLM checkpoint's tensors to upstream names (ours); quantization suffixes follow their module."""
    if style == "upstream":
        return weights
    if style != "stripped":
        raise ValueError(f"unknown key style {style!r}")
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


def normalize_vae_keys(weights: Dict[str, Any]) -> Dict[str, Any]:
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
# Model folders


@dataclass
class ModelFiles:
    """Where each part of a Lance model lives on disk."""

    root: Path
    # "upstream" (hub layout, PyTorch files), "mlx" (written by convert.py) or "mlx-other" (another MLX port's
    # single folder: config.json + model.safetensors + vit/vae files; see key_style)
    layout: str
    config: Path  # llm_config.json (upstream), config.json (ours and other ports)
    llm_weights: List[Path] = field(default_factory=list)
    tokenizer_dir: Optional[Path] = None
    vit_weights: Optional[Path] = None
    vit_config: Optional[Path] = None
    vae_weights: Optional[Path] = None
    key_style: str = "upstream"  # tensor names of llm_weights: "upstream" or "stripped"


def _missing_hint(repo: str, pattern: str) -> str:
    return f"get it with: hf download {repo} --include '{pattern}' --local-dir <folder>"


def _has_tokenizer(folder: Path) -> bool:
    tok = {n for n in TOKENIZER_FILES if (folder / n).is_file()}
    return "tokenizer.json" in tok or {"vocab.json", "merges.txt"} <= tok


def _model_weight_files(folder: Path) -> List[Path]:
    if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
        return sharded_files(folder)
    return []


def locate(path: Path, task: str = "t2i") -> ModelFiles:
    """Find the files of `task` below a local folder in any supported layout; errors name what is missing."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    llm_sub, needs_vae, needs_vit = TASKS[task]
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"model folder not found: {path}")

    # Our converted layout: a single folder with config.json marked mlx_layout.
    cfg = path / "config.json"
    cfg_data: Dict[str, Any] = {}
    if cfg.is_file():
        try:
            cfg_data = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            cfg_data = {}
        if not isinstance(cfg_data, dict):
            cfg_data = {}
        if cfg_data.get("mlx_layout", False):
            files = ModelFiles(root=path, layout="mlx", config=cfg, llm_weights=sharded_files(path),
                               tokenizer_dir=path)
            if needs_vit:
                files.vit_weights = _require(path / "vit.safetensors", "convert.py wrote no ViT: re-run convert.py")
                files.vit_config = cfg
            if needs_vae:
                files.vae_weights = _require(path / "vae.safetensors", "convert.py wrote no VAE: re-run convert.py")
            return files

    # Upstream hub layout: either the repo root (with Lance_3B/ …) or one checkpoint folder inside it.
    if (path / "llm_config.json").is_file():
        llm_dir, root = path, path.parent
    elif (path / llm_sub).is_dir():
        llm_dir, root = path / llm_sub, path
    elif cfg.is_file() and _model_weight_files(path):
        return _locate_other_mlx(path, cfg, needs_vae, needs_vit)
    else:
        found = sorted(p.name for p in path.iterdir())[:20]
        raise WeightsError(
            f"{path} is not a Lance model folder: expected the upstream layout ({llm_sub}/llm_config.json, "
            f"{VIT_DIR}/, {VAE_PTH}), a folder written by convert.py (config.json with mlx_layout), or an MLX "
            f"port's folder (config.json + model.safetensors); found {found}. "
            f"{_missing_hint(UPSTREAM_REPO, llm_sub + '/*')}")
    llm_config = _require(llm_dir / "llm_config.json", _missing_hint(UPSTREAM_REPO, f"{llm_dir.name}/*"))
    try:
        llm_weights = sharded_files(llm_dir)
    except WeightsError as e:
        raise WeightsError(f"{e}; {_missing_hint(UPSTREAM_REPO, llm_dir.name + '/*')}") from None
    files = ModelFiles(root=root, layout="upstream", config=llm_config, llm_weights=llm_weights, tokenizer_dir=llm_dir)
    if not _has_tokenizer(llm_dir):
        raise WeightsError(f"{llm_dir} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                           + _missing_hint(UPSTREAM_REPO, f"{llm_dir.name}/*"))
    if needs_vit:
        vit_dir = root / VIT_DIR
        files.vit_weights = _require(vit_dir / "vit.safetensors", _missing_hint(UPSTREAM_REPO, VIT_DIR + "/*"))
        files.vit_config = _require(vit_dir / "config.json", _missing_hint(UPSTREAM_REPO, VIT_DIR + "/*"))
    if needs_vae:
        files.vae_weights = _require(root / VAE_PTH, _missing_hint(UPSTREAM_REPO, VAE_PTH))
    return files


def _locate_other_mlx(path: Path, cfg: Path, needs_vae: bool, needs_vit: bool) -> ModelFiles:
    """Another MLX port's single folder, recognized by its tensor names (docs/checkpoints.md lists them)."""
    llm_weights = _model_weight_files(path)
    names = tensor_names(llm_weights)
    style = llm_key_style(names)
    if style is None:
        sample = ", ".join(sorted(names)[:8])
        raise WeightsError(
            f"{path} has config.json and model weights, but their tensor names match no known Lance layout "
            f"(upstream `language_model.model.layers.N…` or mlx-community `layers.N…` + `embed_tokens.weight`); "
            f"found {len(names)} tensors such as: {sample}. Convert the upstream checkpoint with convert.py instead.")
    files = ModelFiles(root=path, layout="mlx-other", config=cfg, llm_weights=llm_weights, tokenizer_dir=path,
                       key_style=style)
    if not _has_tokenizer(path):
        raise WeightsError(f"{path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); copy them "
                           f"from the upstream {IMAGE_LLM_DIR}/ folder ({_missing_hint(UPSTREAM_REPO, IMAGE_LLM_DIR + '/*')})")
    if needs_vit:
        if (path / "vit.safetensors").is_file():
            files.vit_weights = path / "vit.safetensors"
        elif not any(k.startswith("vit_model.") for k in names):
            raise WeightsError(f"{path} has no vit.safetensors and its model weights bundle no `vit_model.*` "
                               f"tensors; the task needs the ViT ({_missing_hint(UPSTREAM_REPO, VIT_DIR + '/*')})")
    if needs_vae:
        found = [path / n for n in (*FLAT_VAE_FILES, VAE_PTH) if (path / n).is_file()]
        if not found:
            raise WeightsError(f"{path} has no VAE weights ({', '.join(FLAT_VAE_FILES + (VAE_PTH,))}); "
                               f"the task needs them ({_missing_hint(UPSTREAM_REPO, VAE_PTH)})")
        files.vae_weights = found[0]
    return files


def _require(p: Path, hint: str) -> Path:
    if not p.is_file():
        raise WeightsError(f"missing file {p}: {hint}")
    return p


def hub_patterns(repo_id: str, subfolder: Optional[str], task: str, converted: bool) -> List[str]:
    """The allow-patterns that fetch only what `task` needs from a hub repo (`converted`: a single-folder MLX
    layout, ours or another port's)."""
    llm_sub, needs_vae, needs_vit = TASKS[task]
    if converted:
        pats = ["config.json", "model*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES,
                *TOKENIZER_EXTRAS]
        if needs_vit:
            pats.append("vit.safetensors")
        if needs_vae:
            pats += list(FLAT_VAE_FILES)
        return pats
    sub = subfolder or llm_sub
    pats = [f"{sub}/*.json", f"{sub}/model.safetensors", f"{sub}/model-*.safetensors", f"{sub}/*.txt"]
    if needs_vit:
        pats += [f"{VIT_DIR}/config.json", f"{VIT_DIR}/vit.safetensors"]
    if needs_vae:
        pats.append(VAE_PTH)
    return pats


def resolve(path_or_repo, task: str = "t2i") -> ModelFiles:
    """A local folder, or a hub repo id (optionally `owner/name/subfolder`) downloaded to the HF cache."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    p = Path(str(path_or_repo)).expanduser()
    if p.exists():
        return locate(p, task)
    parts = str(path_or_repo).strip("/").split("/")
    if len(parts) < 2 or str(path_or_repo).startswith((".", "/", "~")):
        raise WeightsError(f"model folder not found: {path_or_repo} (and it is not a hub repo id like "
                           f"{UPSTREAM_REPO})")
    repo_id, subfolder = "/".join(parts[:2]), ("/".join(parts[2:]) or None)
    local = download(repo_id, subfolder, task)
    return locate(local / subfolder if subfolder else local, task)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _hub_error(repo_id: str, patterns: List[str]) -> WeightsError:
    why = "HF_HUB_OFFLINE is set and they are not in the cache" if _offline() else "the hub cannot be reached"
    return WeightsError(
        f"cannot get {repo_id} files {patterns}: {why}. Download them once with network "
        f"access (hf download {repo_id} " + " ".join(f"--include '{p}'" for p in patterns)
        + "), or pass --model with a local folder.")


def download(repo_id: str, subfolder: Optional[str], task: str) -> Path:
    """Fetch only the files `task` needs (resumable; served from the cache when HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    converted = False
    if repo_id != UPSTREAM_REPO and subfolder is None:
        # Single-folder MLX layouts (ours and other ports) carry a top-level config.json next to their weights;
        # the upstream repo keeps its weights in Lance_3B/ … subfolders.
        try:
            cfg = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
            converted = bool(cfg.get("mlx_layout")) or "llm" in cfg or "hidden_size" in cfg or "text_config" in cfg
        except LocalEntryNotFoundError:
            raise _hub_error(repo_id, hub_patterns(repo_id, None, task, True)) from None
        except (EntryNotFoundError, json.JSONDecodeError, AttributeError):
            converted = False
    patterns = hub_patterns(repo_id, subfolder, task, converted)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise _hub_error(repo_id, patterns) from None


# --------------------------------------------------------------------------------------------------------------
# Loading


def read_config_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); re-download or re-convert the model folder") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a JSON object; re-download or re-convert the model folder")
    return data


def load_llm_weights(files: ModelFiles, dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    """The LLM checkpoint of any layout, lazily loaded (memory-mapped) and cast, under upstream names."""
    return normalize_llm_keys(load_safetensors(files.llm_weights, dtype=dtype), files.key_style)


def load_vae(path: Path, dtype: mx.Dtype = mx.float32, lazy: bool = False):
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


# --------------------------------------------------------------------------------------------------------------
# Quantization
#
# Only the linear layers of the MoT decoder layers are quantized: per expert, q/k/v/o projections and the MLP.
# embed_tokens and lm_head stay in the model dtype (docs/checkpoints.md: they feed every task's conditioning /
# every generated token and are ~10% of the weights), as do all norms, the latent adapters (vae2llm, llm2vae,
# time_embedder), the ViT and the VAE.

_QUANT_PATH = re.compile(r"^language_model\.model\.layers\.\d+\."
                         r"(self_attn\.[qkvo]_proj(?P<g1>_moe_gen)?|mlp(?P<g2>_moe_gen)?\.(gate|up|down)_proj)$")


def check_quantization(q: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Validate {"bits", "group_size", "experts"}; returns it normalized, or None for no quantization."""
    if not q:
        return None
    bits, group, experts = q.get("bits"), q.get("group_size", 64), q.get("experts", "all")
    if bits not in QUANT_BITS:
        raise ValueError(f"unsupported quantization bit width {bits!r}: use {' or '.join(map(str, QUANT_BITS))} "
                         "(or no quantization: bfloat16 keeps the most detail)")
    if group not in QUANT_GROUP_SIZES:
        raise ValueError(f"unsupported quantization group size {group!r}: use one of "
                         f"{', '.join(map(str, QUANT_GROUP_SIZES))}")
    if experts not in QUANT_EXPERTS:
        raise ValueError(f"unknown expert selection {experts!r} for quantization: use one of "
                         f"{', '.join(QUANT_EXPERTS)} (und = understanding weights, gen = *_moe_gen weights)")
    return {"bits": int(bits), "group_size": int(group), "experts": experts}


def is_quantized_linear(path: str, experts: str, in_features: int, group_size: int) -> bool:
    """Whether the LLM linear at module `path` is quantized for the expert selection."""
    m = _QUANT_PATH.match(path)
    if m is None or in_features % group_size:
        return False
    gen = bool(m.group("g1") or m.group("g2"))
    return experts == "all" or (experts == "gen") == gen


def quantization_warning(experts: str) -> Optional[str]:
    if experts in ("all", "gen"):
        return ("quantizing the generation expert (*_moe_gen) costs visible detail in generated images and "
                "videos (other ports found the same at 4 and 8 bits); bfloat16 or --quantize-experts und keeps "
                "generation at full precision")
    return None


def quantize_lance(model: nn.Module, quantization: Dict[str, Any], weights: Optional[Dict[str, Any]] = None) -> None:
    """Swap the selected LLM linears for quantized ones, in place. With `weights` (a checkpoint about to be
    loaded), exactly the modules whose `.scales` it holds are quantized, so the structure always matches the
    file; without, the rule of `is_quantized_linear` picks them (and quantizes the current weights)."""
    q = dict(quantization or {})
    bits, group = q.get("bits"), q.get("group_size", 64)
    if weights is not None:
        scaled = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
        if bits is None:
            raise WeightsError("the weights hold quantized tensors (.scales) but config.json has no `quantization` "
                               "block with their bits and group_size; re-download or re-convert the folder")

        def pred(path, module):
            return hasattr(module, "to_quantized") and path in scaled
    else:
        q = check_quantization(q)
        if q is None:
            return
        bits, group = q["bits"], q["group_size"]

        def pred(path, module):
            return isinstance(module, nn.Linear) and is_quantized_linear(path, q["experts"], module.weight.shape[-1],
                                                                        group)
    if bits not in QUANT_BITS + (2, 3, 5, 6):
        raise ValueError(f"unsupported quantization bit width {bits!r} in the model config")
    nn.quantize(model, group_size=group, bits=bits, class_predicate=pred)


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# --------------------------------------------------------------------------------------------------------------
# Conversion (convert.py)


@dataclass
class _Tensor:
    """One output tensor of the LLM shards: where it comes from and how it is transformed."""

    out_key: str
    src_key: str
    kind: str  # "cast", "qweight", "scales", "biases"
    nbytes: int


def conversion_task(video: bool) -> str:
    """The task whose files are exactly a full conversion's: LLM, ViT and VAE."""
    return "video_edit" if video else "image_edit"


def _header_shapes(paths: List[Path]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    out = {}
    for p in paths:
        for k, v in check_safetensors(p).items():
            if k != "__metadata__":
                out[k] = (tuple(v["shape"]), v["dtype"])
    return out


def _plan_llm(shapes: Dict[str, Tuple[Tuple[int, ...], str]], style: str, itemsize: int,
              quant: Optional[Dict[str, Any]]) -> List[_Tensor]:
    """Output tensors (upstream names) of the LLM checkpoint, in a stable order, with their sizes."""
    from .lance import Lance

    names = normalize_llm_keys({k: k for k in shapes}, style)  # new name -> source name
    keep = Lance.sanitize(names)
    plan = []
    for key in sorted(keep):
        src = names[key]
        shape, st_dtype = shapes[src]
        numel = int(np.prod(shape))
        if key.endswith((".scales", ".biases")) or st_dtype in ("U32", "U8", "I8"):
            raise WeightsError(f"the source checkpoint is already quantized ({src}); convert from the bf16/F32 "
                               "checkpoint instead")
        path = key[: -len(".weight")] if key.endswith(".weight") else None
        if quant and path and len(shape) == 2 and is_quantized_linear(path, quant["experts"], shape[1],
                                                                       quant["group_size"]):
            groups = numel // quant["group_size"]
            plan.append(_Tensor(key, src, "qweight", numel * quant["bits"] // 8))
            plan.append(_Tensor(path + ".scales", src, "scales", groups * itemsize))
            plan.append(_Tensor(path + ".biases", src, "biases", groups * itemsize))
        else:
            plan.append(_Tensor(key, src, "cast", numel * itemsize))
    return plan


def _shards(plan: List[_Tensor], shard_bytes: int) -> List[List[_Tensor]]:
    shards, cur, size = [], [], 0
    for t in plan:
        if cur and size + t.nbytes > shard_bytes and t.kind in ("cast", "qweight"):  # keep a quantized triple together
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += t.nbytes
    if cur:
        shards.append(cur)
    return shards


def _write_safetensors(path: Path, tensors: Dict[str, mx.array], metadata: Dict[str, str]) -> None:
    mx.save_safetensors(str(path), tensors, metadata=metadata)


def _check_disk(dest: Path, needed: int) -> None:
    probe = dest.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise WeightsError(f"not enough disk space for {dest}: the converted model needs about {needed / 1e9:.2f} GB "
                           f"and {probe} has {free / 1e9:.2f} GB free; free some space or choose another "
                           "destination (--dtype bfloat16 or --quantize 8/4 make the output smaller)")


def _vit_source(files: ModelFiles, llm_names: List[str]) -> Tuple[str, Optional[Path]]:
    """Where the ViT comes from: the video checkpoint's bundled `vit_model.*` tensors when present (upstream
    loads them last, so they are the weights video tasks run with; docs/upstream-notes.md), else vit.safetensors."""
    if any(k.startswith("vit_model.") for k in llm_names):
        return "bundled", None
    return "file", files.vit_weights


def convert(source, dest, video: bool = False, dtype: str = "bfloat16", vae_dtype: str = "float32",
            quantize: Optional[int] = None, group_size: int = 64, experts: str = "all", force: bool = False,
            progress: bool = True, shard_bytes: int = SHARD_BYTES,
            log: Callable[[str], Any] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Convert a Lance checkpoint (upstream hub layout, local folder or repo id; or another MLX port's folder)
    to one MLX folder: config.json (mlx_layout), model-*.safetensors + index, vit.safetensors, vae.safetensors,
    tokenizer files. Tensors are streamed one at a time (peak memory ~ one shard, or the VAE); everything is
    written to a temporary folder beside `dest` and renamed at the end."""
    from tqdm import tqdm

    from .config import VAEConfig
    from .media import atomic_output
    from .vae_wan22 import infer_vae_config, load_vae_checkpoint, sanitize_vae_weights
    from .vit import sanitize_vit_weights

    dt, vae_dt = parse_dtype(dtype), parse_dtype(vae_dtype)
    if vae_dt not in (mx.float32, mx.bfloat16):
        raise ValueError(f"unsupported VAE dtype {vae_dtype!r}: use float32 or bfloat16")
    quant = check_quantization({"bits": quantize, "group_size": group_size, "experts": experts}) \
        if quantize is not None else None
    if int(shard_bytes) <= 0:
        raise ValueError("shard_bytes must be positive")
    dest = Path(dest).expanduser()
    if dest.exists() and not force:
        raise WeightsError(f"{dest} already exists; choose another destination or pass --force to replace it")

    task = conversion_task(video)
    files = resolve(source, task)
    if files.layout == "mlx":
        cfg_data = read_config_json(files.config)
        if cfg_data.get("quantization"):
            raise WeightsError(f"{files.root} is already quantized; convert from the upstream checkpoint instead")
    if quant:
        warning = quantization_warning(quant["experts"])
        if warning:
            log(f"warning: {warning}")

    # Configuration: the LLM's (and ViT's) from the source, the VAE's from its own tensors (read below).
    config = read_lance_config(files)
    shapes = _header_shapes(files.llm_weights)
    llm_names = list(shapes)
    vit_from, vit_file = _vit_source(files, llm_names)
    if vit_from == "file" and vit_file is None:
        raise WeightsError(f"{files.root}: no ViT weights found for the conversion")
    plan = _plan_llm(shapes, files.key_style, dt.size, quant)
    shards = _shards(plan, int(shard_bytes))
    n = len(shards)

    # Disk space: LLM shards + ViT + VAE (estimated from the source sizes) + 2% for headers.
    vit_bytes = (sum(int(np.prod(s)) for k, (s, _) in shapes.items() if k.startswith("vit_model.")) * dt.size
                 if vit_from == "bundled" else
                 sum(int(np.prod(v[0])) for v in _header_shapes([vit_file]).values()) * dt.size)
    vae_src = Path(files.vae_weights)
    vae_bytes = vae_src.stat().st_size * (vae_dt.size / 4 if vae_src.suffix != ".safetensors" else 1)
    needed = int((sum(t.nbytes for t in plan) + vit_bytes + vae_bytes) * 1.02) + 2**20
    _check_disk(dest, needed)

    meta = {"format": "mlx"}
    bar = tqdm(total=len(plan) + 2, desc="converting", unit="tensor", disable=not progress, file=sys.stderr)
    try:
        with atomic_output(dest, is_dir=True) as tmp:
            # VAE first: it is the only file read whole (the .pth goes through the safe reader), so a bad or
            # unsafe file fails before hours of LLM writing, and it is freed before the LLM shards are built.
            raw = normalize_vae_keys(load_vae_checkpoint(vae_src))
            vcfg = infer_vae_config(raw)
            vae_w = sanitize_vae_weights(raw)
            del raw
            out = {}
            for k in sorted(vae_w):
                out[k] = mx.array(vae_w.pop(k)).astype(vae_dt)
                mx.eval(out[k])
            _write_safetensors(tmp / "vae.safetensors", out, {"format": "mlx", "model": "wan2.2-vae"})
            del out, vae_w
            config.vae = VAEConfig(z_dim=vcfg["z_dim"], c_dim=vcfg["dim"], dec_dim=vcfg["dec_dim"],
                                   dim_mult=tuple(vcfg["dim_mult"]), num_res_blocks=vcfg["num_res_blocks"],
                                   temperal_downsample=tuple(vcfg["temperal_downsample"]))
            bar.update(1)

            # LLM shards, one tensor at a time.
            src = {}
            for p in files.llm_weights:
                src.update(mx.load(str(p)))
            weight_map = {}
            total = 0
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                out = {}
                for t in shard:
                    # pop: an evaluated source array would otherwise keep its (float32) data alive
                    if t.kind == "cast":
                        out[t.out_key] = src.pop(t.src_key).astype(dt)
                        mx.eval(out[t.out_key])
                    elif t.kind == "qweight":
                        path = t.out_key[: -len(".weight")]
                        qs = mx.quantize(src.pop(t.src_key).astype(dt), quant["group_size"], quant["bits"])
                        mx.eval(*qs)
                        out[t.out_key], out[path + ".scales"], out[path + ".biases"] = qs
                    bar.update(1)
                _write_safetensors(tmp / name, out, meta)
                for k, v in out.items():
                    weight_map[k] = name
                    total += v.nbytes
                del out
            del src
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))

            # ViT: bundled tensors of the video checkpoint, else the standalone file; MLX layout, never quantized.
            if vit_from == "bundled":
                vit_w = {k: v for p in files.llm_weights for k, v in mx.load(str(p)).items()
                         if k.startswith("vit_model.")}
            else:
                vit_w = mx.load(str(vit_file))
            vit_w = {k: v.astype(dt) for k, v in sanitize_vit_weights(vit_w, config.vit).items()}
            _write_safetensors(tmp / "vit.safetensors", vit_w, meta)
            del vit_w
            bar.update(1)

            # Tokenizer files and config.json (written last: a folder with it is complete).
            tok_dir = files.tokenizer_dir
            for n_ in TOKENIZER_FILES + TOKENIZER_EXTRAS:
                if (tok_dir / n_).is_file():
                    shutil.copy(tok_dir / n_, tmp / n_)
            config.mlx_layout = True
            config.quantization = quant
            data = config.to_dict()
            data["conversion"] = {"source": str(source), "source_layout": files.layout,
                                  "checkpoint": VIDEO_LLM_DIR if video else IMAGE_LLM_DIR,
                                  "dtype": dtype_name(dt), "vae_dtype": dtype_name(vae_dt),
                                  "vit": "bundled vit_model.* tensors" if vit_from == "bundled" else "vit.safetensors"}
            (tmp / "config.json").write_text(json.dumps(data, indent=2))
    finally:
        bar.close()
    return dest


def read_lance_config(files: ModelFiles):
    """LanceConfig of a model folder: ours (config.json), upstream (llm_config.json + Qwen2.5-VL-ViT/config.json),
    or another port's config.json (a copy of llm_config.json, possibly mlx-vlm style with `text_config`, and an
    mlx-lm `quantization` block)."""
    from .config import LanceConfig, ViTConfig

    data = read_config_json(files.config)
    if files.layout == "mlx":
        return LanceConfig.from_dict(data)
    if "text_config" in data and "hidden_size" not in data:
        data = {**data, **data["text_config"]}
    config = LanceConfig.from_dict(data)
    if files.vit_config is not None and files.layout == "upstream":
        config.vit = ViTConfig.from_dict(read_config_json(files.vit_config))
    q = data.get("quantization")
    if files.layout == "mlx-other" and isinstance(q, dict) and "bits" in q:
        # which modules are quantized is read from the weights (their .scales) when loading
        config.quantization = {"bits": q["bits"], "group_size": q.get("group_size", 64), "experts": "as stored"}
    return config

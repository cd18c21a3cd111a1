"""Finding, downloading, validating and loading Lance weights (upstream hub layout and our converted layout)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

UPSTREAM_REPO = "bytedance-research/Lance"
IMAGE_LLM_DIR = "Lance_3B"
VIDEO_LLM_DIR = "Lance_3B_Video"
VIT_DIR = "Qwen2.5-VL-ViT"
VAE_PTH = "Wan2.2_VAE.pth"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

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


class WeightsError(ValueError):
    """A model folder or weight file is missing, incomplete or of an unknown layout."""


def parse_dtype(name) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        return name
    try:
        return DTYPES[str(name).replace("mlx.core.", "")]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}: use one of {', '.join(DTYPES)}") from None


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
# Model folders


@dataclass
class ModelFiles:
    """Where each part of a Lance model lives on disk."""

    root: Path
    layout: str  # "upstream" (hub layout, PyTorch names) or "mlx" (converted by convert.py)
    config: Path  # llm_config.json (upstream) or config.json (ours)
    llm_weights: List[Path] = field(default_factory=list)
    tokenizer_dir: Optional[Path] = None
    vit_weights: Optional[Path] = None
    vit_config: Optional[Path] = None
    vae_weights: Optional[Path] = None


def _missing_hint(repo: str, pattern: str) -> str:
    return f"get it with: hf download {repo} --include '{pattern}' --local-dir <folder>"


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
    if cfg.is_file():
        try:
            marked = json.loads(cfg.read_text()).get("mlx_layout", False)
        except json.JSONDecodeError:
            marked = False
        if marked:
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
    else:
        found = sorted(p.name for p in path.iterdir())[:20]
        raise WeightsError(
            f"{path} is not a Lance model folder: expected the upstream layout ({llm_sub}/llm_config.json, "
            f"{VIT_DIR}/, {VAE_PTH}) or a folder written by convert.py (config.json with mlx_layout); "
            f"found {found}. {_missing_hint(UPSTREAM_REPO, llm_sub + '/*')}")
    llm_config = _require(llm_dir / "llm_config.json", _missing_hint(UPSTREAM_REPO, f"{llm_dir.name}/*"))
    try:
        llm_weights = sharded_files(llm_dir)
    except WeightsError as e:
        raise WeightsError(f"{e}; {_missing_hint(UPSTREAM_REPO, llm_dir.name + '/*')}") from None
    files = ModelFiles(root=root, layout="upstream", config=llm_config, llm_weights=llm_weights, tokenizer_dir=llm_dir)
    tok = [n for n in TOKENIZER_FILES if (llm_dir / n).is_file()]
    if not ("tokenizer.json" in tok or {"vocab.json", "merges.txt"} <= set(tok)):
        raise WeightsError(f"{llm_dir} has no tokenizer files (tokenizer.json or vocab.json + merges.txt); "
                           + _missing_hint(UPSTREAM_REPO, f"{llm_dir.name}/*"))
    if needs_vit:
        vit_dir = root / VIT_DIR
        files.vit_weights = _require(vit_dir / "vit.safetensors", _missing_hint(UPSTREAM_REPO, VIT_DIR + "/*"))
        files.vit_config = _require(vit_dir / "config.json", _missing_hint(UPSTREAM_REPO, VIT_DIR + "/*"))
    if needs_vae:
        files.vae_weights = _require(root / VAE_PTH, _missing_hint(UPSTREAM_REPO, VAE_PTH))
    return files


def _require(p: Path, hint: str) -> Path:
    if not p.is_file():
        raise WeightsError(f"missing file {p}: {hint}")
    return p


def hub_patterns(repo_id: str, subfolder: Optional[str], task: str, converted: bool) -> List[str]:
    """The allow-patterns that fetch only what `task` needs from a hub repo."""
    llm_sub, needs_vae, needs_vit = TASKS[task]
    if converted:
        pats = ["config.json", "model*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES,
                "generation_config.json", "special_tokens_map.json", "added_tokens.json"]
        if needs_vit:
            pats.append("vit.safetensors")
        if needs_vae:
            pats.append("vae.safetensors")
        return pats
    sub = subfolder or llm_sub
    pats = [f"{sub}/*.json", f"{sub}/model.safetensors", f"{sub}/*.txt"]
    if needs_vit:
        pats += [f"{VIT_DIR}/config.json", f"{VIT_DIR}/vit.safetensors"]
    if needs_vae:
        pats.append(VAE_PTH)
    return pats


def resolve(path_or_repo, task: str = "t2i") -> ModelFiles:
    """A local folder, or a hub repo id (optionally `owner/name/subfolder`) downloaded to the HF cache."""
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


def download(repo_id: str, subfolder: Optional[str], task: str) -> Path:
    """Fetch only the files `task` needs (resumable; served from the cache when HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    converted = False
    if repo_id != UPSTREAM_REPO and subfolder is None:
        # A converted repo carries a top-level config.json marked mlx_layout.
        try:
            cfg = hf_hub_download(repo_id, "config.json")
            converted = bool(json.loads(Path(cfg).read_text()).get("mlx_layout", False))
        except Exception:
            converted = False
    patterns = hub_patterns(repo_id, subfolder, task, converted)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "HF_HUB_OFFLINE is set and they are not in the cache" if offline else "the hub cannot be reached"
        raise WeightsError(
            f"cannot get {repo_id} files {patterns} for task {task}: {why}. Download them once with network "
            f"access (hf download {repo_id} " + " ".join(f"--include '{p}'" for p in patterns)
            + "), or pass --model with a local folder.") from None

"""Model folders: the upstream and MLX layouts, which files each task needs, hub downloads, safetensors headers."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigValueError, LanceConfig, ViTConfig
from .errors import InvalidRequestError, WeightsError
from .torch_checkpoint import LFS_POINTER

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

# Which checkpoint and components each task needs (upstream inference_lance.py::TASK_DEFAULT_CONFIGS):
# task -> (LLM checkpoint folder, needs the VAE, needs the ViT).
TASKS = {
    "t2i": (IMAGE_LLM_DIR, True, False),
    "image_edit": (IMAGE_LLM_DIR, True, True),
    "x2t_image": (IMAGE_LLM_DIR, False, True),
    "t2v": (VIDEO_LLM_DIR, True, False),
    "i2v": (VIDEO_LLM_DIR, True, False),
    "video_edit": (VIDEO_LLM_DIR, True, True),
    "x2t_video": (VIDEO_LLM_DIR, False, True),
}

# LLM checkpoint folder -> the kind `ModelFiles.checkpoint` reports.
_CHECKPOINT_KINDS = {IMAGE_LLM_DIR: "image", VIDEO_LLM_DIR: "video"}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise InvalidRequestError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def checkpoint_kind_for(task: str) -> str:
    """"image" (Lance_3B) or "video" (Lance_3B_Video): the LLM checkpoint `task` runs with."""
    _check_task(task)
    return _CHECKPOINT_KINDS[TASKS[task][0]]


# --------------------------------------------------------------------------------------------------------------
# Safetensors headers


def check_safetensors(path: Path) -> dict[str, dict]:
    """Parse a safetensors header and check that the file holds every byte it promises; returns the header."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    size = path.stat().st_size
    unreadable = WeightsError(f"{path} is not a safetensors file (unreadable header): the file is corrupt or not a "
                              "weight file; download or convert it again")
    with open(path, "rb") as f:
        head = f.read(8)
        if head == LFS_POINTER[:8] and f.read(len(LFS_POINTER) - 8) == LFS_POINTER[8:]:
            raise WeightsError(f"{path} is a Git LFS pointer, not the weights: the repository was cloned without its "
                               "large files; run `git lfs pull` in it, or download the file with `hf download`")
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise unreadable
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise unreadable from None
    if not isinstance(header, dict) or not all(_valid_entry(v) for k, v in header.items() if k != "__metadata__"):
        raise unreadable
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsError(
            f"{path} is truncated ({size} bytes, header promises {8 + n + end}): an incomplete download or copy; "
            "download it again (huggingface_hub resumes partial downloads)")
    return header


def _valid_entry(entry) -> bool:
    """A safetensors header entry: {"dtype", "shape", "data_offsets": [begin, end]}."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets))


def tensor_names(paths: Iterable[Path]) -> list[str]:
    """Tensor names stored in safetensors files (headers only)."""
    return [k for p in paths for k in check_safetensors(p) if k != "__metadata__"]


def sharded_files(folder: Path, stem: str = "model") -> list[Path]:
    """`model.safetensors`, or the shards listed in `model.safetensors.index.json`."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_config_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index} has no \"weight_map\" of tensor names to shard files; download or convert "
                               "the folder again")
        names = sorted(set(weight_map.values()))
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


def llm_key_style(names: Iterable[str]) -> str | None:
    """"upstream" or "stripped" (docs/checkpoints.md) from the tensor names of an LLM checkpoint, None if neither."""
    names = list(names)
    if any(k.startswith("language_model.model.layers.") for k in names):
        return "upstream"
    if "embed_tokens.weight" in names and any(re.match(r"layers\.\d+\.", k) for k in names):
        return "stripped"
    return None


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
    llm_weights: list[Path] = field(default_factory=list)
    tokenizer_dir: Path | None = None
    vit_weights: Path | None = None
    vit_config: Path | None = None
    vae_weights: Path | None = None
    key_style: str = "upstream"  # tensor names of llm_weights: "upstream" or "stripped"
    # Which LLM checkpoint the folder holds: "image" (Lance_3B), "video" (Lance_3B_Video), or None when unknown.
    checkpoint: str | None = None


def _missing_hint(repo: str, pattern: str) -> str:
    return f"get it with: hf download {repo} --include '{pattern}' --local-dir <folder>"


def _has_tokenizer(folder: Path) -> bool:
    tok = {n for n in TOKENIZER_FILES if (folder / n).is_file()}
    return "tokenizer.json" in tok or {"vocab.json", "merges.txt"} <= tok


def _model_weight_files(folder: Path) -> list[Path]:
    if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
        return sharded_files(folder)
    return []


def _require(p: Path, hint: str) -> Path:
    if not p.is_file():
        raise WeightsError(f"missing file {p}: {hint}")
    return p


def _converted_checkpoint(cfg_data: dict[str, Any]) -> str | None:
    """The checkpoint kind recorded by convert.py in config.json's `conversion` block."""
    conversion = cfg_data.get("conversion")
    if not isinstance(conversion, dict):
        return None
    return _CHECKPOINT_KINDS.get(conversion.get("checkpoint"))


def locate(path: Path, task: str = "t2i") -> ModelFiles:
    """Find the files of `task` below a local folder in any supported layout; errors name what is missing."""
    _check_task(task)
    llm_sub, needs_vae, needs_vit = TASKS[task]
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"model folder not found: {path}")
    if not path.is_dir():
        raise WeightsError(f"--model takes a folder or a hub repo id, but {path} is a file: pass the folder "
                           f"that holds it ({path.parent}) or the upstream repo ({UPSTREAM_REPO})", "model")

    # Our converted layout: a single folder with config.json marked mlx_layout.
    cfg = path / "config.json"
    cfg_data: dict[str, Any] = {}
    if cfg.is_file():
        try:
            cfg_data = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            cfg_data = {}
        if not isinstance(cfg_data, dict):
            cfg_data = {}
        if cfg_data.get("mlx_layout", False):
            files = ModelFiles(root=path, layout="mlx", config=cfg, llm_weights=sharded_files(path),
                               tokenizer_dir=path, checkpoint=_converted_checkpoint(cfg_data))
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
    files = ModelFiles(root=root, layout="upstream", config=llm_config, llm_weights=llm_weights, tokenizer_dir=llm_dir,
                       checkpoint=_CHECKPOINT_KINDS.get(llm_dir.name))
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
                           f"from the upstream {IMAGE_LLM_DIR}/ folder "
                           f"({_missing_hint(UPSTREAM_REPO, IMAGE_LLM_DIR + '/*')})")
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


# --------------------------------------------------------------------------------------------------------------
# Hugging Face hub


def hub_patterns(repo_id: str, subfolder: str | None, task: str, converted: bool) -> list[str]:
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


# One part of a hub repo id (huggingface_hub utils/_validators.py::validate_repo_id): letters, digits, '-', '_',
# '.', at most 96 characters, not starting or ending with '-' or '.', no '--' or '..'; a name not ending in '.git'.
_REPO_PART = re.compile(r"(?!.*(?:--|\.\.))[\w](?:[\w.-]{0,94}[\w])?", re.ASCII)
# Web addresses of a model repo: https://huggingface.co/OWNER/NAME, optionally /tree/main[/SUBFOLDER].
_HUB_URL = re.compile(r"(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<path>[^?#]*)/*(?:[?#].*)?", re.I)
_REPO_ID_HINT = f"a hub repo id looks like OWNER/NAME (letters, digits, '-', '_', '.'), e.g. {UPSTREAM_REPO}"


def hub_reference(text) -> tuple[str, str | None]:
    """(repo id, subfolder or None) of `OWNER/NAME[/SUBFOLDER]` or of the repo's web address
    (https://huggingface.co/OWNER/NAME[/tree/main[/SUBFOLDER]]), checked before the hub is asked."""
    text = str(text).strip()
    url = _HUB_URL.fullmatch(text)
    parts = [p for p in (url.group("path") if url else text).split("/") if p]
    if url:
        if parts[:1] in (["datasets"], ["spaces"]):
            raise WeightsError(f"{text!r} is a hub {parts[0][:-1]}, not a repo of weights: {_REPO_ID_HINT}", "model")
        if len(parts) > 2 and parts[2:4] != ["tree", "main"]:
            raise WeightsError(f"{text!r} is not the address of a hub repo (https://huggingface.co/OWNER/NAME, "
                               "optionally /tree/main/SUBFOLDER): other revisions and single files are not "
                               f"downloaded; pass OWNER/NAME, e.g. {UPSTREAM_REPO}", "model")
        parts = parts[:2] + parts[4:]
    elif "://" in text:
        raise WeightsError(f"{text!r} is not a huggingface.co address: {_REPO_ID_HINT}", "model")
    elif text.startswith((".", "/", "~")) or len(parts) < 2:
        raise WeightsError(f"model folder not found: {text} (and it is not a hub repo id like {UPSTREAM_REPO})")
    owner, name = (parts + ["", ""])[:2]
    if not (_REPO_PART.fullmatch(owner) and _REPO_PART.fullmatch(name)) or name.endswith(".git") or \
            any(p in (".", "..") for p in parts[2:]):
        raise WeightsError(f"{text!r} is neither a local folder nor a hub repo id: {_REPO_ID_HINT}", "model")
    return f"{owner}/{name}", ("/".join(parts[2:]) or None)


def resolve(path_or_repo, task: str = "t2i") -> ModelFiles:
    """A local folder, or a hub repo (`OWNER/NAME[/SUBFOLDER]` or its huggingface.co address) downloaded to the HF
    cache."""
    _check_task(task)
    p = Path(str(path_or_repo)).expanduser()
    if p.exists():
        return locate(p, task)
    repo_id, subfolder = hub_reference(path_or_repo)
    local = download(repo_id, subfolder, task)
    return locate(local / subfolder if subfolder else local, task)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _hub_error(repo_id: str, patterns: list[str], error: Exception) -> WeightsError:
    """One line for each way a hub download fails: no such repo (or private), gated, a server error, no network."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, HFValidationError):  # hub_reference checks ids first; this catches rules it does not know
        return WeightsError(f"{repo_id!r} is not a valid hub repo id ({error}): {_REPO_ID_HINT}", "model")
    if isinstance(error, GatedRepoError):
        return WeightsError(f"{repo_id} is a gated repo: accept its terms on https://huggingface.co/{repo_id} and log "
                            "in (hf auth login, or set HF_TOKEN), or pass --model with a local folder", "model")
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        return WeightsError(f"no hub repo {repo_id} (or it is private and you are not logged in): check the name, "
                            f"e.g. {UPSTREAM_REPO}, or pass --model with a local folder", "model")
    if isinstance(error, HfHubHTTPError) and not isinstance(error, LocalEntryNotFoundError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        return WeightsError(f"the hub answered {status or 'an error'} for {repo_id} ({str(error).splitlines()[0]}); "
                            "try again later, or pass --model with a local folder", "model")
    why = "HF_HUB_OFFLINE is set and they are not in the cache" if _offline() else "the hub cannot be reached"
    return WeightsError(
        f"cannot get {repo_id} files {patterns}: {why}. Download them once with network "
        f"access (hf download {repo_id} " + " ".join(f"--include '{p}'" for p in patterns)
        + "), or pass --model with a local folder.", "model")


def download(repo_id: str, subfolder: str | None, task: str) -> Path:
    """Fetch only the files `task` needs (resumable; served from the cache when HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    # OSError: network and cache errors; HFValidationError: an id or file name the hub's client refuses
    hub_failures = (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError)
    converted = False
    if repo_id != UPSTREAM_REPO and subfolder is None:
        # Single-folder MLX layouts (ours and other ports) carry a top-level config.json next to their weights;
        # the upstream repo keeps its weights in Lance_3B/ … subfolders.
        try:
            cfg = json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
            converted = bool(cfg.get("mlx_layout")) or "llm" in cfg or "hidden_size" in cfg or "text_config" in cfg
        except LocalEntryNotFoundError as e:  # offline / unreachable (a subclass of EntryNotFoundError)
            raise _hub_error(repo_id, hub_patterns(repo_id, None, task, True), e) from None
        except (EntryNotFoundError, json.JSONDecodeError, AttributeError):  # no config.json: the upstream layout
            converted = False
        except hub_failures as e:
            raise _hub_error(repo_id, hub_patterns(repo_id, None, task, True), e) from None
    patterns = hub_patterns(repo_id, subfolder, task, converted)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except hub_failures as e:
        raise _hub_error(repo_id, patterns, e) from None


# --------------------------------------------------------------------------------------------------------------
# Configuration files


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}); re-download or re-convert the model folder") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} does not hold a JSON object; re-download or re-convert the model folder")
    return data


def read_lance_config(files: ModelFiles) -> LanceConfig:
    """LanceConfig of a model folder: ours (config.json), upstream (llm_config.json + Qwen2.5-VL-ViT/config.json),
    or another port's config.json (a copy of llm_config.json, possibly mlx-vlm style with `text_config`, and an
    mlx-lm `quantization` block)."""
    try:
        return _lance_config(files)
    except ConfigValueError as e:
        raise WeightsError(f"{files.config}: {e}; fix the file, or re-download / re-convert the folder") from None


def _lance_config(files: ModelFiles) -> LanceConfig:
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

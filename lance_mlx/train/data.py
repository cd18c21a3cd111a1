"""Training data: find and check the items of a dataset, cache their VAE latents / ViT features once, and build
per-step examples (posterior sample, text / vision drop for CFG) in aspect buckets.

Layouts (docs/training.md):
- t2i: a folder of images with same-named `.txt` captions (`cat.png` + `cat.txt`);
- edit: `NAME.png` (source) + `NAME_target.png` + `NAME.txt` (instruction);
- i2t: images with `.txt` answers (the caption task);
- any task: a JSONL manifest, one object per line: {"image", "caption"} / {"source", "target", "instruction"} /
  {"image", "answer", "question"?, "system"?}, paths relative to the manifest;
- any task: upstream's local parquet format (train_dataset.md, `parquet.py`), media as bytes.

The examples follow upstream's training data code (data/datasets_factory/dataset_x2{v,t}_interleave.py and
data/dataset_base_train.py::pack_sequence), checked against it in tests/test_train_layouts.py.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .. import processing as P
from ..errors import InputNotFoundError, InvalidRequestError
from ..sequence import (
    END_IDS,
    QA_SYSTEM_PROMPTS,
    SYSTEM_PROMPT_IDS,
    caption_system_prompts,
    chat_sequence,
    generation_sequence,
    latent_split,
    system_prompt_ids,
    vit_split,
)
from .objective import Example
from .parquet import PARQUET_COLUMNS, read_parquet  # noqa: F401  (PARQUET_COLUMNS: part of this module's API)

TASKS = ("t2i", "edit", "i2t")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TARGET_SUFFIX = "_target"
# Upstream scripts/sft_lance_generation.sh: TEXT_COND_DROPOUT_PROB=0.1, VIT_COND_DROPOUT_PROB=0.1 (the ViT drop also
# drops the VAE conditioning of edits: data/datasets_factory/dataset_x2v_interleave.py).
TEXT_DROP = 0.1
VISION_DROP = 0.1
# Upstream config/train_local/i2t_local.yaml: the understanding ViT input is bucketed at 616.
I2T_VIT_RESOLUTION = 616
# The system prompt upstream TRAINS t2i with: config/train_local/t2i_local.yaml sets no sample_task, so
# base_mm_parquet_dataset.py's default "t2v" applies, and dataset_x2v_interleave.py calls
# data/common.py::generate_system_prompt("t2v", vision_type="image"): the t2v prompt with "video" -> "image"
# ("Describe the image by detailing the color, quantity, visible text, ... motion/camera movements ..."). Upstream's
# inference uses the t2i prompt (sequence.SYSTEM_PROMPT_T2I); we train and sample as upstream does.
_VIDEO_ID, _IMAGE_ID = 2766, 2168  # " video", " image" (sequence.py)
T2I_TRAIN_SYSTEM_IDS = [_IMAGE_ID if i == _VIDEO_ID else i for i in SYSTEM_PROMPT_IDS["t2v"]]


@dataclass
class Item:
    """One training item as found on disk."""

    name: str
    text: str  # caption / instruction / answer
    image: Union[Path, bytes]  # t2i target, edit source, i2t image (bytes: a parquet cell)
    target: Optional[Union[Path, bytes]] = None  # edit target
    question: Optional[str] = None  # i2t
    system: Optional[str] = None  # i2t: the instruction / system prompt of the item (upstream's caption_i)


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_text(path: Path, what: str, medium: str = "image") -> str:
    """The stripped caption / instruction / answer beside a training image or video (one clear error if missing)."""
    if not path.is_file():
        raise InputNotFoundError(f"{path} is missing: every training {medium} needs its {what} in a same-named .txt",
                                 param="data")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise InvalidRequestError(f"{path} is empty: write the {what} into it", param="data")
    return text


def scan_folder(folder: Path, task: str) -> List[Item]:
    items = []
    images = _images_in(folder)
    if task == "edit":
        for src in images:
            if src.stem.endswith(TARGET_SUFFIX):
                continue
            tgt = [p for p in images if p.stem == src.stem + TARGET_SUFFIX]
            if not tgt:
                raise InputNotFoundError(f"{src} has no target image: add {src.stem}{TARGET_SUFFIX}{src.suffix} "
                                         f"beside it", param="data")
            items.append(Item(src.stem, read_text(src.with_suffix(".txt"), "instruction"), src, tgt[0]))
    else:
        what = "caption" if task == "t2i" else "answer"
        items = [Item(p.stem, read_text(p.with_suffix(".txt"), what), p) for p in images]
    return items


def scan_manifest(path: Path, task: str) -> List[Item]:
    items = []
    base = path.parent
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{where} is not valid JSON ({e.msg})", param="data") from None
        if not isinstance(row, dict):
            raise InvalidRequestError(f"{where} must be a JSON object", param="data")
        keys = {"t2i": ("image", "caption"), "edit": ("source", "target", "instruction"),
                "i2t": ("image", "answer")}[task]
        missing = [k for k in keys if not isinstance(row.get(k), str) or not row.get(k).strip()]
        if missing:
            raise InvalidRequestError(f"{where} lacks {', '.join(missing)} (a {task} row needs {', '.join(keys)})",
                                      param="data")
        if task == "edit":
            items.append(Item(f"{n:06d}", row["instruction"].strip(), base / row["source"], base / row["target"]))
        elif task == "t2i":
            items.append(Item(f"{n:06d}", row["caption"].strip(), base / row["image"]))
        else:
            q, sp = row.get("question"), row.get("system")
            items.append(Item(f"{n:06d}", row["answer"].strip(), base / row["image"],
                              question=q.strip() if isinstance(q, str) and q.strip() else None,
                              system=sp.strip() if isinstance(sp, str) and sp.strip() else None))
    return items


def scan_parquet(path: Path, task: str) -> List[Item]:
    """Rows of an upstream-format local parquet file (media as bytes; `parquet.read_parquet`)."""
    return [Item(image=row.pop("media"), **row) for row in read_parquet(path, task)]


def open_image(src: Union[Path, bytes], where: str = "image"):
    """An item's image as RGB (upstream's conversion), from a file or parquet bytes; a bad one is one clear error."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(src, (bytes, bytearray)):
            return P.load_image(Image.open(io.BytesIO(src)))
        return P.load_image(src)
    except FileNotFoundError:
        raise InputNotFoundError(f"training image {where} does not exist", param="data") from None
    except UnidentifiedImageError:
        raise InvalidRequestError(f"training image {where} is not an image file that can be read", param="data") \
            from None
    except (ValueError, OSError) as e:
        raise InvalidRequestError(f"training image {where}: {e}", param="data") from None


def find_items(data, task: str) -> List[Item]:
    """Every item of a folder, JSONL manifest or parquet file, each image checked to decode (one clear error)."""
    if task not in TASKS:
        raise InvalidRequestError(f"unknown training task {task!r}: use one of {', '.join(TASKS)}", param="task")
    path = Path(data).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"training data {path} does not exist", param="data")
    if path.is_dir():
        items = scan_folder(path, task)
    elif path.suffix.lower() == ".parquet":
        items = scan_parquet(path, task)
    else:
        items = scan_manifest(path, task)
    if not items:
        raise InvalidRequestError(f"no {task} training items in {path} (see docs/training.md for the layout)",
                                  param="data")
    for it in items:
        for p in (it.image, it.target):
            if p is not None:
                open_image(p, f"{path} {it.name}" if isinstance(p, bytes) else str(p))
    return items


def data_hash(items: Sequence, settings: Dict, medium: str = "image") -> str:
    """A hash of the items (paths, sizes, mtimes, texts) and the settings that change the cached features; `medium`
    names the items' source field (Item.image, video_data.VideoItem.video)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        for p in (getattr(it, medium), it.target):
            if isinstance(p, (bytes, bytearray)):
                h.update(hashlib.sha256(p).digest())
            elif p is not None:
                st = p.stat()
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(f"|{it.text}|{it.question}".encode())
        if it.system is not None:  # only then: the hashes of earlier caches stay valid
            h.update(f"|system|{it.system}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ features
@dataclass
class Features:
    """Cached inputs of one item: VAE posterior (mu_n, log_var) of the target/source, ViT features, token ids."""

    text_ids: np.ndarray
    target_mu: Optional[mx.array] = None  # (t*h*w, 48)
    target_log_var: Optional[mx.array] = None
    shape: Optional[tuple] = None  # latent grid (t, h, w)
    source_mu: Optional[mx.array] = None
    source_log_var: Optional[mx.array] = None
    vit: Optional[mx.array] = None  # (K, hidden)
    vit_grid: Optional[tuple] = None  # merged grid
    question_ids: Optional[np.ndarray] = None
    system_ids: Optional[np.ndarray] = None  # i2t: the item's own system prompt
    source_shape: Optional[tuple] = None  # edit: latent grid of the source (None: the target's)

    @property
    def bucket(self) -> tuple:
        return self.shape or self.vit_grid


def _posterior(vae, pixels) -> tuple:
    mu, log_var = vae.encode(mx.array(pixels)[None], return_log_var=True)  # (1, t, h, w, 48)
    _, t, h, w, c = mu.shape
    return mu.reshape(-1, c), log_var.reshape(-1, c), (t, h, w)


def encode_item(item: Item, task: str, pipe, resolution: int, vit_resolution: int) -> Features:
    """Run the VAE (and the ViT for edit / i2t) on one item, once."""
    f = text_features(item, pipe.tokenizer)
    if task in ("t2i", "edit"):
        img = item.target if task == "edit" else item.image
        f.target_mu, f.target_log_var, f.shape = _posterior(pipe.component("vae"),
                                                            P.prepare_vae_pixels([open_image(img)], resolution))
    if task in ("edit", "i2t"):
        src = open_image(item.image)
        if task == "edit":
            # the source takes its own aspect bucket, which may differ from the target's (as upstream's)
            f.source_mu, f.source_log_var, f.source_shape = _posterior(pipe.component("vae"),
                                                                       P.prepare_vae_pixels([src], resolution))
        from ..conditioning import vit_embeddings

        patches, grid = P.prepare_vit_patches([src], vit_resolution, is_image=True)
        f.vit, f.vit_grid = vit_embeddings(pipe.component("vit"), patches, grid)
    mx.eval([a for a in (f.target_mu, f.target_log_var, f.source_mu, f.source_log_var, f.vit) if a is not None])
    return f


def text_features(item: Item, tokenizer) -> Features:
    """The token ids of an item's texts, each tokenized alone (`chat_sequence` places them in the template)."""
    def tok(s: Optional[str]) -> Optional[np.ndarray]:
        return None if s is None else np.asarray(tokenizer(s, add_special_tokens=False)["input_ids"], dtype=np.int64)

    return Features(text_ids=tok(item.text), question_ids=tok(item.question), system_ids=tok(item.system))


def save_features(f: Features, path: Path) -> None:
    arrays = {k: getattr(f, k) for k in ("target_mu", "target_log_var", "source_mu", "source_log_var", "vit")
              if getattr(f, k) is not None}
    arrays["text_ids"] = mx.array(f.text_ids.astype(np.int32))
    for k in ("question_ids", "system_ids"):
        if getattr(f, k) is not None:
            arrays[k] = mx.array(getattr(f, k).astype(np.int32))
    meta = {k: json.dumps(getattr(f, k)) for k in ("shape", "vit_grid", "source_shape")}
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=meta)
    tmp.replace(path)


def load_features(path: Path) -> Features:
    arrays, meta = mx.load(str(path), return_metadata=True)
    shape, grid = json.loads(meta["shape"]), json.loads(meta["vit_grid"])
    source = json.loads(meta.get("source_shape", "null"))  # caches written before it: the target's grid
    q, sp = arrays.get("question_ids"), arrays.get("system_ids")
    return Features(text_ids=np.asarray(arrays["text_ids"]).astype(np.int64),
                    target_mu=arrays.get("target_mu"), target_log_var=arrays.get("target_log_var"),
                    shape=tuple(shape) if shape else None, source_mu=arrays.get("source_mu"),
                    source_log_var=arrays.get("source_log_var"), vit=arrays.get("vit"),
                    vit_grid=tuple(grid) if grid else None,
                    question_ids=None if q is None else np.asarray(q).astype(np.int64),
                    system_ids=None if sp is None else np.asarray(sp).astype(np.int64),
                    source_shape=tuple(source) if source else None)


def cache_each(items: Sequence, cache_dir: Path, encode: Callable, save: Callable, load: Callable,
               progress=None) -> List:
    """Features of every item, read from `cache_dir` when there, else `encode`d and `save`d there first."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i, it in enumerate(items):
        path = cache_dir / f"{i:06d}_{it.name[:60]}.safetensors"
        if not path.is_file():
            save(encode(it), path)
        out.append(load(path))
        if progress is not None:
            progress(i + 1, len(items))
    return out


def cache_features(items: Sequence[Item], task: str, pipe, cache_dir: Path, resolution: int,
                   vit_resolution: int, progress=None) -> List[Features]:
    """Features of every item, read from `cache_dir` when there, else encoded and written there."""
    return cache_each(items, cache_dir, lambda it: encode_item(it, task, pipe, resolution, vit_resolution),
                      save_features, load_features, progress)


# ------------------------------------------------------------------------------------------------ examples
def sample_posterior(mu: mx.array, log_var: mx.array, key: mx.array) -> mx.array:
    """Upstream's latent (WanVideoVAE use_sample): mu_n + exp(0.5 log_var) eps, drawn anew each step."""
    return mu + mx.exp(0.5 * log_var) * mx.random.normal(mu.shape, key=key)


def understanding_example(f, rng: random.Random, prompts: Dict[str, List[int]], medium: str = "image") -> Example:
    """Upstream's x2t sample of an image or video (`medium`; dataset_x2t_interleave.py, text template): SYSTEM = the
    item's caption_i, USER = [ViT block, question if any], ASSISTANT = the answer; CE on the answer and its
    <|im_end|>, each predicted from the token before it (system_prompt_render.py::expand_and_index_by_token_ids_new:
    the tokens after "assistant\n"; pack_sequence: ce_loss_indexes = label index - 1). No drops (enable_cfg 0).
    Items without their own system prompt: with a question, upstream's question-answering prompt
    (config/examples/x2t_{image,video}_example.json); without, one of the four caption prompts at random, as
    upstream for a caption-only target (data/common.py::generate_system_prompt("caption"))."""
    if f.system_ids is not None:
        system = [int(i) for i in f.system_ids]
    elif f.question_ids is not None:
        system = prompts[QA_SYSTEM_PROMPTS[medium]]
    else:
        system = prompts[rng.choice(caption_system_prompts(medium))]
    user = [vit_split(f.vit_grid, f.vit)] + ([f.question_ids] if f.question_ids is not None else [])
    answer = [int(i) for i in f.text_ids]
    seq = chat_sequence(system, user, [answer])
    n = len(seq)
    start = n - len(END_IDS) - len(answer)  # first answer token
    labels = seq.input_ids[start:]  # the answer and its <|im_end|>
    return Example(seq, ce_index=np.arange(start, n) - 1, labels=labels)


def build_example(f: Features, task: str, rng: random.Random, key: mx.array, text_drop: float = TEXT_DROP,
                  vision_drop: float = VISION_DROP, prompts: Optional[Dict[str, List[int]]] = None) -> Example:
    """One step's example of an item, as upstream's training data code builds it (dataset_x2v_interleave.py,
    text template): the posterior sample; with probability `text_drop` the caption / instruction is left out of
    the user turn (nothing stands in its place: USER is empty for t2i); for edits, with `vision_drop` the ViT
    block AND the conditioning latents are left out (upstream's one ViT-drop draw skips the whole source image;
    VAE_COND_DROPOUT_PROB is 0 in scripts/sft_lance_generation.sh). The two draws are independent, text first.
    Edit USER = [ViT block, conditioning latents (t = 0), instruction] (the instruction rotated to the end);
    system prompts: t2i `T2I_TRAIN_SYSTEM_IDS`, edit generate_system_prompt("edit", "image"), neither sampled.
    `prompts` (`understanding_prompts`) holds the token ids of the default i2t system prompts."""
    if task == "i2t":
        return understanding_example(f, rng, prompts)
    k_target, k_source = mx.random.split(key)
    x0 = sample_posterior(f.target_mu, f.target_log_var, k_target)
    drop_text = rng.random() < text_drop
    if task == "t2i":
        if drop_text:
            seq = chat_sequence(T2I_TRAIN_SYSTEM_IDS, [], [latent_split(f.shape, "target")])
        else:
            seq = generation_sequence("t2i", f.text_ids, f.shape, system_ids=T2I_TRAIN_SYSTEM_IDS)
    else:
        drop_vision = rng.random() < vision_drop
        cond = sample_posterior(f.source_mu, f.source_log_var, k_source)
        source = latent_split(f.source_shape or f.shape, "cond", cond)
        user = [] if drop_vision else [vit_split(f.vit_grid, f.vit), source]
        user += [] if drop_text else [f.text_ids]
        seq = chat_sequence(system_prompt_ids("image_edit"), user, [latent_split(f.shape, "target")],
                            prompt_ids=None if drop_text else f.text_ids)
    seq.splits[seq.noise_index].data = x0
    return Example(seq)


def understanding_prompts(tokenizer, medium: str = "image") -> Dict[str, List[int]]:
    """Token ids of the i2t / v2t (`medium` "video") system prompts (caption prompts and the question-answering
    prompt)."""
    return {t: list(tokenizer(t, add_special_tokens=False)["input_ids"])
            for t in caption_system_prompts(medium) + [QA_SYSTEM_PROMPTS[medium]]}


def buckets(features: Sequence[Features]) -> Dict[tuple, List[int]]:
    """Item indices grouped by latent grid (the aspect bucket), so a batch holds one bucket."""
    out: Dict[tuple, List[int]] = {}
    for i, f in enumerate(features):
        out.setdefault(f.bucket, []).append(i)
    return out


def batch_order(features: Sequence[Features], batch_size: int, seed: int, epoch: int) -> List[List[int]]:
    """Batches of one epoch: each bucket shuffled and cut into batches, then the batches shuffled (seeded)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    batches = []
    for _, idx in sorted(buckets(features).items()):
        idx = list(idx)
        rng.shuffle(idx)
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


__all__ = ["Item", "Features", "find_items", "cache_features", "build_example", "batch_order", "data_hash",
           "understanding_prompts"]

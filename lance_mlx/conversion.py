"""convert.py's work: one MLX folder (config.json, LLM shards, ViT, VAE, tokenizer) from a Lance checkpoint."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .checkpoints import (
    IMAGE_LLM_DIR,
    TOKENIZER_EXTRAS,
    TOKENIZER_FILES,
    VIDEO_LLM_DIR,
    ModelFiles,
    check_safetensors,
    read_config_json,
    read_lance_config,
    resolve,
)
from .config import LanceConfig, VAEConfig
from .errors import InvalidRequestError, OutputError, OutputTakenError, WeightsError, WriteError
from .loading import dtype_name, normalize_llm_keys, normalize_vae_keys, parse_dtype
from .lora import weight_deltas as lora_weight_deltas
from .publish import publish
from .quantize import check_quantization, is_quantized_linear, quantization_warning

SHARD_BYTES = 5 * 10**9  # largest model-*.safetensors shard convert.py writes

# The files a conversion writes; a folder holding anything else was not written by convert.py.
_OUTPUT_FILES = frozenset(("config.json", "model.safetensors.index.json", "vit.safetensors", "vae.safetensors",
                           *TOKENIZER_FILES, *TOKENIZER_EXTRAS))
_SHARD_NAME = re.compile(r"model(-\d+-of-\d+)?\.safetensors")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class ConversionOptions:
    """What to convert and how (convert.py's flags)."""

    video: bool = False  # Lance_3B_Video instead of Lance_3B
    dtype: str = "bfloat16"  # LLM and ViT
    vae_dtype: str = "float32"
    quantize: int | None = None  # bits of the LLM decoder linears, or None
    group_size: int = 64
    experts: str = "all"  # which expert's linears are quantized
    force: bool = False  # replace an earlier conversion output at the destination
    shard_bytes: int = SHARD_BYTES
    fuse_lora: tuple = ()  # (path, scale) LoRA adapters folded into the LLM weights (docs/training.md)


def conversion_task(video: bool) -> str:
    """The task whose files are exactly a full conversion's: LLM, ViT and VAE."""
    return "video_edit" if video else "image_edit"


@dataclass
class _Tensor:
    """One output tensor of the LLM shards: where it comes from and how it is transformed."""

    out_key: str
    src_key: str
    kind: str  # "cast", "qweight", "scales", "biases"
    nbytes: int


@dataclass
class ConversionPlan:
    """Everything `convert` writes, decided and checked before the first byte is written."""

    source: Any  # as given (recorded in config.json)
    dest: Path
    options: ConversionOptions
    dtype: mx.Dtype
    vae_dtype: mx.Dtype
    quant: dict[str, Any] | None
    files: ModelFiles
    config: LanceConfig
    vit_from: str  # "bundled" (the video checkpoint's vit_model.* tensors) or "file"
    vit_file: Path | None
    shards: list[list[_Tensor]]
    needed_bytes: int = 0  # disk space of the output (`_needed_bytes`)

    @property
    def num_tensors(self) -> int:
        return sum(len(s) for s in self.shards)


# --------------------------------------------------------------------------------------------------------------
# Checks


def check_options(options: ConversionOptions) -> tuple[mx.Dtype, mx.Dtype, dict[str, Any] | None]:
    """(LLM dtype, VAE dtype, quantization or None) of valid options; InvalidRequestError otherwise."""
    dt, vae_dt = parse_dtype(options.dtype), parse_dtype(options.vae_dtype)
    if vae_dt not in (mx.float32, mx.bfloat16):
        raise InvalidRequestError(f"unsupported VAE dtype {options.vae_dtype!r}: use float32 or bfloat16")
    quant = None
    if options.quantize is not None:
        quant = check_quantization({"bits": options.quantize, "group_size": options.group_size,
                                    "experts": options.experts})
    if int(options.shard_bytes) <= 0:
        raise InvalidRequestError("shard_bytes must be positive")
    return dt, vae_dt, quant


def _not_conversion_output(folder: Path) -> str | None:
    """Why `folder` is not an earlier output of convert.py, or None when it is one."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder"
    entries = sorted(folder.iterdir())
    foreign = [p.name for p in entries if p.is_symlink() or not p.is_file()
               or not (p.name in _OUTPUT_FILES or _SHARD_NAME.fullmatch(p.name))]
    if foreign:
        return f"it holds {', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}"
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "it has no readable config.json"
    if not (isinstance(data, dict) and data.get("mlx_layout") is True and isinstance(data.get("conversion"), dict)):
        return "its config.json has no mlx_layout and conversion record"
    return None


def check_destination(dest, force: bool = False) -> Path:
    """The destination folder as a Path, if convert may write it: a new folder, or with `force` an earlier
    conversion output; never the current, a parent or the home folder (OutputError)."""
    dest = Path(dest).expanduser()
    resolved = dest.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if dest.name in ("", ".", "..") or resolved in (cwd, home, *cwd.parents, *home.parents):
        raise OutputError(f"refusing to write a conversion to {dest} ({resolved}): it must be a folder of its own, "
                          "not the current, a parent or the home folder; choose a new destination")
    if not (dest.exists() or dest.is_symlink()):
        return dest
    why = _not_conversion_output(dest)
    if why is not None:
        raise OutputError(f"{dest} already exists and was not written by convert.py ({why}), so it is left alone "
                          "even with --force; choose a new destination")
    if not force:
        raise OutputError(f"{dest} already exists; choose another destination or pass --force to replace it")
    return dest


def _check_disk(dest: Path, needed: int) -> None:
    probe = dest.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise WeightsError(f"not enough disk space for {dest}: the converted model needs about {needed / 1e9:.2f} GB "
                           f"and {probe} has {free / 1e9:.2f} GB free; free some space or choose another "
                           "destination (--dtype bfloat16 or --quantize 8/4 make the output smaller)")


# --------------------------------------------------------------------------------------------------------------
# Plan


def _header_shapes(paths: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for p in paths:
        for k, v in check_safetensors(p).items():
            if k != "__metadata__":
                out[k] = (tuple(v["shape"]), v["dtype"])
    return out


def _plan_llm(shapes: dict[str, tuple[tuple[int, ...], str]], style: str, itemsize: int,
              quant: dict[str, Any] | None) -> list[_Tensor]:
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


def _shards(plan: list[_Tensor], shard_bytes: int) -> list[list[_Tensor]]:
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


def _vit_source(files: ModelFiles, llm_names: list[str]) -> tuple[str, Path | None]:
    """Where the ViT comes from: the video checkpoint's bundled `vit_model.*` tensors when present (upstream
    loads them last, so they are the weights video tasks run with; docs/upstream-notes.md), else vit.safetensors."""
    if any(k.startswith("vit_model.") for k in llm_names):
        return "bundled", None
    return "file", files.vit_weights


def _needed_bytes(plan: ConversionPlan, shapes: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """Disk space of the output: LLM shards + ViT + VAE (estimated from the source sizes) + 2% for headers."""
    itemsize = plan.dtype.size
    if plan.vit_from == "bundled":
        vit_bytes = sum(int(np.prod(s)) for k, (s, _) in shapes.items() if k.startswith("vit_model.")) * itemsize
    else:
        vit_bytes = sum(int(np.prod(v[0])) for v in _header_shapes([plan.vit_file]).values()) * itemsize
    vae_src = Path(plan.files.vae_weights)
    vae_bytes = vae_src.stat().st_size * (plan.vae_dtype.size / 4 if vae_src.suffix != ".safetensors" else 1)
    llm_bytes = sum(t.nbytes for shard in plan.shards for t in shard)
    return int((llm_bytes + vit_bytes + vae_bytes) * 1.02) + 2**20


def plan_conversion(source, dest, options: ConversionOptions = ConversionOptions(),
                    log: Callable[[str], Any] = _stderr) -> ConversionPlan:
    """Check the options and the destination, resolve the source (downloading only what a conversion needs),
    plan the LLM tensors and shards, and check the free disk space. Nothing is written."""
    dt, vae_dt, quant = check_options(options)
    dest = check_destination(dest, options.force)

    files = resolve(source, conversion_task(options.video))
    if files.layout == "mlx" and read_config_json(files.config).get("quantization"):
        raise WeightsError(f"{files.root} is already quantized; convert from the upstream checkpoint instead")
    if quant:
        warning = quantization_warning(quant["experts"])
        if warning:
            log(f"warning: {warning}")

    # Configuration: the LLM's (and ViT's) from the source, the VAE's from its own tensors (when writing it).
    config = read_lance_config(files)
    shapes = _header_shapes(files.llm_weights)
    vit_from, vit_file = _vit_source(files, list(shapes))
    if vit_from == "file" and vit_file is None:
        raise WeightsError(f"{files.root}: no ViT weights found for the conversion")
    shards = _shards(_plan_llm(shapes, files.key_style, dt.size, quant), int(options.shard_bytes))
    plan = ConversionPlan(source=source, dest=dest, options=options, dtype=dt, vae_dtype=vae_dt, quant=quant,
                          files=files, config=config, vit_from=vit_from, vit_file=vit_file, shards=shards)
    plan.needed_bytes = _needed_bytes(plan, shapes)
    _check_disk(dest, plan.needed_bytes)
    return plan


# --------------------------------------------------------------------------------------------------------------
# Writing


def _write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str]) -> None:
    try:
        mx.save_safetensors(str(path), tensors, metadata=metadata)
    except RuntimeError as e:
        # MLX reports a failed write only as "[write] Unable to write N bytes to file.", without the system's
        # reason: a disk without room for these tensors is a full disk, anything else an I/O error.
        if "Unable to write" not in str(e):
            raise
        full = shutil.disk_usage(path.parent).free < sum(t.nbytes for t in tensors.values()) + 2**20
        raise OSError(errno.ENOSPC if full else errno.EIO, str(e).strip(), str(path)) from None


_META = {"format": "mlx"}


def write_vae(plan: ConversionPlan, out: Path) -> VAEConfig:
    """vae.safetensors in MLX layout and the VAE dtype; returns the configuration its tensors imply.

    Written first: it is the only file read whole (the .pth goes through the safe reader), so a bad or unsafe
    file fails before the long LLM writing, and it is freed before the LLM shards are built."""
    from .vae_wan22 import infer_vae_config, load_vae_checkpoint, sanitize_vae_weights

    raw = normalize_vae_keys(load_vae_checkpoint(Path(plan.files.vae_weights)))
    vcfg = infer_vae_config(raw)
    vae_w = sanitize_vae_weights(raw)
    del raw
    tensors = {}
    for k in sorted(vae_w):
        tensors[k] = mx.array(vae_w.pop(k)).astype(plan.vae_dtype)
        mx.eval(tensors[k])
    _write_safetensors(out / "vae.safetensors", tensors, {"format": "mlx", "model": "wan2.2-vae"})
    return VAEConfig(z_dim=vcfg["z_dim"], c_dim=vcfg["dim"], dec_dim=vcfg["dec_dim"],
                     dim_mult=tuple(vcfg["dim_mult"]), num_res_blocks=vcfg["num_res_blocks"],
                     temperal_downsample=tuple(vcfg["temperal_downsample"]))


def write_llm_shards(plan: ConversionPlan, out: Path, tick: Callable[[int], Any] = lambda n: None) -> None:
    """model-0000i-of-0000N.safetensors, one tensor at a time, and model.safetensors.index.json; `tick(1)` after
    each planned tensor."""
    dt, quant, n = plan.dtype, plan.quant, len(plan.shards)
    src = {}
    for p in plan.files.llm_weights:
        src.update(mx.load(str(p)))
    weight_map = {}
    total = 0
    deltas = lora_weight_deltas(plan.options.fuse_lora) if plan.options.fuse_lora else {}
    for i, shard in enumerate(plan.shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for t in shard:
            # pop: an evaluated source array would otherwise keep its (float32) data alive
            if t.out_key.endswith(".weight") and t.out_key[: -len(".weight")] in deltas:
                w = src.pop(t.src_key)
                src[t.src_key] = (w.astype(mx.float32) + deltas.pop(t.out_key[: -len(".weight")])).astype(w.dtype)
            if t.kind == "cast":
                tensors[t.out_key] = src.pop(t.src_key).astype(dt)
                mx.eval(tensors[t.out_key])
            elif t.kind == "qweight":
                path = t.out_key[: -len(".weight")]
                qs = mx.quantize(src.pop(t.src_key).astype(dt), quant["group_size"], quant["bits"])
                mx.eval(*qs)
                tensors[t.out_key], tensors[path + ".scales"], tensors[path + ".biases"] = qs
            tick(1)
        _write_safetensors(out / name, tensors, _META)
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.nbytes
        del tensors
    del src
    if deltas:
        raise WeightsError(f"the LoRA adapter targets {sorted(deltas)[0]}, which this checkpoint does not have")
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def write_vit(plan: ConversionPlan, out: Path) -> None:
    """vit.safetensors: the video checkpoint's bundled tensors, else the standalone file; MLX layout, model dtype,
    never quantized."""
    from .vit import sanitize_vit_weights

    if plan.vit_from == "bundled":
        vit_w = {k: v for p in plan.files.llm_weights for k, v in mx.load(str(p)).items()
                 if k.startswith("vit_model.")}
    else:
        vit_w = mx.load(str(plan.vit_file))
    vit_w = {k: v.astype(plan.dtype) for k, v in sanitize_vit_weights(vit_w, plan.config.vit).items()}
    _write_safetensors(out / "vit.safetensors", vit_w, _META)


def write_tokenizer_and_config(plan: ConversionPlan, out: Path) -> None:
    """The tokenizer files and config.json (mlx_layout, quantization, conversion record). Written last: a folder
    with config.json is complete. `plan.config.vae` must already hold the VAE's configuration (`write_vae`)."""
    tok_dir = plan.files.tokenizer_dir
    for name in TOKENIZER_FILES + TOKENIZER_EXTRAS:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, out / name)
    config = plan.config
    config.mlx_layout = True
    config.quantization = plan.quant
    data = config.to_dict()
    data["conversion"] = {"source": str(plan.source), "source_layout": plan.files.layout,
                          "checkpoint": VIDEO_LLM_DIR if plan.options.video else IMAGE_LLM_DIR,
                          "dtype": dtype_name(plan.dtype), "vae_dtype": dtype_name(plan.vae_dtype),
                          "vit": "bundled vit_model.* tensors" if plan.vit_from == "bundled" else "vit.safetensors"}
    (out / "config.json").write_text(json.dumps(data, indent=2))


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `dest` (`.<name>.XXXX.partial`), removed if the block fails."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install(tmp: Path, dest: Path, force: bool) -> None:
    """Rename the finished folder `tmp` to `dest` without replacing anything convert.py did not write
    (`publish.publish`): with `force`, an earlier conversion output is swapped out, checked again at the moment of
    the swap. When `dest` was taken meanwhile, the folder goes to a free name beside it: OutputTakenError."""
    umask = os.umask(0)  # mkdtemp makes a private folder; give it the permissions a plain mkdir would
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    saved = publish(tmp, dest, (lambda path, like: _not_conversion_output(path) is None) if force else None)
    if saved is not None:
        raise OutputTakenError(f"{dest} was created or changed by something else while converting and is left alone; "
                               f"the converted model was saved as {saved} instead", saved=saved)


def _disk_full(plan: ConversionPlan) -> WriteError:
    return WriteError(f"no space left on {plan.dest.parent} while converting to {plan.dest.name}: the converted model "
                      f"needs about {plan.needed_bytes / 1e9:.2f} GB; nothing was saved (the partial folder was "
                      "removed): free some space or choose another destination")


def convert(source, dest, options: ConversionOptions = ConversionOptions(), progress: bool = True,
            log: Callable[[str], Any] = _stderr) -> Path:
    """Convert a Lance checkpoint (upstream hub layout, local folder or repo id; or another MLX port's folder)
    to one MLX folder: config.json (mlx_layout), model-*.safetensors + index, vit.safetensors, vae.safetensors,
    tokenizer files. Tensors are streamed one at a time (peak memory ~ one shard, or the VAE); everything is
    written to a temporary folder beside `dest` and renamed at the end; on failure `dest` is left untouched."""
    from tqdm import tqdm

    plan = plan_conversion(source, dest, options, log)
    bar = tqdm(total=plan.num_tensors + 2, desc="converting", unit="tensor", disable=not progress, file=sys.stderr)
    try:
        with _staging(plan.dest) as tmp:
            plan.config.vae = write_vae(plan, tmp)
            bar.update(1)
            write_llm_shards(plan, tmp, bar.update)
            write_vit(plan, tmp)
            bar.update(1)
            write_tokenizer_and_config(plan, tmp)
            install(tmp, plan.dest, options.force)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(plan) from None
        raise
    finally:
        bar.close()
    return plan.dest

"""LoRA adapters on the language model's linear layers: the wrapper layer, PEFT-format files, scales and fusing.

A `LoRALinear` wraps a frozen base layer (nn.Linear or nn.QuantizedLinear, its weights shared, never copied) and adds
one low-rank update per loaded adapter: y = base(x) + sum_i scale_i * (alpha_i / r_i) * (x A_i^T) B_i^T, A (r, in),
B (out, r) in float32 as PEFT stores them (`lora_A.weight`, `lora_B.weight`). The file format is PEFT's:
`adapter_model.safetensors` with keys `base_model.model.<module path>.lora_{A,B}.weight` and `adapter_config.json`
(`peft_type`, `r`, `lora_alpha`, `lora_dropout`, `target_modules`, ...) plus our own `lance_mlx` metadata block.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import InvalidRequestError, WeightsError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# The generation expert's attention and MLP projections (llm.py names: `self_attn.q_proj_moe_gen`,
# `mlp_moe_gen.gate_proj`, ...), the default training targets.
GEN_EXPERT_TARGETS = ("*.self_attn.[qkvo]_proj_moe_gen", "*.mlp_moe_gen.*_proj")


class LoRAAdapter(nn.Module):
    """One adapter's factors on one layer: A (r, in) and B (out, r), float32; B starts at zero (PEFT's init)."""

    def __init__(self, in_dims: int, out_dims: int, r: int, alpha: float, dropout: float = 0.0,
                 key: Optional[mx.array] = None):
        super().__init__()
        # PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (r, in_dims), key=key)
        self.lora_b = mx.zeros((out_dims, r))
        self.scale = mx.array(1.0)  # the user's scale; an array, so compiled forwards see changes
        self.r, self.alpha = int(r), float(alpha)
        self.tag = 0  # which loaded adapter this is (load order), for set_adapter_scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def delta(self, x: mx.array) -> mx.array:
        """(..., in) -> (..., out) float32 update scale * alpha / r * B A x."""
        x = x.astype(mx.float32)
        if self.dropout is not None:
            x = self.dropout(x)
        return ((x @ self.lora_a.T) @ self.lora_b.T) * (self.scale * (self.alpha / self.r))


class LoRALinear(nn.Module):
    """A frozen base linear layer plus the adapters loaded on it (none: exactly the base layer)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters: List[LoRAAdapter] = []

    @property
    def dims(self) -> Tuple[int, int]:
        """(in, out) of the base layer (a quantized one packs its input dimension)."""
        w = self.base.weight
        out_dims, in_dims = w.shape
        if isinstance(self.base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // self.base.bits
        return in_dims, out_dims

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for a in self.adapters:
            y = y + a.delta(x).astype(y.dtype)
        return y


@dataclass
class AdapterInfo:
    """What an adapter file says about itself (`adapter_config.json`)."""

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """Module path -> LoRALinear of every wrapped layer."""
    return {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}


def match_targets(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Paths of the linear layers (plain, quantized or already wrapped) whose path matches a glob pattern."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear, LoRALinear)) and ".base" not in f".{path}." \
                and any(fnmatch.fnmatchcase(path, p) for p in patterns):
            out.append(path)
    return sorted(out)


def wrap(model: nn.Module, paths: Sequence[str]) -> Dict[str, LoRALinear]:
    """Wrap the layers at `paths` in LoRALinear (already wrapped ones are kept); returns path -> wrapper."""
    modules = dict(model.named_modules())
    updates = []
    for path in paths:
        if path not in modules:
            raise WeightsError(f"the adapter targets {path!r}, which this model does not have; it was trained for "
                               f"another model")
        m = modules[path]
        if not isinstance(m, LoRALinear):
            if not isinstance(m, (nn.Linear, nn.QuantizedLinear)):
                raise WeightsError(f"the adapter targets {path!r}, which is not a linear layer")
            updates.append((path, LoRALinear(m)))
    if updates:
        model.update_modules(_tree(updates))
    layers = lora_layers(model)
    return {p: layers[p] for p in paths}


def _tree(flat: Sequence[Tuple[str, Any]]) -> Dict[str, Any]:
    """Flat dotted paths -> the nested dict/list structure `update_modules` takes."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat))


def add_adapter(model: nn.Module, paths: Sequence[str], r: int, alpha: float, dropout: float = 0.0,
                seed: int = 0) -> List[LoRAAdapter]:
    """A new trainable adapter (random A, zero B; its scale frozen) on the layers at `paths`; returns its per-layer
    factors in path order."""
    layers = sorted(wrap(model, paths).items())
    keys = mx.random.split(mx.random.key(int(seed)), max(len(layers), 1))
    out = []
    for i, (path, layer) in enumerate(layers):
        in_dims, out_dims = layer.dims
        a = LoRAAdapter(in_dims, out_dims, r, alpha, dropout, key=keys[i])
        a.freeze(keys=["scale"], recurse=False)  # the factors train, the user's scale does not
        layer.adapters.append(a)
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------------------ files
def resolve_adapter(path) -> Tuple[Path, Path]:
    """(weights file, config file) of an adapter folder or its .safetensors file."""
    p = Path(path).expanduser()
    weights = p / ADAPTER_WEIGHTS if p.is_dir() else p
    config = weights.parent / ADAPTER_CONFIG
    if not weights.is_file():
        raise WeightsError(f"no LoRA adapter at {p} (expected a folder with {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}, "
                           f"or the .safetensors file itself)")
    if not config.is_file():
        raise WeightsError(f"{weights} has no {ADAPTER_CONFIG} beside it; an adapter needs both files")
    return weights, config


def read_adapter_config(path) -> AdapterInfo:
    _, config = resolve_adapter(path)
    try:
        c = json.loads(config.read_text())
        if str(c.get("peft_type", "LORA")).upper() != "LORA":
            raise WeightsError(f"{config}: peft_type {c.get('peft_type')!r} is not LORA")
        targets = c.get("target_modules") or []
        return AdapterInfo(r=int(c["r"]), alpha=float(c.get("lora_alpha", c["r"])),
                           dropout=float(c.get("lora_dropout", 0.0)),
                           target_modules=[targets] if isinstance(targets, str) else list(targets),
                           metadata=dict(c.get("lance_mlx", {})))
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{config} is not a valid LoRA adapter config ({e})") from None


def parse_lora_arg(text: str) -> Tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); the scale defaults to 1."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not math.isfinite(scale):
        raise InvalidRequestError(f"--lora {text}: the scale must be a finite number", param="lora")
    return path, scale


def check_lora_args(specs: Sequence[str]) -> List[Tuple[str, float]]:
    """Parse and check every `--lora` before any weights load (files exist, config readable)."""
    out = []
    for s in specs or ():
        path, scale = parse_lora_arg(s)
        read_adapter_config(path)
        out.append((path, scale))
    return out


def load_adapter(model: nn.Module, path, scale: float = 1.0) -> Dict[str, LoRAAdapter]:
    """Attach the adapter at `path` (PEFT format) to `model` without touching its weights; returns path -> factors."""
    weights_file, _ = resolve_adapter(path)
    info = read_adapter_config(path)
    pairs = _read_pairs(path)
    layers = wrap(model, sorted(pairs))
    tag = 1 + max((a.tag for layer in lora_layers(model).values() for a in layer.adapters), default=-1)
    out = {}
    for p, ab in sorted(pairs.items()):
        in_dims, out_dims = layers[p].dims
        a, b = ab["a"].astype(mx.float32), ab["b"].astype(mx.float32)
        if a.shape != (info.r, in_dims) or b.shape != (out_dims, info.r):
            raise WeightsError(f"{weights_file}: {p} has A {tuple(a.shape)} / B {tuple(b.shape)}, expected "
                               f"({info.r}, {in_dims}) / ({out_dims}, {info.r}); the adapter is for another model")
        ad = LoRAAdapter(in_dims, out_dims, info.r, info.alpha)
        ad.lora_a, ad.lora_b, ad.scale = a, b, mx.array(float(scale))
        ad.tag = tag
        ad.freeze()
        layers[p].adapters.append(ad)
        out[p] = ad
    mx.eval([(a.lora_a, a.lora_b) for a in out.values()])
    return out


def set_scale(adapters: Dict[str, LoRAAdapter], scale: float) -> None:
    for a in adapters.values():
        a.scale = mx.array(float(scale))


def set_adapter_scale(model: nn.Module, index: int, scale: float) -> None:
    """Set the scale of the `index`-th adapter loaded on `model` (load order)."""
    found = [a for layer in lora_layers(model).values() for a in layer.adapters if a.tag == index]
    if not found:
        raise InvalidRequestError(f"no LoRA adapter number {index} is loaded", param="lora")
    for a in found:
        a.scale = mx.array(float(scale))


def apply_all(model: nn.Module, specs: Sequence[Tuple[str, float]]) -> nn.Module:
    """Load every (path, scale) adapter onto `model`, in order; returns the model."""
    for path, scale in specs:
        load_adapter(model, path, scale)
    return model


def adapter_tensors(adapters: Dict[str, LoRAAdapter]) -> Dict[str, mx.array]:
    """PEFT tensor names -> float32 factors."""
    out = {}
    for p, a in sorted(adapters.items()):
        out[f"{PEFT_PREFIX}{p}.lora_A.weight"] = a.lora_a.astype(mx.float32)
        out[f"{PEFT_PREFIX}{p}.lora_B.weight"] = a.lora_b.astype(mx.float32)
    return out


def save_adapter(adapters: Dict[str, LoRAAdapter], folder, info: AdapterInfo) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` into `folder` atomically (temp name, rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": None, "r": info.r, "lora_alpha": info.alpha,
        "lora_dropout": info.dropout, "target_modules": sorted(adapters), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "modules_to_save": None, "base_model_name_or_path": info.metadata.get("base_checkpoint"),
        "lance_mlx": info.metadata,
    }
    tensors = adapter_tensors(adapters)
    mx.eval(list(tensors.values()))
    tmp_w = folder / f".{ADAPTER_WEIGHTS}.{os.getpid()}.tmp.safetensors"
    tmp_c = folder / f".{ADAPTER_CONFIG}.{os.getpid()}.tmp"
    try:
        mx.save_safetensors(str(tmp_w), tensors, metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp_w, folder / ADAPTER_WEIGHTS)
        os.replace(tmp_c, folder / ADAPTER_CONFIG)
    finally:
        for t in (tmp_w, tmp_c):
            t.unlink(missing_ok=True)
    return folder


# ------------------------------------------------------------------------------------------------------ fusing
def fuse(model: nn.Module, dequantize: bool = False) -> int:
    """Fold every loaded adapter into its base weight (W += scale * alpha / r * B A) and unwrap; returns the
    number of layers fused. A quantized base is dequantized first when `dequantize`, else refused."""
    fused = []
    layers = lora_layers(model)
    quantized = [p for p, layer in layers.items() if isinstance(layer.base, nn.QuantizedLinear)]
    if quantized and not dequantize:  # refuse before changing anything
        raise WeightsError(f"{quantized[0]} is quantized; fuse adapters into float weights (before quantizing)")
    for path, layer in layers.items():
        base = layer.base
        if isinstance(base, nn.QuantizedLinear):
            w = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in base)
            if "bias" in base:
                lin.bias = base.bias
            base = lin
        else:
            w = base.weight
        dw = mx.zeros(w.shape, dtype=mx.float32)
        for a in layer.adapters:
            dw = dw + (a.lora_b @ a.lora_a) * (a.scale * (a.alpha / a.r))
        base.weight = (w.astype(mx.float32) + dw).astype(w.dtype)
        fused.append((path, base))
    if fused:
        model.update_modules(_tree(fused))
    return len(fused)


def weight_deltas(specs: Sequence[Tuple[str, float]]) -> Dict[str, mx.array]:
    """Module path -> float32 weight update sum(scale * alpha / r * B A) of the (path, scale) adapters, for fusing
    into a checkpoint as it is written (convert.py --fuse-lora)."""
    out: Dict[str, mx.array] = {}
    for path, scale in specs:
        info = read_adapter_config(path)
        for p, a in _read_pairs(path).items():
            d = (a["b"].astype(mx.float32) @ a["a"].astype(mx.float32)) * (float(scale) * info.alpha / info.r)
            out[p] = out[p] + d if p in out else d
    return out


def _read_pairs(path) -> Dict[str, Dict[str, mx.array]]:
    weights_file, _ = resolve_adapter(path)
    pairs: Dict[str, Dict[str, mx.array]] = {}
    for k, v in mx.load(str(weights_file)).items():
        name = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
        for part, tag in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if name.endswith(part):
                pairs.setdefault(name[: -len(part)], {})[tag] = v
                break
        else:
            raise WeightsError(f"{weights_file}: unexpected tensor {k!r} (expected *.lora_A.weight / *.lora_B.weight)")
    incomplete = [p for p, ab in pairs.items() if len(ab) != 2]
    if incomplete or not pairs:
        raise WeightsError(f"{weights_file}: no complete lora_A/lora_B pairs ({', '.join(incomplete[:3])})")
    return pairs

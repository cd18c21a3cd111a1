"""Qwen2.5-VL vision tower used by Lance for understanding inputs (window attention ViT + 2x2 patch merger)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import ViTConfig
from .errors import WeightsError, WeightsNotFoundError

Grid = Tuple[int, int, int]

# Where the same 390 tensors live in other checkpoints: Lance_3B_Video/model.safetensors bundles them as
# `vit_model.*` (modeling/lance/lance.py: `self.vit_model`; docs/upstream-notes.md); Hugging Face Qwen2.5-VL
# models store `visual.*` (transformers 5: `model.visual.*`).
_KEY_PREFIXES = ("model.visual.", "visual.", "vit_model.")
# Non-persistent buffers that some exports still carry; the table is rebuilt at run time.
_DROP_SUFFIXES = ("rotary_pos_emb.inv_freq",)

# Largest attention-score tensor (elements) one SDPA call may materialize. MLX's CPU path builds the full
# (batch, heads, L, L) scores; a 6 s video at video_480p has 35 frames of ~1.8k tokens in its full-attention
# blocks (~8 GB of fp32 scores at once), so the segments are processed in chunks under this budget.
_SCORE_BUDGET = 1 << 27

_ACTIVATIONS = {
    "silu": nn.silu,  # Qwen2.5-VL (vit_config hidden_act)
    "gelu": nn.gelu,
    "gelu_pytorch_tanh": nn.gelu_approx,
    "quick_gelu": nn.gelu_fast_approx,
}


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalize in float32, round to the input dtype, then scale (upstream order of roundings)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.weight * mx.fast.rms_norm(x.astype(mx.float32), None, self.eps).astype(x.dtype)


class PatchEmbed(nn.Module):
    """Conv3d with stride == kernel over one (C, tp, p, p) patch per row, i.e. a matmul; weight in MLX layout."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        w = self.proj.weight  # (O, tp, p, p, C)
        # Rows are flattened (C, tp, p, p) as in the processor, so bring the weight to that order instead.
        w = w.transpose(0, 4, 1, 2, 3).reshape(w.shape[0], -1)  # (O, C*tp*p*p)
        return x.astype(w.dtype) @ w.T


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: "_Segments") -> mx.array:
        S = x.shape[0]
        qkv = self.qkv(x).reshape(S, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (S, H, D)
        q = _apply_rotary(q, cos, sin)
        k = _apply_rotary(k, cos, sin)
        return self.proj(segments.attend(q, k, v, self.scale))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: str):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported ViT hidden_act {act!r}; expected one of {sorted(_ACTIVATIONS)}")
        self.act = _ACTIVATIONS[act]
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=True)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=True)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, segments: "_Segments") -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, concatenate each 2x2 merge unit (4 consecutive tokens), Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.in_dims = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A list so the keys are merger.mlp.0 / merger.mlp.2 like torch's nn.Sequential (index 1 is the GELU).
        self.mlp = [
            nn.Linear(self.in_dims, self.in_dims),
            nn.GELU(),  # exact (erf) GELU, as torch.nn.GELU() upstream
            nn.Linear(self.in_dims, cfg.out_hidden_size),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.ln_q(x).reshape(-1, self.in_dims)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """The Qwen2.5-VL ViT. Parameter names equal the bare keys of Lance's `Qwen2.5-VL-ViT/vit.safetensors`."""

    # Rotary table precision: None follows the weights (bf16 weights -> upstream's bf16 table, else float32);
    # True/False forces it, e.g. True to reproduce upstream's bf16 run while keeping float32 weights.
    rotary_bf16: Optional[bool] = None

    def __init__(self, config: ViTConfig):
        super().__init__()
        if config.hidden_size % config.num_heads or (config.hidden_size // config.num_heads) % 4:
            raise ValueError("ViT head_dim must be a multiple of 4 (2-D rotary over h and w halves)")
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config)
        self._full_blocks = frozenset(config.fullatt_block_indexes)

    @property
    def patch_dim(self) -> int:
        c = self.config
        return c.in_channels * c.temporal_patch_size * c.patch_size**2

    def __call__(self, pixel_patches: Union[mx.array, np.ndarray], grid_thw) -> mx.array:
        """Encode patch rows (N, C*tp*p*p) of one or more visuals; returns merged tokens (N/4, out_hidden_size)
        in raster order (t, h/2, w/2), visuals concatenated in `grid_thw` order."""
        c = self.config
        grids = _as_grids(grid_thw)
        x = pixel_patches if isinstance(pixel_patches, mx.array) else mx.array(np.asarray(pixel_patches))
        n_rows = sum(t * h * w for t, h, w in grids)
        if x.ndim != 2 or x.shape != (n_rows, self.patch_dim):
            raise ValueError(
                f"pixel_patches has shape {tuple(x.shape)}; grid_thw {list(grids)} needs ({n_rows}, {self.patch_dim})"
            )
        for t, h, w in grids:
            if t < 1 or h % c.spatial_merge_size or w % c.spatial_merge_size:
                raise ValueError(f"grid {(t, h, w)}: t must be >= 1 and h, w multiples of {c.spatial_merge_size}")
        window_units = c.window_size // c.spatial_merge_size // c.patch_size
        plan = _plan(grids, c.spatial_merge_size, window_units)

        x = self.patch_embed(x)[plan.perm]  # (S, hidden) in window order
        bf16 = x.dtype == mx.bfloat16 if self.rotary_bf16 is None else self.rotary_bf16
        cos, sin = self._rotary_tables(plan.pos, bf16)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, plan.full if i in self._full_blocks else plan.window)
        return self.merger(x)[plan.unperm]

    def _rotary_tables(self, pos: np.ndarray, bf16: bool) -> Tuple[mx.array, mx.array]:
        """cos/sin (S, 1, head_dim) in float32: angles [h*f, w*f] duplicated for rotate-half, f = theta^(-2k/rot)."""
        rot_dim = self.config.hidden_size // self.config.num_heads // 2
        # Computed in float32 like the torch buffer (theta 10000 is hard-coded in upstream's rotary module).
        inv_freq = mx.array(1.0 / (np.float32(10000.0) ** (np.arange(0, rot_dim, 2, dtype=np.float32) / rot_dim)))
        p = mx.array(pos)  # (S, 2) int32
        if bf16:
            # Upstream runs the ViT after `.to(bfloat16)`: the inv_freq buffer, the position arange, their
            # products and cos/sin all land in bf16 before being upcast for the rotation
            # (modeling/vit/qwen2_5_vl_vit.py).
            ang = p.astype(mx.bfloat16)[..., None] * inv_freq.astype(mx.bfloat16)
            ang = ang.reshape(p.shape[0], -1)
            cos, sin = mx.cos(ang).astype(mx.float32), mx.sin(ang).astype(mx.float32)
        else:
            ang = (p.astype(mx.float32)[..., None] * inv_freq).reshape(p.shape[0], -1)
            cos, sin = mx.cos(ang), mx.sin(ang)
        cos = mx.concatenate([cos, cos], axis=-1)[:, None, :]
        sin = mx.concatenate([sin, sin], axis=-1)[:, None, :]
        return cos, sin

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        return sanitize_vit_weights(weights, self.config)


def _apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE in float32 (upstream upcasts q, k), cast back to the input dtype."""
    xf = x.astype(mx.float32)
    half = xf.shape[-1] // 2
    rotated = mx.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


class _Segments:
    """Contiguous segments of the sequence that attend only within themselves (windows or whole frames).

    Segments of equal length are batched into one SDPA call (no mask, no padding): a plain reshape when all
    segments share one length, otherwise a gather per length group and one scatter back.
    """

    def __init__(self, lengths: Sequence[int]):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        by_len: Dict[int, List[int]] = {}
        for s, n in zip(starts.tolist(), lengths):
            by_len.setdefault(int(n), []).append(s)
        self.total = int(sum(lengths))
        self.groups: List[Tuple[int, int, Optional[mx.array]]] = []  # (length, count, token index or None)
        if len(by_len) == 1:
            (n, ss), = by_len.items()
            self.groups.append((n, len(ss), None))
            self.inverse = None
            return
        order = []
        for n, ss in sorted(by_len.items(), reverse=True):
            idx = (np.asarray(ss)[:, None] + np.arange(n)[None, :]).reshape(-1)
            order.append(idx)
            self.groups.append((n, len(ss), mx.array(idx.astype(np.int32))))
        self.inverse = mx.array(np.argsort(np.concatenate(order)).astype(np.int32))

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        """q, k, v (S, H, D) -> attention output (S, H*D)."""
        S, H, D = q.shape
        outs = []
        for n, count, idx in self.groups:
            qg, kg, vg = (a if idx is None else a[idx] for a in (q, k, v))
            qg, kg, vg = (a.reshape(count, n, H, D).transpose(0, 2, 1, 3) for a in (qg, kg, vg))
            step = max(1, _SCORE_BUDGET // (H * n * n))
            parts = [
                mx.fast.scaled_dot_product_attention(qg[i:i + step], kg[i:i + step], vg[i:i + step], scale=scale)
                for i in range(0, count, step)
            ]
            o = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)  # (count, H, n, D)
            outs.append(o.transpose(0, 2, 1, 3).reshape(count * n, H * D))
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return out if self.inverse is None else out[self.inverse]


@dataclass(frozen=True)
class _Plan:
    perm: mx.array  # (S,) patch rows in window order (merge units stay contiguous)
    unperm: mx.array  # (S/unit,) merged tokens back to raster order
    pos: np.ndarray  # (S, 2) (h, w) patch coordinates in window order
    window: _Segments  # window-attention segments
    full: _Segments  # full-attention segments: one per temporal slice


@lru_cache(maxsize=64)
def _plan(grids: Tuple[Grid, ...], merge: int, window_units: int) -> _Plan:
    """Host-side index bookkeeping for one set of grids (cached: it depends only on the shapes)."""
    unit = merge * merge
    window_index, window_lens, frame_lens, positions = [], [], [], []
    offset = 0
    for t, h, w in grids:
        mh, mw = h // merge, w // merge
        # Patch (h, w) coordinates in processor row order (t, mh, mw, merge, merge).
        hh = np.arange(mh)[:, None, None, None] * merge + np.arange(merge)[None, None, :, None]
        ww = np.arange(mw)[None, :, None, None] * merge + np.arange(merge)[None, None, None, :]
        hh, ww = np.broadcast_arrays(hh, ww)
        positions.append(np.tile(np.stack([hh.reshape(-1), ww.reshape(-1)], axis=-1), (t, 1)))
        # Windows of window_units x window_units merge units, row-major per frame; edge windows hold fewer
        # units (upstream pads with -100 and drops the empty windows).
        nh, nw = -(-mh // window_units), -(-mw // window_units)
        padded = np.full((t, nh * window_units, nw * window_units), -1, dtype=np.int64)
        padded[:, :mh, :mw] = np.arange(t * mh * mw).reshape(t, mh, mw) + offset
        wins = padded.reshape(t, nh, window_units, nw, window_units).transpose(0, 1, 3, 2, 4)
        wins = wins.reshape(t * nh * nw, window_units * window_units)
        lens = (wins >= 0).sum(axis=1)
        window_index.append(wins[wins >= 0])
        window_lens.extend((lens[lens > 0] * unit).tolist())
        frame_lens.extend([h * w] * t)
        offset += t * mh * mw
    window_index = np.concatenate(window_index)
    perm = (window_index[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    pos = np.concatenate(positions)[perm].astype(np.int32)
    return _Plan(
        perm=mx.array(perm.astype(np.int32)),
        unperm=mx.array(np.argsort(window_index).astype(np.int32)),
        pos=pos,
        window=_Segments(window_lens),
        full=_Segments(frame_lens),
    )


def _as_grids(grid_thw) -> Tuple[Grid, ...]:
    """Accepts (t, h, w), a list of them, or an (n, 3) numpy / MLX array."""
    if isinstance(grid_thw, mx.array):
        grid_thw = np.array(grid_thw)
    arr = np.asarray(grid_thw, dtype=np.int64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] == 0:
        raise ValueError(f"grid_thw must be (t, h, w) or a list of them, got shape {arr.shape}")
    return tuple((int(t), int(h), int(w)) for t, h, w in arr)


def merged_token_count(grid_thw, spatial_merge_size: int = 2) -> int:
    """Number of ViT output tokens (LLM placeholders) for the given grids."""
    return sum(t * (h // spatial_merge_size) * (w // spatial_merge_size) for t, h, w in _as_grids(grid_thw))


def sanitize_vit_weights(weights: Dict[str, mx.array], config: Optional[ViTConfig] = None) -> Dict[str, mx.array]:
    """Map any known ViT key layout to ours; idempotent.

    - Strips a `visual.` / `model.visual.` / `vit_model.` prefix. When such prefixed keys are present, every
      other key (e.g. the LLM tensors of a Lance_3B_Video checkpoint) is dropped.
    - Drops the non-persistent rotary `inv_freq` buffer if an export kept it.
    - Transposes `patch_embed.proj.weight` from PyTorch Conv3d (O, C, tp, p, p) to MLX (O, tp, p, p, C), deciding by
      the expected shape (from `config`, else from the patch being square), so already-converted weights are kept.
    """
    prefixed = {}
    for k, v in weights.items():
        for p in _KEY_PREFIXES:
            if k.startswith(p):
                prefixed[k[len(p):]] = v
                break
    out = dict(prefixed) if prefixed else dict(weights)
    for k in [k for k in out if k.endswith(_DROP_SUFFIXES)]:
        del out[k]

    key = "patch_embed.proj.weight"
    if key in out:
        w = out[key]
        shape = tuple(w.shape)
        if len(shape) != 5:
            raise WeightsError(f"{key} must be 5-D, got shape {shape}")
        if config is not None:
            c = config
            mlx_shape = (c.hidden_size, c.temporal_patch_size, c.patch_size, c.patch_size, c.in_channels)
            torch_shape = (c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
            if shape == torch_shape and shape != mlx_shape:
                out[key] = w.transpose(0, 2, 3, 4, 1)
            elif shape != mlx_shape:
                raise WeightsError(f"{key} has shape {shape}; expected {mlx_shape} (MLX) or {torch_shape} (PyTorch)")
        elif shape[3] == shape[4] and shape[2] != shape[3]:  # (O, C, tp, p, p): square patch in the last two axes
            out[key] = w.transpose(0, 2, 3, 4, 1)
    return out


def load_vit(path: Union[str, Path], config: Optional[ViTConfig] = None, dtype=mx.float32) -> VisionTransformer:
    """Load a ViT from a `Qwen2.5-VL-ViT/` folder (config.json + vit.safetensors) or a single .safetensors file
    (bare, `visual.*` or `vit_model.*` keys; `config` defaults to the folder's config.json, else `ViTConfig()`)."""
    path = Path(path)
    if path.is_dir():
        cfg_file, weights_file = path / "config.json", path / "vit.safetensors"
    else:
        cfg_file, weights_file = path.parent / "config.json", path
    if not weights_file.is_file():
        raise WeightsNotFoundError(f"ViT weights not found: {weights_file}")
    if config is None:
        config = ViTConfig.from_dict(json.loads(cfg_file.read_text())) if path.is_dir() and cfg_file.is_file() \
            else ViTConfig()
    model = VisionTransformer(config)
    weights = sanitize_vit_weights(mx.load(str(weights_file)), config)
    model.load_weights(list(weights.items()), strict=True)
    if dtype is not None:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


__all__ = [
    "VisionTransformer",
    "sanitize_vit_weights",
    "load_vit",
    "merged_token_count",
]

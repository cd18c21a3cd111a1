"""Wan 2.2 VAE (z_dim 48, 16x spatial / 4x temporal) in MLX: channels-last causal 3-D convs, chunked feature cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .torch_checkpoint import CheckpointError, load_torch_checkpoint

__all__ = [
    "LATENTS_MEAN", "LATENTS_STD", "VAEInputError", "WeightsMismatchError", "WanVAE", "Wan2_2_VAE",
    "infer_vae_config", "load_vae_checkpoint", "sanitize_vae_weights",
]

# Per-channel latent statistics of the z_dim=48 VAE, verbatim from Wan2.2 wan/modules/vae2_2.py (Wan2_2_VAE);
# upstream Lance uses the same values.
LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

CACHE_T = 2  # frames a cached causal conv carries into the next chunk (upstream CACHE_T)
PATCH = 2  # 2x2 pixel patchify in front of the encoder / after the decoder
SPATIAL_STRIDE = 16
TEMPORAL_STRIDE = 4

# Upper bound on the unfolded (im2col) input one conv call may build on the CPU: MLX's CPU convolution
# materializes out_pixels x (kernel_volume * C_in) values, several GB at 512x512, so large convs run in row
# strips, each evaluated before the next is built (buffers are allocated when a graph is scheduled, not run).
_UNFOLD_BYTES = 1 << 27


class VAEInputError(ValueError):
    """Video or latent with a shape the VAE cannot process."""


class WeightsMismatchError(CheckpointError):
    """Checkpoint names or shapes that do not match the model."""


def _triple(v) -> Tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def _conv(x: mx.array, w: mx.array, stride: Sequence[int], pad_lo: Sequence[int], pad_hi: Sequence[int]) -> mx.array:
    """`mx.conv_general` (channels-last) with asymmetric padding, in output-row strips when the unfold is large."""
    sp_out = [(n + lo + hi - k) // s + 1
              for n, k, s, lo, hi in zip(x.shape[1:-1], w.shape[1:-1], stride, pad_lo, pad_hi)]
    k_in = w.size // w.shape[0]
    out_h = sp_out[-2]
    row_bytes = x.shape[0] * math.prod(sp_out) // out_h * k_in * x.itemsize
    if row_bytes * out_h <= _UNFOLD_BYTES or mx.default_device() != mx.cpu:
        return mx.conv_general(x, w, stride=list(stride), padding=(list(pad_lo), list(pad_hi)))
    h_axis = x.ndim - 3
    H, kh, sh = x.shape[h_axis], w.shape[-3], stride[-2]
    step = max(1, _UNFOLD_BYTES // row_bytes)
    parts = []
    for r0 in range(0, out_h, step):
        r1 = min(out_h, r0 + step)
        i0 = r0 * sh - pad_lo[-2]  # input rows [i0, i1) feed output rows [r0, r1)
        i1 = (r1 - 1) * sh - pad_lo[-2] + kh
        lo, hi = list(pad_lo), list(pad_hi)
        lo[-2], hi[-2] = max(0, -i0), max(0, i1 - H)
        xs = x[(slice(None),) * h_axis + (slice(max(i0, 0), min(i1, H)),)]
        parts.append(mx.conv_general(xs, w, stride=list(stride), padding=(lo, hi)))
        mx.eval(parts[-1])
    return mx.concatenate(parts, axis=h_axis)


def _pointwise(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """A 1x1(x1) conv is a matmul over the channel axis; weight (O, 1, [1,] 1, I)."""
    w = weight.reshape(weight.shape[0], -1)  # (O, I)
    y = mx.addmm(bias, x.reshape(-1, x.shape[-1]), w.T)
    return y.reshape(*x.shape[:-1], w.shape[0])


class _FeatCache:
    """Frames carried from one temporal chunk to the next, one slot per cached call site in call order
    (upstream's `feat_cache` list with its running `feat_idx`)."""

    REP = "Rep"  # upstream's marker: the temporal upsample saw the first latent frame and skipped its conv

    def __init__(self):
        self.slots = []
        self.idx = 0

    def peek(self):
        if self.idx == len(self.slots):
            self.slots.append(None)
        return self.slots[self.idx]

    def push(self, value):
        self.slots[self.idx] = value
        self.idx += 1

    def arrays(self):
        return [s for s in self.slots if isinstance(s, mx.array)]


class CausalConv3d(nn.Module):
    """Conv3d whose temporal padding (2 * pad_t) all goes before the first frame; cached frames replace it."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=0):
        super().__init__()
        k, s, p = _triple(kernel_size), _triple(stride), _triple(padding)
        bound = 1.0 / math.sqrt(in_dim * math.prod(k))
        self.weight = mx.random.uniform(-bound, bound, (out_dim, *k, in_dim))  # (O, kT, kH, kW, I)
        self.bias = mx.random.uniform(-bound, bound, (out_dim,))
        self.stride = s
        self.front_pad = 2 * p[0]
        self.space_pad = (p[1], p[2])

    def __call__(self, x: mx.array, cache: Optional[mx.array] = None) -> mx.array:
        front = self.front_pad
        if cache is not None and front > 0:
            x = mx.concatenate([cache, x], axis=1)
            front -= cache.shape[1]
        w = self.weight
        kt, st = w.shape[1], self.stride[0]
        if w.shape[1:4] == (1, 1, 1) and self.stride == (1, 1, 1) and front == 0:
            return _pointwise(x, w, self.bias)
        # Leading temporal taps that read only the zero front padding contribute nothing: drop them
        # (a single frame with no cache needs only the last tap, a third of the work).
        t_out = (front + x.shape[1] - kt) // st + 1
        skip = min(kt - 1, max(0, front - (t_out - 1) * st))
        if skip:
            w = w[:, skip:]
            front -= skip
        ph, pw = self.space_pad
        return _conv(x, w, self.stride, (front, ph, pw), (0, ph, pw)) + self.bias


class Conv2d(nn.Module):
    """Per-frame 2-D conv with explicit (low, high) padding; weight (O, kH, kW, I)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int = 1, pad_lo=(0, 0), pad_hi=(0, 0)):
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim * kernel_size * kernel_size)
        self.weight = mx.random.uniform(-bound, bound, (out_dim, kernel_size, kernel_size, in_dim))
        self.bias = mx.random.uniform(-bound, bound, (out_dim,))
        self.stride = (stride, stride)
        self.pad_lo = tuple(pad_lo)
        self.pad_hi = tuple(pad_hi)

    def __call__(self, x: mx.array) -> mx.array:
        if self.weight.shape[1:3] == (1, 1):
            return _pointwise(x, self.weight, self.bias)
        return _conv(x, self.weight, self.stride, self.pad_lo, self.pad_hi) + self.bias


class RMS_norm(nn.Module):
    """Upstream RMS_norm: F.normalize over channels * sqrt(C) * gamma (no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        # x / ||x|| * sqrt(C) == x * rsqrt(mean(x^2)); F.normalize's 1e-12 floor on ||x|| becomes 1e-24/C added
        # to the mean square (the two differ only for vectors with ||x|| near 1e-12).
        return mx.fast.rms_norm(x, self.gamma, 1e-24 / x.shape[-1])


def _evaluated(x: mx.array, cache: _FeatCache) -> mx.array:
    """Evaluate block by block: one lazy graph per chunk lets MLX keep several large buffers alive at once
    (about 1.5x the peak memory at 256x256)."""
    mx.eval(x, cache.arrays())
    return x


def _cached_conv(conv: CausalConv3d, x: mx.array, cache: _FeatCache) -> mx.array:
    """Run `conv` on [cached frames, x] and keep x's last CACHE_T frames (topped up from the old cache)."""
    prev = cache.peek()
    keep = x[:, -CACHE_T:]
    if keep.shape[1] < CACHE_T and prev is not None:
        keep = mx.concatenate([prev[:, -1:], keep], axis=1)
    out = conv(x, prev)
    cache.push(mx.contiguous(keep))  # a copy, so the cache does not pin the whole chunk's activation
    return out


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices follow upstream's nn.Sequential (norm, SiLU, conv, norm, SiLU, dropout, conv) so that
        # checkpoint keys such as `residual.2.weight` load unchanged.
        self.residual = [
            RMS_norm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        ]
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def __call__(self, x: mx.array, cache: _FeatCache) -> mx.array:
        h = x if self.shortcut is None else self.shortcut(x)
        x = _cached_conv(self.residual[2], nn.silu(self.residual[0](x)), cache)
        x = _cached_conv(self.residual[6], nn.silu(self.residual[3](x)), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, H, W, C = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(B * T, 1, H * W, C))  # (BT, 1, HW, 3C): q | k | v
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)  # (BT, 1, HW, C)
        return x + self.proj(o).reshape(B, T, H, W, C)


def _upsample2_conv3x3(x: mx.array, w: mx.array, b: mx.array) -> mx.array:
    """Nearest x2 upsample then a 3x3 conv with padding 1, as four 2x2 convs on the low-resolution input.

    Along each axis, output phase 0 reads low-res offsets (-1, 0) with taps (w0, w1 + w2) and phase 1 reads
    (0, +1) with (w0 + w1, w2): 16 instead of 36 multiply-adds per input pixel and channel pair, equal to the
    upsample-then-conv result up to float rounding of the summed taps.
    """
    N, H, W, _ = x.shape
    O = w.shape[0]

    def taps(k, axis, phase):  # the two effective taps of one axis, stacked on that axis
        k0, k1, k2 = (k[(slice(None),) * axis + (slice(i, i + 1),)] for i in range(3))
        return mx.concatenate([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], axis=axis)

    phases = []
    for a in (0, 1):
        wa = taps(w, 1, a)  # (O, 2, 3, I)
        for c in (0, 1):
            phases.append(_conv(x, taps(wa, 2, c), (1, 1), (1 - a, 1 - c), (a, c)))  # (N, H, W, O)
            if mx.default_device() == mx.cpu:  # one phase's unfold buffer at a time (see _UNFOLD_BYTES)
                mx.eval(phases[-1])
    y = mx.stack(phases).reshape(2, 2, N, H, W, O).transpose(2, 3, 0, 4, 1, 5)  # (N, H, a, W, c, O)
    return y.reshape(N, 2 * H, 2 * W, O) + b


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with the temporal x2 conv (upstream `Resample`)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown Resample mode {mode!r}")
        self.mode = mode
        # Slot 0 of upstream's nn.Sequential is the parameter-free nearest upsample or right/bottom zero pad.
        if mode.startswith("upsample"):
            self.resample = [nn.Identity(), Conv2d(dim, dim, 3, pad_lo=(1, 1), pad_hi=(1, 1))]
        else:
            self.resample = [nn.Identity(), Conv2d(dim, dim, 3, stride=2, pad_hi=(1, 1))]
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x: mx.array, cache: _FeatCache) -> mx.array:
        B, T, H, W, C = x.shape
        if self.mode == "upsample3d":
            prev = cache.peek()
            if prev is None:
                # First latent frame: one output frame, no temporal conv; later chunks never see this frame.
                cache.push(_FeatCache.REP)
            else:
                keep = x[:, -CACHE_T:]
                if keep.shape[1] < CACHE_T:
                    first = mx.zeros_like(keep) if prev is _FeatCache.REP else prev[:, -1:]
                    keep = mx.concatenate([first, keep], axis=1)
                x = self.time_conv(x, None if prev is _FeatCache.REP else prev)  # (B, T, H, W, 2C)
                cache.push(mx.contiguous(keep))
                # Channels [0, C) and [C, 2C) are output frames 2t and 2t+1.
                x = x.reshape(B, T, H, W, 2, C).transpose(0, 1, 4, 2, 3, 5)  # (B, T, 2, H, W, C)
                T *= 2
                x = x.reshape(B, T, H, W, C)
        frames = x.reshape(B * T, H, W, C)
        if self.mode.startswith("upsample"):
            frames = _upsample2_conv3x3(frames, self.resample[1].weight, self.resample[1].bias)
        else:
            frames = self.resample[1](frames)
        x = frames.reshape(B, T, *frames.shape[1:])
        if self.mode == "downsample3d":
            prev = cache.peek()
            keep = mx.contiguous(x[:, -1:])
            if prev is not None:  # frame 0 (first chunk) bypasses the stride-2 temporal conv
                x = self.time_conv(mx.concatenate([prev, x], axis=1))
            cache.push(keep)
        return x


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: fold (ft, fs, fs) neighbourhoods into channels, average channel groups."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def __call__(self, x: mx.array) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        if ft == fs == 1 and self.group == 1:
            return x
        pad_t = (-x.shape[1]) % ft
        if pad_t:  # zero frames go in front, as in upstream
            x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
        B, T, H, W, C = x.shape
        x = x.reshape(B, T // ft, ft, H // fs, fs, W // fs, fs, C)
        # Folded channel index = c * factor + (dt * fs + dh) * fs + dw, then groups of `group` channels.
        x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # (B, T', H', W', C, ft, fs, fs)
        x = x.reshape(B, T // ft, H // fs, W // fs, self.out_dim, self.group)
        return x.mean(axis=-1)


class DupUp3D(nn.Module):
    """Parameter-free shortcut: repeat channels, unfold them into (ft, fs, fs) neighbourhoods."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def __call__(self, x: mx.array, first_chunk: bool = False) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        B, T, H, W, _ = x.shape
        x = mx.repeat(x, self.repeats, axis=-1)  # repeat_interleave over channels
        x = x.reshape(B, T, H, W, self.out_dim, ft, fs, fs)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # (B, T, ft, H, fs, W, fs, out)
        x = x.reshape(B, T * ft, H * fs, W * fs, self.out_dim)
        if first_chunk:  # matches the main path, which turns the first latent frame into one frame
            x = x[:, ft - 1:]
        return x


class Down_ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, mult: int, temperal_downsample: bool, down_flag: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temperal_downsample else 1, 2 if down_flag else 1)
        self.downsamples = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(mult)]
        if down_flag:
            self.downsamples.append(Resample(out_dim, "downsample3d" if temperal_downsample else "downsample2d"))

    def __call__(self, x: mx.array, cache: _FeatCache) -> mx.array:
        shortcut = self.avg_shortcut(x)
        for layer in self.downsamples:
            x = _evaluated(layer(x, cache), cache)
        return x + shortcut


class Up_ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, mult: int, temperal_upsample: bool, up_flag: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temperal_upsample else 1, 2) if up_flag else None
        self.upsamples = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(mult)]
        if up_flag:
            self.upsamples.append(Resample(out_dim, "upsample3d" if temperal_upsample else "upsample2d"))

    def __call__(self, x: mx.array, cache: _FeatCache, first_chunk: bool) -> mx.array:
        h = x
        for layer in self.upsamples:
            h = _evaluated(layer(h, cache), cache)
        if self.avg_shortcut is not None:
            h = h + self.avg_shortcut(x, first_chunk)
        return h


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_downsample):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(PATCH * PATCH * 3, dims[0], 3, padding=1)
        self.downsamples = [
            Down_ResidualBlock(dims[i], dims[i + 1], num_res_blocks,
                               i < len(temperal_downsample) and bool(temperal_downsample[i]),
                               i != len(dim_mult) - 1)
            for i in range(len(dim_mult))
        ]
        out = dims[-1]
        self.middle = [ResidualBlock(out, out), AttentionBlock(out), ResidualBlock(out, out)]
        self.head = [RMS_norm(out), nn.SiLU(), CausalConv3d(out, z_dim, 3, padding=1)]

    def __call__(self, x: mx.array, cache: _FeatCache) -> mx.array:
        x = _cached_conv(self.conv1, x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        x = self.middle[2](self.middle[1](self.middle[0](x, cache)), cache)
        return _cached_conv(self.head[2], nn.silu(self.head[0](x)), cache)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_upsample):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = [ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])]
        self.upsamples = [
            Up_ResidualBlock(dims[i], dims[i + 1], num_res_blocks + 1,
                             i < len(temperal_upsample) and bool(temperal_upsample[i]),
                             i != len(dim_mult) - 1)
            for i in range(len(dim_mult))
        ]
        self.head = [RMS_norm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], PATCH * PATCH * 3, 3, padding=1)]

    def __call__(self, x: mx.array, cache: _FeatCache, first_chunk: bool) -> mx.array:
        x = _cached_conv(self.conv1, x, cache)
        x = self.middle[2](self.middle[1](self.middle[0](x, cache)), cache)
        for layer in self.upsamples:
            x = layer(x, cache, first_chunk)
        return _cached_conv(self.head[2], nn.silu(self.head[0](x)), cache)


class WanVAE(nn.Module):
    """The network (upstream `WanVAE_`): parameter names equal the official state-dict keys."""

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48, dim_mult=(1, 2, 4, 4),
                 num_res_blocks: int = 2, temperal_downsample=(False, True, True)):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temperal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dec_dim, z_dim, dim_mult, num_res_blocks, tuple(temperal_downsample)[::-1])

    def encode_chunks(self, x: mx.array) -> Iterator[Tuple[mx.array, mx.array]]:
        """Patchified video (B, T, h, w, 12), T = 1 + 4k -> per chunk the raw (mu, log_var), each (B, 1, h/8, w/8, z).

        Frame 0 runs alone, then frames in groups of 4, sharing the causal cache (upstream `WanVAE_.encode`).
        """
        cache = _FeatCache()
        for i in range(1 + (x.shape[1] - 1) // TEMPORAL_STRIDE):
            cache.idx = 0
            chunk = x[:, :1] if i == 0 else x[:, 1 + TEMPORAL_STRIDE * (i - 1):1 + TEMPORAL_STRIDE * i]
            h = self.conv1(self.encoder(chunk, cache))  # conv1 is 1x1x1, so per chunk equals upstream's all-at-once
            mu, log_var = h[..., :self.z_dim], h[..., self.z_dim:]
            mx.eval(mu, log_var, cache.arrays())
            yield mu, log_var

    def decode_chunks(self, z: mx.array) -> Iterator[mx.array]:
        """Raw latent (B, t, h, w, z) -> per latent frame the patchified output (B, 1 or 4, 8h, 8w, 12)."""
        cache = _FeatCache()
        for i in range(z.shape[1]):
            cache.idx = 0
            out = self.decoder(self.conv2(z[:, i:i + 1]), cache, first_chunk=i == 0)
            mx.eval(out, cache.arrays())
            yield out


def _patchify(x: mx.array) -> mx.array:
    """(B, T, 2h, 2w, C) -> (B, T, h, w, 4C), channel = c*4 + r*2 + q with q the row and r the column offset."""
    B, T, H, W, C = x.shape
    x = x.reshape(B, T, H // PATCH, PATCH, W // PATCH, PATCH, C)  # (B, T, h, q, w, r, c)
    return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(B, T, H // PATCH, W // PATCH, C * PATCH * PATCH)


def _unpatchify(x: mx.array) -> mx.array:
    B, T, h, w, C4 = x.shape
    x = x.reshape(B, T, h, w, C4 // (PATCH * PATCH), PATCH, PATCH)  # (B, T, h, w, c, r, q)
    return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(B, T, h * PATCH, w * PATCH, C4 // (PATCH * PATCH))


def _nearest_multiples(n: int, m: int) -> str:
    lo, hi = n // m * m, -(-n // m) * m
    return f"{hi}" if lo == 0 else (f"{lo}" if lo == hi else f"{lo} or {hi}")


def _check_video(video: mx.array) -> None:
    if video.ndim != 5:
        raise VAEInputError(f"video must be (B, T, H, W, 3) channels-last in [-1, 1], got shape {tuple(video.shape)}; "
                            "for images add the frame axis with x[:, None].")
    _, T, H, W, C = video.shape
    if C != 3:
        raise VAEInputError(f"video must have 3 (RGB) channels in the last axis, got {C} (shape {tuple(video.shape)}); "
                            "convert channels-first (B, 3, T, H, W) with x.transpose(0, 2, 3, 4, 1).")
    if H % SPATIAL_STRIDE or W % SPATIAL_STRIDE or H == 0 or W == 0:
        raise VAEInputError(f"height and width must be positive multiples of {SPATIAL_STRIDE} (the VAE downsamples "
                            f"{SPATIAL_STRIDE}x), got {H}x{W}; resize or crop to height "
                            f"{_nearest_multiples(H, SPATIAL_STRIDE)} and width "
                            f"{_nearest_multiples(W, SPATIAL_STRIDE)}.")
    if T < 1 or (T - 1) % TEMPORAL_STRIDE:
        lo = 1 + (T - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE
        near = f"{lo + TEMPORAL_STRIDE}" if T < 1 else f"{lo} or {lo + TEMPORAL_STRIDE}"
        raise VAEInputError(f"frame count must be 1 + 4k (frame 0 is encoded alone, then groups of 4), got {T}; "
                            f"use {near} frames.")


def infer_vae_config(weights: Dict[str, object]) -> dict:
    """WanVAE constructor arguments implied by a state dict (either layout: output channels come first in both)."""
    try:
        c_dim = weights["encoder.conv1.weight"].shape[0]
        z_dim = weights["conv2.weight"].shape[0]
        dim_mult, n_res = [], 0
        while f"encoder.downsamples.{len(dim_mult)}.downsamples.0.residual.2.weight" in weights:
            i = len(dim_mult)
            dim_mult.append(weights[f"encoder.downsamples.{i}.downsamples.0.residual.2.weight"].shape[0] // c_dim)
        while f"encoder.downsamples.0.downsamples.{n_res}.residual.2.weight" in weights:
            n_res += 1
        dec_dim = weights["decoder.conv1.weight"].shape[0] // dim_mult[-1]
    except (KeyError, IndexError) as e:
        raise WeightsMismatchError(f"cannot infer the Wan VAE configuration: key {e} is missing; this is not a "
                                   "Wan2.2 VAE state dict. Fix: pass the official Wan2.2_VAE.pth or a file written by "
                                   "Wan2_2_VAE.save_weights.") from None
    temporal = tuple(f"encoder.downsamples.{i}.downsamples.{n_res}.time_conv.weight" in weights
                     for i in range(len(dim_mult) - 1))
    return dict(dim=c_dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=n_res,
                temperal_downsample=temporal)


def sanitize_vae_weights(weights: Dict[str, object], model: Optional[WanVAE] = None) -> Dict[str, object]:
    """PyTorch layouts -> MLX layouts, decided per key by the module's expected shape (idempotent).

    Conv3d (O, I, T, H, W) -> (O, T, H, W, I); Conv2d (O, I, H, W) -> (O, H, W, I); RMS_norm gamma (C, 1, 1[, 1])
    -> (C,). A tensor that already has the expected shape is kept, and keys the model does not have are passed
    through (the strict load reports them). Without `model`, the configuration is inferred from the weights.
    Works on numpy and MLX arrays.
    """
    if model is None:
        model = WanVAE(**infer_vae_config(weights))  # parameters stay lazy: only their shapes are read
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    out = {}
    for key, value in weights.items():
        want = expected.get(key)
        shape = tuple(value.shape)
        if want is None or shape == want:
            out[key] = value
            continue
        if len(want) == 1:
            candidate = value.reshape(-1)
        elif len(shape) == 5:
            candidate = value.transpose(0, 2, 3, 4, 1)
        elif len(shape) == 4:
            candidate = value.transpose(0, 2, 3, 1)
        else:
            candidate = value
        out[key] = candidate if tuple(candidate.shape) == want else value
    return out


def load_vae_checkpoint(path) -> Dict[str, object]:
    """Raw tensors of `Wan2.2_VAE.pth` (numpy, via the safe reader) or of an MLX `.safetensors` (mx arrays)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights not found: {path}. Fix: pass the path of Wan2.2_VAE.pth (from the "
                                "Lance or Wan2.2 release) or of a .safetensors written by Wan2_2_VAE.save_weights.")
    if path.suffix == ".safetensors":
        try:
            return mx.load(str(path))
        except Exception as e:  # mx.load reports truncation/corruption as RuntimeError or ValueError
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); it is truncated or corrupt. "
                                  "Fix: re-download it or write it again with Wan2_2_VAE.save_weights.") from e
    return load_torch_checkpoint(path)


def _check_keys(weights: Dict[str, object], model: WanVAE, path) -> None:
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    bad = [f"{k}: file {tuple(weights[k].shape)} vs model {expected[k]}"
           for k in sorted(set(weights) & set(expected)) if tuple(weights[k].shape) != expected[k]]
    if not (missing or unexpected or bad):
        return

    def listing(title, items):
        more = f" ... (+{len(items) - 20} more)" if len(items) > 20 else ""
        return f"{len(items)} {title}: " + ", ".join(items[:20]) + more

    parts = [listing(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                          ("shape mismatches (file shapes as stored)", bad)) if i]
    try:
        cfg = infer_vae_config(weights)
        found = (f" The file looks like Wan2_2_VAE(z_dim={cfg['z_dim']}, c_dim={cfg['dim']}, dec_dim={cfg['dec_dim']}, "
                 f"dim_mult={cfg['dim_mult']}, temperal_downsample={cfg['temperal_downsample']}, "
                 f"num_res_blocks={cfg['num_res_blocks']}).")
    except WeightsMismatchError:
        found = ""
    raise WeightsMismatchError(
        f"{path}: weights do not match the Wan2.2 VAE built here; " + "; ".join(parts) + "." + found + " Fix: build "
        "Wan2_2_VAE with the checkpoint's configuration (the release is z_dim=48, c_dim=160, dec_dim=256, "
        "dim_mult=(1, 2, 4, 4), temperal_downsample=(False, True, True)) and pass Wan2.2_VAE.pth or a file written "
        "by save_weights.")


class Wan2_2_VAE:
    """Wan 2.2 VAE: video (B, T, H, W, 3) in [-1, 1] <-> normalized latent (B, 1+(T-1)//4, H/16, W/16, 48).

    `model` holds all parameters (names = official state-dict keys, MLX layouts). Computation runs in `dtype`;
    latents and decoded frames are returned as float32.
    """

    def __init__(self, z_dim: int = 48, c_dim: int = 160, dec_dim: int = 256, dim_mult=(1, 2, 4, 4),
                 temperal_downsample=(False, True, True), num_res_blocks: int = 2, dtype=mx.float32,
                 latents_mean: Sequence[float] = LATENTS_MEAN, latents_std: Sequence[float] = LATENTS_STD):
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean/latents_std need {z_dim} values (z_dim), got "
                             f"{len(latents_mean)}/{len(latents_std)}; the official statistics are for z_dim=48.")
        self.z_dim = z_dim
        self.dtype = dtype
        self.model = WanVAE(c_dim, dec_dim, z_dim, tuple(dim_mult), num_res_blocks, tuple(temperal_downsample))
        if dtype != mx.float32:
            self.model.set_dtype(dtype)
        # Upstream builds mean and 1/std in the VAE dtype (fp32 in Wan2.2, bf16 in Lance) and decodes with
        # z / (1/std) + mean; the same order of operations is kept here.
        self.mean = mx.array(latents_mean, dtype=dtype)
        self.inv_std = 1.0 / mx.array(latents_std, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=mx.float32, **config) -> "Wan2_2_VAE":
        vae = cls(dtype=dtype, **config)
        vae.load_weights(path)
        return vae

    def load_weights(self, path_or_weights, source=None) -> "Wan2_2_VAE":
        """Load `Wan2.2_VAE.pth`, an MLX-layout `.safetensors`, or an already read {name: array} dict in either
        layout (numpy or MLX arrays; `source` names it in errors). Strict: names and shapes must all match."""
        if isinstance(path_or_weights, dict):
            raw, source = dict(path_or_weights), source or "VAE state dict"
        else:
            raw, source = load_vae_checkpoint(path_or_weights), source or path_or_weights
        weights = sanitize_vae_weights(raw, self.model)
        del raw
        _check_keys(weights, self.model, source)
        params = []
        for key in list(weights):  # one tensor at a time, so that numpy and MLX copies do not pile up
            value = weights.pop(key)
            value = value if isinstance(value, mx.array) else mx.array(value)
            if value.dtype != self.dtype:
                value = value.astype(self.dtype)
                mx.eval(value)
            params.append((key, value))
        self.model.load_weights(params, strict=True)
        return self

    def save_weights(self, path) -> None:
        """Write the MLX-layout safetensors (loads back with `load_weights` or `model.load_weights`)."""
        mx.save_safetensors(str(path), dict(tree_flatten(self.model.parameters())),
                            metadata={"format": "mlx", "model": "wan2.2-vae"})

    def encode(self, video: mx.array, key: Optional[mx.array] = None, return_log_var: bool = False):
        """Video (B, T, H, W, 3) in [-1, 1], T = 1 + 4k, H and W multiples of 16 -> (mu - mean) / std.

        With `key`, returns the posterior sample upstream Lance uses for conditioning latents instead:
        mu_n + exp(0.5 * log_var) * eps (log_var raw, not normalized; no clamp), eps ~ N(0, 1) from `key`.
        With `return_log_var`, returns (latent, log_var).
        """
        _check_video(video)
        x = _patchify(video.astype(self.dtype))
        mus, log_vars = zip(*self.model.encode_chunks(x))
        mu = mx.concatenate(mus, axis=1) if len(mus) > 1 else mus[0]
        log_var = mx.concatenate(log_vars, axis=1) if len(log_vars) > 1 else log_vars[0]
        latent = ((mu - self.mean) * self.inv_std).astype(mx.float32)
        log_var = log_var.astype(mx.float32)
        if key is not None:
            latent = latent + mx.exp(0.5 * log_var) * mx.random.normal(latent.shape, key=key)
        mx.eval(latent, log_var)
        return (latent, log_var) if return_log_var else latent

    def decode_stream(self, latent: mx.array, clamp: bool = True) -> Iterator[mx.array]:
        """Yield decoded frames chunk by chunk: 1 frame for latent frame 0, then 4 per latent frame.

        Each chunk is evaluated before it is yielded; memory stays at one chunk plus the causal cache.
        """
        if latent.ndim != 5 or latent.shape[-1] != self.z_dim or latent.shape[1] < 1:
            raise VAEInputError(f"latent must be (B, t, h, w, {self.z_dim}) channels-last with t >= 1, got shape "
                                f"{tuple(latent.shape)}; convert channels-first (B, {self.z_dim}, t, h, w) with "
                                "z.transpose(0, 2, 3, 4, 1).")
        z = latent.astype(self.dtype) / self.inv_std + self.mean
        for out in self.model.decode_chunks(z):
            frames = _unpatchify(out).astype(mx.float32)
            if clamp:
                frames = mx.clip(frames, -1.0, 1.0)
            mx.eval(frames)
            yield frames

    def decode(self, latent: mx.array, clamp: bool = True) -> mx.array:
        """Latent (B, t, h, w, 48) -> video (B, 1 + 4(t-1), 16h, 16w, 3); clamp=False returns the raw output."""
        chunks = list(self.decode_stream(latent, clamp))
        return mx.concatenate(chunks, axis=1) if len(chunks) > 1 else chunks[0]

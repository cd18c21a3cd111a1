"""Building blocks of the Wan 2.2 VAE network in MLX: causal 3-D / 2-D convs, norms, resampling, encoder, decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
from mlx import nn

CACHE_T = 2  # frames a cached causal conv carries into the next chunk (wan/modules/vae2_2.py::CACHE_T)
PATCH = 2  # 2x2 pixel patchify in front of the encoder / after the decoder (wan/modules/vae2_2.py::patchify)

# Upper bound on the unfolded (im2col) input one conv call may build on the CPU: MLX's CPU convolution
# materializes out_pixels x (kernel_volume * C_in) values, several GB at 512x512, so large convs run in row
# strips, each evaluated before the next is built (buffers are allocated when a graph is scheduled, not run).
_UNFOLD_BYTES = 1 << 27


def _triple(v) -> tuple[int, int, int]:
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
    (the `feat_cache` list and running `feat_idx` of wan/modules/vae2_2.py::WanVAE_.encode / decode)."""

    REP = "Rep"  # marker of wan/modules/vae2_2.py::Resample.forward: first latent frame seen, its conv skipped

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

    def __call__(self, x: mx.array, cache: mx.array | None = None) -> mx.array:
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
        # Indices follow the nn.Sequential of wan/modules/vae2_2.py::ResidualBlock (norm, SiLU, conv, norm, SiLU,
        # dropout, conv) so that
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
    """Spatial x2 up/down sampling, optionally with the temporal x2 conv (wan/modules/vae2_2.py::Resample)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown Resample mode {mode!r}")
        self.mode = mode
        # Slot 0 of the nn.Sequential in wan/modules/vae2_2.py::Resample is the parameter-free nearest upsample
        # or right/bottom zero pad.
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
        if pad_t:  # zero frames go in front, as in wan/modules/vae2_2.py::AvgDown3D.forward
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

"""Wan 2.2 VAE in MLX: the `WanVAE` network, weight loading and checks, the public `Wan2_2_VAE` encode/decode."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from .errors import InvalidRequestError, WeightsNotFoundError
from .torch_checkpoint import CheckpointError, load_torch_checkpoint
from .vae_blocks import PATCH, CausalConv3d, Decoder3d, Encoder3d, _FeatCache

__all__ = [
    "LATENTS_MEAN", "LATENTS_STD", "VAEInputError", "Wan2_2_VAE", "WanVAE", "WeightsMismatchError",
    "infer_vae_config", "load_vae_checkpoint", "sanitize_vae_weights",
]

# Per-channel latent statistics of the z_dim=48 VAE, verbatim from Wan2.2 wan/modules/vae2_2.py (Wan2_2_VAE);
# upstream Lance's modeling/vae/wan/vae2_2.py (Wan2_2_VAE) uses the same values.
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

SPATIAL_STRIDE = 16
TEMPORAL_STRIDE = 4


class VAEInputError(InvalidRequestError):
    """Video or latent with a shape the VAE cannot process."""


class WeightsMismatchError(CheckpointError):
    """Checkpoint names or shapes that do not match the model."""


class WanVAE(nn.Module):
    """The network (wan/modules/vae2_2.py::WanVAE_): parameter names equal the official state-dict keys."""

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48, dim_mult=(1, 2, 4, 4),
                 num_res_blocks: int = 2, temperal_downsample=(False, True, True)):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temperal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dec_dim, z_dim, dim_mult, num_res_blocks, tuple(temperal_downsample)[::-1])

    def encode_chunks(self, x: mx.array) -> Iterator[tuple[mx.array, mx.array]]:
        """Patchified video (B, T, h, w, 12), T = 1 + 4k -> per chunk the raw (mu, log_var), each (B, 1, h/8, w/8, z).

        Frame 0 runs alone, then frames in groups of 4, sharing the causal cache
        (wan/modules/vae2_2.py::WanVAE_.encode).
        """
        cache = _FeatCache()
        for i in range(1 + (x.shape[1] - 1) // TEMPORAL_STRIDE):
            cache.idx = 0
            chunk = x[:, :1] if i == 0 else x[:, 1 + TEMPORAL_STRIDE * (i - 1):1 + TEMPORAL_STRIDE * i]
            h = self.conv1(self.encoder(chunk, cache))  # conv1 is 1x1x1: per chunk == all at once
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


def infer_vae_config(weights: dict[str, object]) -> dict:
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
    return {"dim": c_dim, "dec_dim": dec_dim, "z_dim": z_dim, "dim_mult": tuple(dim_mult), "num_res_blocks": n_res,
            "temperal_downsample": temporal}


def sanitize_vae_weights(weights: dict[str, object], model: WanVAE | None = None) -> dict[str, object]:
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


def load_vae_checkpoint(path) -> dict[str, object]:
    """Raw tensors of `Wan2.2_VAE.pth` (numpy, via the safe reader) or of an MLX `.safetensors` (mx arrays)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"VAE weights not found: {path}. Fix: pass the path of Wan2.2_VAE.pth (from the "
                                "Lance or Wan2.2 release) or of a .safetensors written by Wan2_2_VAE.save_weights.")
    if path.suffix == ".safetensors":
        try:
            return mx.load(str(path))
        except Exception as e:  # mx.load reports truncation/corruption as RuntimeError or ValueError
            raise CheckpointError(f"{path}: unreadable safetensors file ({e}); it is truncated or corrupt. "
                                  "Fix: re-download it or write it again with Wan2_2_VAE.save_weights.") from e
    return load_torch_checkpoint(path)


def _check_keys(weights: dict[str, object], model: WanVAE, path) -> None:
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
    def from_pretrained(cls, path, dtype=mx.float32, **config) -> Wan2_2_VAE:
        vae = cls(dtype=dtype, **config)
        vae.load_weights(path)
        return vae

    def load_weights(self, path_or_weights, source=None) -> Wan2_2_VAE:
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

    def encode(self, video: mx.array, key: mx.array | None = None, return_log_var: bool = False):
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

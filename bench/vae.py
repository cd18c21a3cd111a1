"""Wan 2.2 VAE encode/decode time and peak memory at the release config: MLX against the official PyTorch code."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import threading
import time

import mlx.core as mx
import numpy as np
from common import blas_words  # bench/common.py (this script's folder)

from lance_mlx.vae_wan22 import LATENTS_MEAN, LATENTS_STD, Wan2_2_VAE, sanitize_vae_weights  # noqa: E402

# name -> (frames, height, width)
CASES = {"image256": (1, 256, 256), "image512": (1, 512, 512), "video9x256": (9, 256, 256)}
RELEASE = dict(dim=160, dec_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
               temperal_downsample=[False, True, True])


def load_official():
    """wan/modules/vae2_2.py by path (importing the `wan` package would need flash_attn)."""
    spec = importlib.util.find_spec("wan")
    if spec is None:
        raise SystemExit("wan22 is not installed: pip install --no-deps -r requirements-ref.txt (or use --skip-torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "modules", "vae2_2.py")
    mod_spec = importlib.util.spec_from_file_location("wan_vae2_2_ref", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident set size above the level at entry, sampled every 2 ms (Linux /proc)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def best(fn, repeat: int):
    """(result, seconds of the fastest call, peak bytes above the starting level of that call)."""
    runs = []
    for _ in range(repeat):
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t0 = time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - t0, mx.get_peak_memory() - base, out))
    sec, peak, out = min(runs, key=lambda r: r[0])
    return out, sec, peak


def best_torch(fn, repeat: int):
    runs = []
    for _ in range(repeat):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            sec = time.perf_counter() - t0
        runs.append((sec, mem.extra, out))
    sec, peak, out = min(runs, key=lambda r: r[0])
    return out, sec, peak


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--skip-torch", action="store_true", help="time MLX only (no official reference)")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per row (the fastest is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")

    print("# Wan 2.2 VAE, release config (z 48, c_dim 160, dec_dim 256), random weights, float32, batch 1")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"device {mx.default_device()}")
    print(f"- MLX BLAS: {blas_words()}")

    vae = Wan2_2_VAE()
    ref = None
    if not args.skip_torch:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        print(f"- torch {torch.__version__} (MKL / oneDNN), {args.threads} threads, official wan/modules/vae2_2.py "
              "WanVAE_.encode/decode under torch.inference_mode")
        ref = load_official().WanVAE_(**RELEASE).eval()
        # Same random weights on both sides, so the outputs can be compared as well.
        weights = sanitize_vae_weights({k: v.numpy() for k, v in ref.state_dict().items()}, vae.model)
        vae.model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
        del weights
    mx.eval(vae.model.parameters())
    print(f"- time: fastest of {args.repeat} call(s) after one small warm-up; peak memory above the level before "
          "the call (MLX: mx.get_peak_memory, weights excluded; torch: sampled process RSS)")
    print("- rel diff: max |MLX - torch| / max |torch| of the normalized latent (encode) and of the raw, unclamped "
          "output decoded from the torch latent (decode)\n")

    # Warm-up: first calls pay for thread pools and allocator growth.
    warm = mx.zeros((1, 1, 64, 64, 3))
    vae.decode(vae.encode(warm))
    if ref is not None:
        with torch.inference_mode():
            ref.decode(ref.encode(torch.zeros(1, 3, 1, 64, 64), [0.0, 1.0]), [0.0, 1.0])
        scale = [torch.tensor(LATENTS_MEAN), 1.0 / torch.tensor(LATENTS_STD)]  # as Wan2_2_VAE builds it

    print("| case | input | latent | framework | encode s | decode s | encode peak MiB | decode peak MiB "
          "| rel diff enc / dec |")
    print("|---|---|---|---|---|---|---|---|---|")
    mib = 2 ** 20
    for name in cases:
        frames, height, width = CASES[name]
        video = np.random.default_rng(0).uniform(-1, 1, (1, frames, height, width, 3)).astype(np.float32)
        latent_shape = (1 + (frames - 1) // 4, height // 16, width // 16, 48)
        x = mx.array(video)
        z, enc_s, enc_peak = best(lambda: vae.encode(x), args.repeat)
        _, dec_s, dec_peak = best(lambda: vae.decode(z), args.repeat)
        diff = "-"
        if ref is not None:
            xt = torch.from_numpy(video).permute(0, 4, 1, 2, 3).contiguous()
            with torch.inference_mode():
                zt, t_enc_s, t_enc_peak = best_torch(lambda: ref.encode(xt, scale), args.repeat)
                yt, t_dec_s, t_dec_peak = best_torch(lambda: ref.decode(zt, scale), args.repeat)
            z_ref = zt.permute(0, 2, 3, 4, 1).numpy()
            y = vae.decode(mx.array(z_ref), clamp=False)
            diff = f"{rel(z, z_ref):.1e} / {rel(y, yt.permute(0, 2, 3, 4, 1).numpy()):.1e}"
        size = f"{frames}x{height}x{width}"
        lat = "x".join(map(str, latent_shape))
        print(f"| {name} | {size} | {lat} | MLX | {enc_s:.2f} | {dec_s:.2f} | {enc_peak / mib:.0f} | "
              f"{dec_peak / mib:.0f} | {diff} |", flush=True)
        if ref is not None:
            print(f"| {name} | {size} | {lat} | torch | {t_enc_s:.2f} | {t_dec_s:.2f} | {t_enc_peak / mib:.0f} | "
                  f"{t_dec_peak / mib:.0f} | |", flush=True)
        mx.clear_cache()


if __name__ == "__main__":
    main()

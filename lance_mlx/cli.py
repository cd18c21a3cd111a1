"""Argument groups and reporting shared by the command-line scripts (inference.py, edit.py, caption.py, convert.py)."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from typing import Iterator, NoReturn

import mlx.core as mx

from .weights import DTYPES, UPSTREAM_REPO

# Upstream defaults (inference_lance.sh): 30 steps, shift 3.5, text CFG 4.0, seed 42.
DEFAULT_STEPS = 30
DEFAULT_SHIFT = 3.5
DEFAULT_CFG = 4.0
DEFAULT_SEED = 42

# Aspect-ratio buckets of upstream's resize (data/video/transforms/bucket_resize.py), as width:height.
ASPECTS = {"21:9": 21 / 9, "16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16}


def add_model_args(p: argparse.ArgumentParser, default_dtype: str = "bfloat16") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=UPSTREAM_REPO,
                   help=f"local model folder or hub repo id (default {UPSTREAM_REPO}; only the files the task "
                        "needs are downloaded)")
    g.add_argument("--dtype", default=default_dtype, choices=sorted(DTYPES),
                   help=f"compute dtype of the LLM and ViT (default {default_dtype})")


def add_seed_arg(g) -> None:
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")


def add_generation_args(p: argparse.ArgumentParser, cfg_flags=("--cfg", "--cfg-text")) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    g.add_argument(*cfg_flags, dest="cfg", type=float, default=DEFAULT_CFG,
                   help=f"text guidance scale, active for 0.4 < t <= 1 as upstream (default {DEFAULT_CFG})")
    g.add_argument("--timestep-shift", type=float, default=DEFAULT_SHIFT,
                   help=f"flow-matching schedule shift (default {DEFAULT_SHIFT})")
    add_seed_arg(g)


def add_posterior_args(g, what: str) -> None:
    """How a VAE-encoded conditioning input (`what`) is drawn: upstream samples the posterior with its global seed."""
    from .editing import POSTERIOR_SEED

    g.add_argument("--posterior-seed", type=int, default=POSTERIOR_SEED,
                   help=f"seed of the VAE posterior sample of {what} (default {POSTERIOR_SEED}, upstream's global seed)")
    g.add_argument("--posterior-mean", action="store_true",
                   help=f"encode {what} with the VAE posterior mean instead of a sample (deterministic; upstream "
                        "samples)")


def add_size_args(p: argparse.ArgumentParser, default_resolution: int = 768) -> None:
    g = p.add_argument_group("size")
    g.add_argument("--width", type=int, help="output width in pixels (multiple of 16, at most 1024)")
    g.add_argument("--height", type=int, help="output height in pixels (multiple of 16, at most 1024)")
    g.add_argument("--aspect", choices=list(ASPECTS), default="1:1",
                   help="aspect-ratio preset used when --width/--height are not given (upstream buckets)")
    g.add_argument("--resolution", type=int, default=default_resolution,
                   help=f"area preset: the bucket covers about RESOLUTION² pixels (default {default_resolution})")


def bucket_size(aspect: float, resolution: int, stride: int = 16) -> tuple:
    """Upstream's bucket for one aspect ratio (width, height): the option whose ratio is closer wins.

    Python's round() is banker's rounding, exactly as upstream's bucket construction uses it.
    """
    area = resolution * resolution
    w1 = round((area * aspect) ** 0.5 / stride) * stride
    h1 = round(w1 / aspect / stride) * stride
    h2 = round((area / aspect) ** 0.5 / stride) * stride
    w2 = round(h2 * aspect / stride) * stride
    options = [(w1, h1), (w2, h2)]
    return min(options, key=lambda o: (abs(o[0] / o[1] - aspect), abs(o[0] * o[1] - area)))


def resolve_size(args) -> tuple:
    """(width, height) from explicit flags or the aspect/resolution preset."""
    if args.width is None and args.height is None:
        return bucket_size(ASPECTS[args.aspect], args.resolution)
    if args.width is None or args.height is None:
        raise SystemExit("error: give both --width and --height, or neither (then --aspect/--resolution apply)")
    return args.width, args.height


class PhaseTimer:
    """Prints wall time and MLX peak memory per phase on stderr, as the mlx-examples scripts do."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.rows = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        peak = mx.get_peak_memory() / 2**30
        self.rows.append((name, dt, peak))
        print(f"[{name}] {dt:.2f} s, peak memory {peak:.2f} GB", file=self.stream)

    def summary(self) -> None:
        total = sum(r[1] for r in self.rows)
        peak = max((r[2] for r in self.rows), default=0.0)
        print(f"[total] {total:.2f} s, peak memory {peak:.2f} GB", file=self.stream)


def step_progress(desc: str = "denoising"):
    """A `progress(i, n)` callback drawing a tqdm bar on stderr; the bar opens at the first step (after any
    encoding phase prints) and closes at the last."""
    from tqdm import tqdm

    bar = []

    def progress(i: int, n: int) -> None:
        if not bar:
            bar.append(tqdm(total=n, desc=desc, unit="step", file=sys.stderr))
        bar[0].update(i - bar[0].n)
        if i == n:
            bar[0].close()

    return progress


def fail(msg: str) -> NoReturn:
    """Exit with a one-line error (no traceback) for problems the user can fix."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)

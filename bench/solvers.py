"""Accuracy of each sampler on the tiny test checkpoint: error of the final latent against a 1000-step Euler run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lance_mlx import tasks as T  # noqa: E402
from lance_mlx.config import SAMPLERS, SamplingParams  # noqa: E402
from lance_mlx.processing import Preset  # noqa: E402
from tiny_checkpoints import tiny_pipeline  # noqa: E402

STEPS = (6, 8, 12, 16, 20, 30)
REFERENCE_STEPS = 1000
PROMPT = "a red fox walking through fresh snow at sunrise"
INSTRUCTION = "make the sky pink"
TINY = Preset("tiny", 48, 56)  # 48x32 inputs -> VAE 64x48 (4x3 latents), as the tests' tiny presets


def requests(tasks, sampling: SamplingParams):
    """Tiny requests of each task with upstream's guidance defaults (text CFG 4, interval 0.4,1.0, shift 3.5)."""
    rng = np.random.default_rng(0)
    image = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    video = (rng.random((9, 32, 48, 3)) * 255).astype(np.uint8)
    make = {
        "t2i": lambda: T.TextToImage(PROMPT, 96, 96, sampling),  # 6x6 latents
        "edit": lambda: T.ImageEdit(image, INSTRUCTION, TINY, sampling),  # 3x4 latents, 2 branches
        "edit cfg-img 1.5": lambda: T.ImageEdit(image, INSTRUCTION, TINY, sampling.replace(cfg_image=1.5)),
        "t2v": lambda: T.TextToVideo(PROMPT, 9, 64, 48, sampling=sampling),  # 3x3x4 latents
        "i2v": lambda: T.ImageToVideo(PROMPT, image, 9, TINY.vae_resolution, sampling=sampling),
        "video edit": lambda: T.VideoEdit(video, INSTRUCTION, TINY, input_fps=12, sampling=sampling),
    }
    return {name: make[name]() for name in tasks}


def final_latents(pipe, plan, steps: int, sampler: str) -> np.ndarray:
    params = plan.params.replace(steps=steps, sampler=sampler)
    x = None
    for step in pipe.model.denoise(plan.sequence, params, plan.frozen):
        x = step.latents
    return np.array(x, dtype=np.float64)


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", nargs="+", default=["t2i", "edit", "t2v"],
                   choices=["t2i", "edit", "edit cfg-img 1.5", "t2v", "i2v", "video edit"])
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--cfg", type=float, default=4.0, help="text guidance scale (default 4, upstream's)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.4, 1.0), metavar=("LO", "HI"),
                   help="guidance interval (default upstream's 0.4 1.0; 0 1 guides every step, a smooth field)")
    args = p.parse_args(argv)

    pipe = tiny_pipeline()
    sampling = SamplingParams(cfg_text=args.cfg, cfg_interval=tuple(args.cfg_interval))
    print(f"tiny checkpoint (3 layers, hidden 64, float32), MLX {mx.__version__} on {mx.default_device()}; "
          f"text CFG {args.cfg:g}, interval {sampling.cfg_interval}, shift {sampling.shift:g}; error = "
          f"||x - x_ref|| / ||x_ref|| of the final latent, x_ref = Euler with {REFERENCE_STEPS} steps")
    header = "| task | sampler | " + " | ".join(f"{n} steps" for n in args.steps) + " |"
    rows = [header, "|" + "---|" * (2 + len(args.steps))]
    for name, request in requests(args.tasks, sampling).items():
        plan = pipe.plan(request)
        t0 = time.perf_counter()
        ref = final_latents(pipe, plan, REFERENCE_STEPS, "euler")
        # Euler's error is first order, so the half-step run's distance to the reference estimates the
        # reference's own error: the floor below which the table cannot resolve.
        floor = rel_err(final_latents(pipe, plan, REFERENCE_STEPS // 2, "euler"), ref)
        print(f"{name}: latents {plan.latent_shape}, reference {time.perf_counter() - t0:.0f} s, "
              f"reference error about {floor:.1e}", file=sys.stderr)
        for sampler in SAMPLERS:
            errs = [rel_err(final_latents(pipe, plan, n, sampler), ref) for n in args.steps]
            rows.append(f"| {name} | {sampler} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
            print(rows[-1], file=sys.stderr)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

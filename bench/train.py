"""Peak memory and seconds per LoRA training step at full width (random weights): text-to-image at 256² / 512²,
batch 1, rank 16, with and without per-layer gradient checkpointing, optionally over a 4-bit base.

    python bench/train.py --layers 2                      # quick check
    python bench/train.py --layers 2 --frames 17 --resolutions 256   # a 17-frame text-to-video clip
    flock /work/heavy.lock python bench/train.py          # all 36 layers (needs the memory of the base weights)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL_LAYERS, blas_line, build, load_line  # noqa: E402

from lance_mlx import lora as L  # noqa: E402
from lance_mlx.cli import add_dtype_args  # noqa: E402
from lance_mlx.quantize import quantize_lance  # noqa: E402
from lance_mlx.sequence import generation_sequence  # noqa: E402
from lance_mlx.train import objective as O  # noqa: E402

# "A cat holds a poster with rainbow text "STOP"" in the Qwen2.5 vocabulary
PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]
GB = 1024 ** 3


def example(resolution: int, frames: int = 1, seed: int = 0):
    """One t2i example at resolution² (latent grid resolution/16), or t2v with `frames` frames (4k+1: (frames-1)/4+1
    latent frames), with random clean latents, and its draws."""
    n, t = resolution // 16, (frames - 1) // 4 + 1
    seq = generation_sequence("t2i" if frames == 1 else "t2v", PROMPT_IDS, (t, n, n))
    rng = np.random.default_rng(seed)
    seq.splits[seq.noise_index].data = rng.standard_normal((t * n * n, 48)).astype(np.float32)
    ex = O.Example(seq)
    return ex, O.fixed_draws([ex], [[0.3]], [[rng.standard_normal((t * n * n, 48)).astype(np.float32)]])[0]


def run_case(args, resolution: int, checkpointing: bool, bits) -> dict:
    gc.collect()
    mx.clear_cache()
    model = build(args.layers, args.dtype, args.compute_dtype)
    if bits:
        quantize_lance(model, {"bits": bits, "group_size": 64, "experts": "all"})
    model.freeze()
    factors = L.add_adapter(model, L.match_targets(model, L.GEN_EXPERT_TARGETS), args.rank, args.rank)
    lora_params = sum(a.lora_a.size + a.lora_b.size for a in factors)
    opt = optim.AdamW(learning_rate=1e-4, betas=[0.9, 0.95], eps=1e-15, weight_decay=0.0)
    ex, dr = example(resolution, args.frames)

    def loss(m):
        return O.losses(m, O.pack(m, [ex], [dr]), checkpoint=checkpointing).loss

    grad_fn = nn.value_and_grad(model, loss)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        value, grads = grad_fn(model)
        opt.update(model, grads)
        mx.eval(value, model.trainable_parameters(), opt.state)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = mx.get_peak_memory()
    del model, opt, grads
    return {"resolution": resolution, "checkpointing": checkpointing, "bits": bits or "-", "tokens": len(ex.seq),
            "weights_gb": weights / GB, "peak_gb": peak / GB, "s_step": float(np.median(times)),
            "lora_params": lora_params}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=FULL_LAYERS, help=f"decoder layers (default {FULL_LAYERS})")
    add_dtype_args(p)
    p.add_argument("--resolutions", default="256,512", help="comma-separated (default 256,512)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", default="none", help="base quantization: none, 4 or 'none,4' (default none)")
    p.add_argument("--checkpointing", default="on,off", help="on, off or on,off (default)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per case (default 2; the median is shown)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--frames", type=int, default=1, help="1: text-to-image (default); 4k+1: text-to-video clip")
    args = p.parse_args(argv)
    if args.frames < 1 or (args.frames - 1) % 4:
        p.error("--frames must be 1 or 4k+1 (5, 9, 17, ...)")
    print(f"{'t2i' if args.frames == 1 else f't2v, {args.frames} frames'}: device {mx.default_device()}, "
          f"{args.layers} layers, weights {args.dtype}, activations "
          f"{args.compute_dtype or args.dtype}, rank {args.rank}, batch 1")
    print(blas_line())
    print("| resolution | tokens | checkpointing | base bits | weights GB | peak GB | s/step |")
    print("|---|---|---|---|---|---|---|")
    for res in (int(r) for r in args.resolutions.split(",")):
        for bits in (None if b == "none" else int(b) for b in args.bits.split(",")):
            for ck in (c == "on" for c in args.checkpointing.split(",")):
                r = run_case(args, res, ck, bits)
                print(f"| {res}² | {r['tokens']} | {'on' if ck else 'off'} | {r['bits']} | {r['weights_gb']:.2f} | "
                      f"{r['peak_gb']:.2f} | {r['s_step']:.2f} |", flush=True)
    print(f"- {load_line()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

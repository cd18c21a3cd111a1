"""Seconds per denoising step and bytes exchanged per step on 1 vs 2 ranks (`mlx.launch --backend ring` on this
machine), full-width Lance layers (random weights, a few of them), each rank limited to one thread.

The speed-up is computed from CPU seconds per step of the busiest rank: on a machine whose cores are shared with
other work, wall time measures the neighbours; CPU time measures the split (wall time is printed too)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# "A cat holds a poster with rainbow text "STOP"" in the Qwen2.5 vocabulary (as bench/t2i.py)
PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "VECLIB_MAXIMUM_THREADS": "1"}
# (name, ranks, --parallel, cfg): the 1-rank rows are the references of the 2-rank rows below them
CASES = [("1 rank, guidance", 1, "cfg", 4.0), ("2 ranks, cfg", 2, "cfg", 4.0), ("2 ranks, seq", 2, "seq", 4.0),
         ("1 rank, no guidance", 1, "seq", 1.0), ("2 ranks, seq", 2, "seq", 1.0)]


def rank_main(args) -> None:
    """One rank: build the model (same seed on every rank), run the steps, rank 0 prints a JSON line and saves x."""
    import mlx.core as mx

    from lance_mlx import distributed as D
    from lance_mlx.config import LanceConfig, SamplingParams
    from lance_mlx.lance import Lance
    from lance_mlx.sequence import generation_sequence

    dtype = {"float32": mx.float32, "bfloat16": mx.bfloat16}[args.dtype]
    config = LanceConfig()
    config = replace(config, llm=replace(config.llm, num_hidden_layers=args.layers))
    mx.random.seed(0)
    model = Lance(config)
    model.set_dtype(dtype)
    # lm_head is never evaluated (lazy), so it takes no memory
    mx.eval([p for k, p in _flat(model.parameters()) if not k.startswith("language_model.lm_head")])
    t, h, w = args.grid
    seq = generation_sequence("t2v" if t > 1 else "t2i", PROMPT_IDS, (t, h, w))
    params = SamplingParams(steps=args.steps, cfg_text=args.cfg)
    group = D.world()
    ex = D.Exchange(group)
    layout = D.choose_layout(args.parallel, group.size(), group.rank(), D.num_branches(params))
    times, cpu, received, x = [], [], [], None
    t0, c0 = time.perf_counter(), time.process_time()
    for step in D.denoise(model, seq, params, None, layout, ex):
        now, c = time.perf_counter(), time.process_time()
        times.append(now - t0)
        cpu.append(c - c0)
        received.append(ex.received)
        t0, c0, x = now, c, step.latents
    if group.rank() == 0:
        np.save(args.save, np.array(x))
    # every rank reports; the first step (with the context prefill) is left out
    print("BENCH " + json.dumps({"rank": group.rank(), "step_s": float(np.median(times[1:])),
                                 "cpu_s": float(np.median(cpu[1:])), "bytes": received[-1] - received[-2],
                                 "layout": layout.describe()}), flush=True)


def _flat(tree, prefix=""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree, prefix)


def run_case(args, ranks: int, parallel: str, cfg: float, save: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rank-run", "--layers", str(args.layers), "--grid",
           *map(str, args.grid), "--steps", str(args.steps), "--dtype", args.dtype, "--parallel", parallel, "--cfg",
           str(cfg), "--save", str(save)]
    if ranks > 1:
        launcher = Path(sys.executable).parent / "mlx.launch"
        cmd = [str(launcher), "--backend", "ring", "-n", str(ranks), "--hosts", "127.0.0.1", "--", *cmd]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True)
    rows = [json.loads(ln[6:]) for ln in r.stdout.splitlines() if ln.startswith("BENCH ")]
    if len(rows) != ranks:
        raise SystemExit(f"the {ranks}-rank run failed:\n{r.stderr[-3000:]}")
    # the step ends when the slowest rank is done: its wall time, and the most CPU time any rank spent
    return {"step_s": max(x["step_s"] for x in rows), "cpu_s": max(x["cpu_s"] for x in rows),
            "bytes": rows[0]["bytes"], "layout": rows[0]["layout"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=1, help="decoder layers at full width (default 1 of 36)")
    p.add_argument("--grid", type=int, nargs=3, default=(1, 16, 16), metavar=("T", "H", "W"),
                   help="latent grid (default 1 16 16: a 256² image, 256 tokens)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--parallel", default="cfg")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_run:
        return rank_main(args)
    t, h, w = args.grid
    print(f"{args.layers} full-width layers (hidden 2048, 16 heads, 2 KV heads), {args.dtype}, grid {t}x{h}x{w} = "
          f"{t * h * w} tokens, {args.steps} steps, one thread per rank, ring backend on 127.0.0.1")
    from common import blas_words  # the parent's BLAS is the ranks' (same environment); imports MLX

    print(f"BLAS: {blas_words()}")
    print(f"{'case':<26} {'layout':<36} {'s/step':>7} {'CPU s/step':>11} {'speed-up':>9} {'MB in/step/rank':>16} "
          f"{'max rel diff':>13}")
    with tempfile.TemporaryDirectory() as d:
        base = None
        for i, (name, ranks, parallel, cfg) in enumerate(CASES):
            res = run_case(args, ranks, parallel, cfg, Path(d) / f"{i}.npy")
            x = np.load(Path(d) / f"{i}.npy")
            if ranks == 1:
                base, ref = res, x
            diff = float(np.abs(x - ref).max() / np.abs(ref).max())
            print(f"{name + f' (cfg {cfg:g})':<26} {res['layout']:<36} {res['step_s']:>7.3f} {res['cpu_s']:>11.3f} "
                  f"{base['cpu_s'] / res['cpu_s']:>8.2f}x {res['bytes'] / 1e6:>16.3f} {diff:>13.1e}")


if __name__ == "__main__":
    main()

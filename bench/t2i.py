"""Seconds per text-to-image denoising step at the full-size Lance config: KV-cached context vs full recompute."""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import mlx.core as mx
from mlx.utils import tree_flatten

from lance_mlx import sampler as S  # noqa: E402
from lance_mlx import sequence as Q  # noqa: E402
from lance_mlx.lance import Lance, LanceConfig  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# "A cat holds a poster with rainbow text "STOP"" in the Qwen2.5 vocabulary
PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]


def build(layers: int, dtype) -> Lance:
    """Random full-size Lance with `layers` decoder layers, initialised lazily and evaluated once."""
    cfg = LanceConfig()
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=layers))
    mx.random.seed(0)
    m = Lance(cfg)
    m.set_dtype(dtype)
    for _, p in tree_flatten(m.parameters()):  # one tensor at a time keeps the float32 init transient
        mx.eval(p)
    return m


def layer_bytes(m: Lance) -> int:
    return sum(v.nbytes for _, v in tree_flatten(m.language_model.model.layers[0].parameters()))


def timed(step, warmup: int, steps: int):
    """(min wall, mean wall, mean CPU) seconds of the timed steps. The min wall time is the least disturbed by
    other load on the machine; CPU time (all threads of this process) does not grow with that load."""
    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), sum(wall) / len(wall), sum(cpu) / len(cpu)


def bench_one(m: Lance, size: int, warmup: int, steps: int, modes):
    h = w = size // 16
    seq = Q.generation_sequence("t2i", PROMPT_IDS, (1, h, w))
    rows = []
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    ctx = m.prepare_generation(seq)
    prefill_s = time.perf_counter() - t0
    x0 = mx.random.normal((h * w, 48), key=mx.random.key(0))
    t_step = float(S.timesteps(30, 3.5)[0][5])  # a CFG step (both branches)
    state = {"x": x0}

    def cached():
        v = m.velocity(ctx, state["x"], t_step, 4.0).v
        state["x"] = S.euler_step(state["x"], v, 0.01)
        mx.eval(state["x"])

    def uncached():
        x = state["x"]
        v_c = m.velocity_uncached(ctx.cond.branch, x, t_step)
        v_u = m.velocity_uncached(ctx.uncond.branch, x, t_step)
        v_cfg = S.cfg_combine(v_c, v_u, 4.0)
        state["x"] = S.euler_step(x, v_cfg * S.renorm_scale(v_c, v_cfg), 0.01)
        mx.eval(state["x"])

    for mode in modes:
        state["x"] = x0
        mx.reset_peak_memory()
        sec, mean, cpu = timed(cached if mode == "kv-cache" else uncached, warmup, steps)
        rows.append(dict(size=size, tokens=h * w, ctx=ctx.cond.branch.context_len, mode=mode, sec=sec, mean=mean,
                         cpu=cpu,
                         peak=mx.get_peak_memory(), prefill=prefill_s if mode == "kv-cache" else None))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="256,512", help="square image sizes in pixels (comma list)")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16, float16")
    ap.add_argument("--layers", type=int, default=1,
                    help="decoder layers actually built (36 = full model; times and memory are scaled to 36)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed denoising steps per row")
    ap.add_argument("--modes", default="kv-cache,recompute", help="kv-cache and/or recompute")
    args = ap.parse_args(argv)

    full_layers = LanceConfig().llm.num_hidden_layers
    preload = os.environ.get("LD_PRELOAD", "")
    print("# Lance t2i denoising step, full-size config (hidden 2048, MLP 11008, 16/2 heads), random weights")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
          f"device {mx.default_device()}")
    print(f"- BLAS: {'OpenBLAS via LD_PRELOAD=' + preload if 'openblas' in preload else 'MLX default (no LD_PRELOAD)'}")
    print(f"- built {args.layers} of {full_layers} decoder layers (embeddings, lm_head, adapters full size); "
          f"'36-layer' columns scale the step time by {full_layers}/{args.layers} and add "
          f"{full_layers - args.layers} x one layer's weight bytes to the peak memory")
    print(f"- one step = conditional + unconditional branch (CFG 4, t inside the CFG interval); "
          f"{args.warmup} warm-up + {args.steps} timed steps per row; the 36-layer columns use the fastest step")
    print("- CPU s/step: process CPU time (all threads); other jobs on the machine slow the wall time, not this")
    print("- kv-cache: template context prefilled once, each step runs only the noise block against it; "
          "recompute: the whole branch sequence with the explicit sparse mask every step\n")
    print("| dtype | image | latent tokens | context tokens | mode | wall s/step min (mean) | CPU s/step "
          "| wall s/step 36 layers | prefill s (36 l.) | peak GB measured | peak GB 36 layers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    scale = full_layers / args.layers
    for name in args.dtypes.split(","):
        m = build(args.layers, DTYPES[name])
        extra = (full_layers - args.layers) * layer_bytes(m)
        for size in [int(s) for s in args.sizes.split(",")]:
            for r in bench_one(m, size, args.warmup, args.steps, args.modes.split(",")):
                pre = f"{r['prefill'] * scale:.2f}" if r["prefill"] is not None else "-"
                print(f"| {name} | {size}x{size} | {r['tokens']} | {r['ctx']} | {r['mode']} | {r['sec']:.2f} "
                      f"({r['mean']:.2f}) | {r['cpu']:.2f} "
                      f"| {r['sec'] * scale:.1f} | {pre} | {r['peak'] / 1e9:.2f} | {(r['peak'] + extra) / 1e9:.2f} |",
                      flush=True)
        del m
        mx.clear_cache()


if __name__ == "__main__":
    main()

"""Seconds per image-edit and text-to-video denoising step at the full-size Lance config: KV cache vs recompute."""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from t2i import layer_bytes, timed  # noqa: E402  (bench/t2i.py: same per-layer timing)

from lance_mlx import conditioning as C  # noqa: E402
from lance_mlx import sampler as S  # noqa: E402
from lance_mlx import sequence as Q  # noqa: E402
from lance_mlx import tasks as T  # noqa: E402
from lance_mlx.lance import Lance, LanceConfig  # noqa: E402
from lance_mlx.processing import PRESETS  # noqa: E402

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# Any ids of these lengths behave the same: an 11-token prompt and a 7-token instruction.
PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]
INSTRUCTION_IDS = [8078, 279, 8251, 9850, 264, 2518, 67271]


def build(layers: int, dtype) -> Lance:
    """Random full-size Lance with `layers` decoder layers (parameters evaluated one at a time)."""
    cfg = LanceConfig()
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=layers))
    mx.random.seed(0)
    m = Lance(cfg)
    m.set_dtype(dtype)
    for _, p in tree_flatten(m.parameters()):
        mx.eval(p)
    return m


def edit_sequence(m, size: int, rng) -> Q.Sequence:
    """Square `size` edit: ViT block at the paired preset (image_256res / image_512res: ViT area 224² / 448²),
    conditioning latents (size/16)², random ViT embeddings and latents (only the LLM is timed)."""
    vit_res = {p.vae_resolution: p.vit_resolution for p in PRESETS.values()}.get(size, size * 7 // 8)
    g = vit_res // 28
    hidden = m.config.llm.hidden_size
    emb = mx.array(rng.standard_normal((g * g, hidden)).astype(np.float32)).astype(m.dtype)
    cond = mx.array(rng.standard_normal((1, 1, size // 16, size // 16, 48)).astype(np.float32))
    return C.EditInputs(emb, (1, g, g), cond).sequence(INSTRUCTION_IDS, "image")


def bench_case(m, task: str, seq: Q.Sequence, warmup: int, steps: int, modes, image_cfg: float):
    shape = seq.splits[seq.noise_index].grid
    n = int(np.prod(shape))
    t_step = float(S.timesteps(30, 3.5)[0][5])  # a step inside the CFG interval: every branch runs
    x0 = mx.random.normal((n, 48), key=mx.random.key(0))
    rows, gen = [], None
    if any(md != "recompute" for md in modes):
        # keep_hidden evaluates every layer's full output: with only the last layer's K/V needed, a lazily
        # evaluated prefill of a 1-layer model would skip its attention output and MLP and scale badly.
        t0 = time.perf_counter()
        gen = m.prepare_generation(seq, cfg=True, keep_hidden=True)
        prefill = time.perf_counter() - t0
    for mode in modes:
        s_img = image_cfg if mode == "kv-cache + image CFG" else 1.0
        pre = None
        if mode != "recompute":
            t0 = time.perf_counter()
            vision = m._branch_state(seq.branch(Q.TEXT_AND_VISION)) if s_img > 1.0 else None
            pre = prefill + time.perf_counter() - t0
            ctx = replace(gen, vision=vision)
        state = {"x": x0}

        def cached():
            v = m.velocity(ctx, state["x"], t_step, 4.0, s_img).v
            state["x"] = S.euler_step(state["x"], v, 0.01)
            mx.eval(state["x"])

        def recompute():  # what a sampler without a KV cache does: every branch's whole sequence every step
            x = state["x"]
            v_c = m.velocity_uncached(seq.branch(()), x, t_step)
            v_u = m.velocity_uncached(seq.branch((Q.MODALITY_TEXT,)), x, t_step)
            v_cfg = S.cfg_combine(v_c, v_u, 4.0)
            state["x"] = S.euler_step(x, v_cfg * S.renorm_scale(v_c, v_cfg), 0.01)
            mx.eval(state["x"])

        mx.reset_peak_memory()  # the peak then counts the KV caches already held, plus the step's working set
        sec, _, cpu = timed(recompute if mode == "recompute" else cached, warmup, steps)
        rows.append(dict(task=task, shape=shape, tokens=n, ctx=seq.branch(()).context_len, mode=mode, sec=sec,
                         cpu=cpu, peak=mx.get_peak_memory(), prefill=pre))
        mx.clear_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="256,512", help="square edit sizes in pixels (comma list)")
    ap.add_argument("--t2v", default="256x17", help="text-to-video case SIZExFRAMES ('' to skip)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--layers", type=int, default=1,
                    help="decoder layers actually built (36 = full model; times and memory are scaled to 36)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1,
                    help="timed denoising steps per row (the defaults take about 5 minutes on 2 CPU cores, "
                         "--steps 2 about 7)")
    ap.add_argument("--modes", default="kv-cache,recompute,kv-cache + image CFG",
                    help="comma list of kv-cache, recompute, 'kv-cache + image CFG'")
    ap.add_argument("--image-cfg", type=float, default=1.5, help="image guidance of the 'kv-cache + image CFG' mode")
    args = ap.parse_args(argv)

    full = LanceConfig().llm.num_hidden_layers
    scale = full / args.layers
    preload = os.environ.get("LD_PRELOAD", "")
    print("# Lance edit / t2v denoising step, full-size config (hidden 2048, MLP 11008, 16/2 heads), random weights")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, {mx.default_device()}, "
          f"{args.dtype}")
    print(f"- BLAS: {'OpenBLAS via LD_PRELOAD=' + preload if 'openblas' in preload else 'MLX default (no LD_PRELOAD)'}")
    print(f"- built {args.layers} of {full} decoder layers (embeddings, lm_head and adapters full size); the "
          f"'{full} layers' columns multiply the step and prefill times by {full}/{args.layers} and add "
          f"{full - args.layers} x one layer's weight bytes to the peak memory")
    print("- one step = every CFG branch at a step inside the CFG interval (text CFG 4: conditional + "
          "instruction-dropped; '+ image CFG' adds the text-and-vision-dropped branch); "
          f"{args.warmup} warm-up + {args.steps} timed steps; wall time of the fastest, CPU time (all threads) in "
          f"brackets: it does not grow when other jobs share the machine")
    print("- kv-cache: each branch's context prefilled once, a step runs only the noise block against it; "
          "recompute: each branch's whole sequence (context + noise block, explicit sparse mask) every step")
    print("- edit N²: source and target N×N (VAE latents (N/16)²), ViT block of the paired preset (224² / 448² ⇒ "
          "64 / 256 tokens), 7-token instruction; t2v: 11-token prompt\n")
    print(f"| task | latent grid | noise tokens | context tokens | mode | s/step measured (CPU s) "
          f"| s/step {full} layers | prefill s ({full} l.) | peak GB measured | peak GB {full} layers |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    m = build(args.layers, DTYPES[args.dtype])
    extra = (full - args.layers) * layer_bytes(m)
    rng = np.random.default_rng(0)
    cases = [(f"edit {s}²", edit_sequence(m, int(s), rng)) for s in args.sizes.split(",") if s]
    if args.t2v:
        size, frames = (int(v) for v in args.t2v.split("x"))
        t = T.latent_frames(frames)
        cases.append((f"t2v {size}²×{frames}", Q.generation_sequence("t2v", PROMPT_IDS, (t, size // 16, size // 16))))
    for task, seq in cases:
        modes = [md for md in args.modes.split(",") if md and not (task.startswith("t2v") and "image" in md)]
        for r in bench_case(m, task, seq, args.warmup, args.steps, modes, args.image_cfg):
            pre = f"{r['prefill']:.2f} ({r['prefill'] * scale:.1f})" if r["prefill"] is not None else "-"
            grid = "×".join(str(v) for v in r["shape"])
            print(f"| {r['task']} | {grid} | {r['tokens']} | {r['ctx']} | {r['mode']} | {r['sec']:.2f} "
                  f"({r['cpu']:.2f}) | {r['sec'] * scale:.1f} | {pre} | {r['peak'] / 1e9:.2f} "
                  f"| {(r['peak'] + extra) / 1e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()

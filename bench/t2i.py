"""Seconds per text-to-image denoising step at full size: sequential branches vs the batched compiled step vs the
matmul floor of the same shapes, interleaved in one process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FULL_LAYERS,
    T_STEP,
    blas_line,
    build,
    dtype_words,
    floor_step,
    interleaved,
    layer_bytes,
    load_line,
    summary,
)

from lance_mlx import sampler as S  # noqa: E402
from lance_mlx import sequence as Q  # noqa: E402
from lance_mlx.cli import add_dtype_args  # noqa: E402

# "A cat holds a poster with rainbow text "STOP"" in the Qwen2.5 vocabulary
PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]
MODES = {"sequential": "previous: branches one after the other, uncompiled",
         "batched": "branches as one batch, uncompiled",
         "new": "branches as one batch, mx.compile'd (the default)",
         "floor-seq": "matmul floor of the sequential step's shapes",
         "floor-new": "matmul floor of the batched step's shapes"}


def step_cases(m, seq, modes, cfg_text: float = 4.0, cfg_image: float = 1.0, **prepare):
    """Callables of one step each (velocity at a fixed x, Euler update, evaluated) for the requested modes."""
    ctx = m.prepare_generation(seq, **prepare)
    x0 = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(0))
    rows = 1 + (cfg_text > 1.0 or cfg_image > 1.0) + (cfg_image > 1.0)

    def step(**kw):
        return lambda: mx.eval(S.euler_step(x0, m.velocity(ctx, x0, T_STEP, cfg_text, cfg_image, **kw).v, 0.01))

    make = {"sequential": lambda: step(batched=False), "batched": lambda: step(compiled=False),
            "new": lambda: step(), "floor-seq": lambda: floor_step(m, ctx.num_tokens, rows, batched=False),
            "floor-new": lambda: floor_step(m, ctx.num_tokens, rows, batched=True)}
    return ctx, {md: make[md]() for md in modes}


def first_call_seconds(cases) -> float:
    """Time of the compiled step's first call (trace + kernel build + one step), run before the timed rounds."""
    import time
    t0 = time.perf_counter()
    cases["new"]()
    return time.perf_counter() - t0


def _s(seconds: float) -> str:
    """Three significant digits: minutes-long CPU steps and millisecond GPU steps in one format."""
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.3g}"


def report(label: str, res, header: bool):
    """One table row per mode; ratios of CPU medians and of fastest walls."""
    s = {md: summary(v) for md, v in res.items()}
    if header:
        print("| case | mode | wall s min | wall s median | CPU s min | CPU s median "
              "| ÷ sequential (CPU med / wall min) | ÷ own floor (CPU med / wall min) |")
        print("|---|---|---|---|---|---|---|---|")
    for md, r in s.items():
        ref = s.get("sequential")
        floor = s.get("floor-seq" if md == "sequential" else "floor-new")
        vs_seq = f"{r['cpu_med'] / ref['cpu_med']:.2f} / {r['wall_min'] / ref['wall_min']:.2f}" \
            if ref and not md.startswith("floor") else "-"
        vs_floor = f"{r['cpu_med'] / floor['cpu_med']:.2f} / {r['wall_min'] / floor['wall_min']:.2f}" \
            if floor and not md.startswith("floor") else "-"
        print(f"| {label} | {md} | {_s(r['wall_min'])} | {_s(r['wall_med'])} | {_s(r['cpu_min'])} | "
              f"{_s(r['cpu_med'])} | {vs_seq} | {vs_floor} |", flush=True)


def header(args, what: str):
    print(f"# Lance {what} denoising step, full-size config (hidden 2048, MLP 11008, 16/2 heads), random weights")
    print(blas_line())
    print(f"- {args.layers} of {FULL_LAYERS} decoder layers built, {dtype_words(args)}; one step = every guidance "
          f"branch at t = {T_STEP} (inside the guidance interval), text CFG 4")
    first = ("the compiled step is called once before the rounds (trace + kernel build, reported)"
             if args.first_call else "round 1 of the compiled step includes its trace and kernel build")
    print(f"- modes interleaved {'/'.join(args.modes.split(','))} x {args.rounds} rounds in this process; {first}")
    for md in args.modes.split(","):
        print(f"  - {md}: {MODES[md]}")
    print("- CPU s: process CPU time, all threads (grows less than wall time when other jobs share the machine)")
    print(f"- machine at start: {load_line()}\n", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="256,512", help="square image sizes in pixels (comma list)")
    add_dtype_args(ap, "bfloat16")
    ap.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers built (36 = the full model)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every mode")
    ap.add_argument("--modes", default="sequential,new,floor-seq,floor-new", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--first-call", action="store_true",
                    help="call the compiled step once before the timed rounds (else round 1 includes its trace and "
                         "kernel build, a few seconds)")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    header(args, "text-to-image")
    m = build(args.layers, args.dtype, args.compute_dtype)
    print(f"- weights: {layer_bytes(m) * args.layers / 1e9:.2f} GB in the decoder layers\n")
    for i, size in enumerate(int(s) for s in args.sizes.split(",")):
        seq = Q.generation_sequence("t2i", PROMPT_IDS, (1, size // 16, size // 16))
        ctx, cases = step_cases(m, seq, modes)
        first = first_call_seconds(cases) if "new" in cases and args.first_call else None
        res = interleaved(cases, args.rounds, {})
        label = f"t2i {size}² ({ctx.num_tokens} + 2 noise tokens, contexts {ctx.cond.branch.context_len}/" \
                f"{ctx.uncond.branch.context_len})"
        report(label, res, i == 0)
        if first is not None:
            print(f"|  | (first compiled call: {_s(first)} s wall) |  |  |  |  |  |  |", flush=True)
        del ctx, cases
        mx.clear_cache()
    print(f"\n- machine at end: {load_line()}; peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

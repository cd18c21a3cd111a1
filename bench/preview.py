"""What a fast live preview adds to a text-to-image denoising step: the step through the sampling loop with previews
off, with `Step.preview("fast")`, and with the preview written as a PNG (what --preview does), interleaved
off/fast/file, off/fast/file, ... in one process; before them the preview alone, timed many times."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL_LAYERS, blas_line, build, dtype_words, interleaved, load_line, summary  # noqa: E402

from lance_mlx import sampler as S  # noqa: E402
from lance_mlx import sequence as Q  # noqa: E402
from lance_mlx.cli import add_dtype_args  # noqa: E402
from lance_mlx.config import SamplingParams  # noqa: E402
from lance_mlx.preview import PreviewFile, jpeg_data_url  # noqa: E402

PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]  # as bench/t2i.py


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=512, help="square image size in pixels (default 512)")
    add_dtype_args(ap, "bfloat16")
    ap.add_argument("--layers", type=int, default=2,
                    help=f"decoder layers built (default 2; {FULL_LAYERS} = the full model): fewer layers make the "
                         "step shorter, so the preview's share is an upper bound")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds of each case (default 4)")
    ap.add_argument("--repeat", type=int, default=50, help="timed calls of the preview alone (default 50)")
    args = ap.parse_args(argv)

    grid = (1, args.size // 16, args.size // 16)
    print(f"# Live preview cost at {args.size}² text-to-image, full-size config, random weights")
    print(blas_line())
    print(f"- {args.layers} of {FULL_LAYERS} decoder layers built, {dtype_words(args)}; one step = the sampling loop "
          "(sampler.denoise) for one Euler step at t = 1, text CFG 4 (both branches)")
    print(f"- cases interleaved off/fast/file x {args.rounds} rounds after one untimed step; fast = the step and its "
          "preview image, file = the step and its preview written as a PNG (--preview)")
    print(f"- machine at start: {load_line()}\n", flush=True)

    m = build(args.layers, args.dtype, args.compute_dtype)
    seq = Q.generation_sequence("t2i", PROMPT_IDS, grid)
    ctx = m.prepare_generation(seq, cfg=True)
    params = SamplingParams(steps=1)
    x0 = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(0))
    folder = Path(tempfile.mkdtemp(prefix="lance-preview-bench-"))
    write, write_jpeg = PreviewFile(folder / "preview.png"), PreviewFile(folder / "preview.jpg")

    def velocity(x, t, text_scale, image_scale):
        return m.velocity(ctx, x, t, text_scale, image_scale, params.renorm_min)

    def step():
        return next(iter(S.denoise(velocity, x0, params, grid=grid)))

    last = step()  # also the untimed first call of the step
    alone = {}
    for name, fn in (("preview (PIL image)", lambda: last.preview("fast")),
                     ("preview + PNG write", lambda: write(last)), ("preview + JPEG write", lambda: write_jpeg(last)),
                     ("server event (≤ 384 px JPEG data URL)",
                      lambda: jpeg_data_url(last.preview("fast", max_side=384)))):
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        alone[name] = statistics.median(times)
        print(f"  {name}: {1e3 * alone[name]:.2f} ms (median of {args.repeat})", file=sys.stderr, flush=True)

    cases = {"off": step, "fast": lambda: step().preview("fast"), "file": lambda: write(step())}
    res = {name: summary(v) for name, v in interleaved(cases, args.rounds, {}).items()}

    off = res["off"]
    print("| case | wall s min | wall s median | CPU s median | ÷ off (wall median / CPU median) |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['wall_min']:.3f} | {r['wall_med']:.3f} | {r['cpu_med']:.3f} | "
              f"{r['wall_med'] / off['wall_med']:.3f} / {r['cpu_med'] / off['cpu_med']:.3f} |")
    print("\n| the preview alone | median ms | share of the median step (off) |")
    print("|---|---|---|")
    for name, sec in alone.items():
        print(f"| {name} | {1e3 * sec:.2f} | {100 * sec / off['wall_med']:.2g} % |")
    print(f"\n- machine at end: {load_line()}; peak memory {mx.get_peak_memory() / 1e9:.2f} GB")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()

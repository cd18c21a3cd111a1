"""Seconds per image-edit (and text-to-video) denoising step at full size: sequential branches vs the batched
compiled step vs the matmul floor of the same shapes, interleaved in one process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL_LAYERS, build, interleaved, layer_bytes, load_line  # noqa: E402
from t2i import PROMPT_IDS, header, report, step_cases  # noqa: E402

from lance_mlx import conditioning as C  # noqa: E402
from lance_mlx import sequence as Q  # noqa: E402
from lance_mlx import tasks as T  # noqa: E402
from lance_mlx.cli import add_dtype_args  # noqa: E402
from lance_mlx.processing import PRESETS  # noqa: E402

INSTRUCTION_IDS = [8078, 279, 8251, 9850, 264, 2518, 67271]  # any 7 ids behave the same


def edit_sequence(m, size: int, rng) -> Q.Sequence:
    """Square `size` edit: ViT block at the paired preset (image_256res / image_512res: ViT area 224² / 448²),
    conditioning latents (size/16)², random ViT embeddings and latents (only the LLM is timed)."""
    vit_res = {p.vae_resolution: p.vit_resolution for p in PRESETS.values()}.get(size, size * 7 // 8)
    g = vit_res // 28
    hidden = m.config.llm.hidden_size
    emb = mx.array(rng.standard_normal((g * g, hidden)).astype(np.float32)).astype(m.dtype)
    cond = mx.array(rng.standard_normal((1, 1, size // 16, size // 16, 48)).astype(np.float32))
    return C.EditInputs(emb, (1, g, g), cond).sequence(INSTRUCTION_IDS, "image")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="256,512", help="square edit sizes in pixels (comma list)")
    ap.add_argument("--image-cfg-sizes", default="256",
                    help="sizes also run with image guidance (3 branches, image scale 1.5; '' for none)")
    ap.add_argument("--t2v", default="", help="also a text-to-video case SIZExFRAMES, e.g. 256x17")
    add_dtype_args(ap, "bfloat16")
    ap.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers built (36 = the full model)")
    ap.add_argument("--rounds", "--steps", type=int, default=2, help="interleaved rounds of every mode")
    ap.add_argument("--modes", default="sequential,new,floor-seq,floor-new",
                    help="comma list of sequential, batched, new, floor-seq, floor-new (bench/t2i.py)")
    ap.add_argument("--first-call", action="store_true", help="as bench/t2i.py")
    args = ap.parse_args(argv)
    header(args, "image-edit / text-to-video")
    print("- edit N²: source and target N×N (VAE latents (N/16)²), ViT block of the paired preset (224² / 448² ⇒ "
          "64 / 256 tokens), 7-token instruction; text CFG 4 (conditional + instruction dropped), '+ image CFG' adds "
          "the text-and-vision-dropped branch at image scale 1.5; t2v: 11-token prompt")
    m = build(args.layers, args.dtype, args.compute_dtype)
    print(f"- weights: {layer_bytes(m) * args.layers / 1e9:.2f} GB in the decoder layers\n")
    rng = np.random.default_rng(0)
    cases = []
    for s in (int(v) for v in args.sizes.split(",") if v):
        seq = edit_sequence(m, s, rng)
        cases.append((f"edit {s}²", seq, 1.0))
        if str(s) in args.image_cfg_sizes.split(","):
            cases.append((f"edit {s}² + image CFG", seq, 1.5))
    if args.t2v:
        size, frames = (int(v) for v in args.t2v.split("x"))
        grid = (T.latent_frames(frames), size // 16, size // 16)
        cases.append((f"t2v {size}²×{frames}", Q.generation_sequence("t2v", PROMPT_IDS, grid), 1.0))
    for i, (task, seq, s_img) in enumerate(cases):
        ctx, steps = step_cases(m, seq, args.modes.split(","), cfg_image=s_img, cfg=True, image_cfg=s_img > 1.0)
        if args.first_call and "new" in steps:
            steps["new"]()
        lens = "/".join(str(b.branch.context_len) for b in (ctx.cond, ctx.uncond, ctx.vision) if b is not None)
        report(f"{task} ({ctx.num_tokens} + 2 noise tokens, contexts {lens})", interleaved(steps, args.rounds, {}),
               i == 0)
        del ctx, steps
        mx.clear_cache()
    print(f"\n- machine at end: {load_line()}; peak memory {mx.get_peak_memory() / 1e9:.2f} GB")


if __name__ == "__main__":
    main()

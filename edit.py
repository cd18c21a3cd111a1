"""Image and video editing with Lance on MLX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lance_mlx.cli import PhaseTimer, add_generation_args, add_model_args, add_posterior_args, fail, step_progress
from lance_mlx.media import IMAGE_SUFFIXES
from lance_mlx.processing import PRESETS

VIDEO_OUT_SUFFIXES = (".mp4", ".mov", ".mkv", ".gif", "")
OUTPUT_FPS = 12  # upstream saves generated videos at 12 fps (inference_lance.py `save_fps`)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="image to edit")
    src.add_argument("--video", type=Path,
                     help="video to edit; sampled as upstream: 12 fps over at most 6 s, 4k+1 frames")
    p.add_argument("--instruction", required=True, help='how to change it, e.g. "make the sky pink"')
    p.add_argument("--out", required=True, type=Path,
                   help="output: an image (.png keeps the settings as metadata) for --image; .mp4, .gif or a "
                        "name without a suffix (a folder of PNG frames) for --video")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="resolution preset of the source (default image_768res for images, video_480p for "
                        "videos, as upstream); the output has the source's bucketed size")
    p.add_argument("--fps", type=float, default=OUTPUT_FPS, help=f"output video frame rate (default {OUTPUT_FPS})")
    add_generation_args(p)
    g = p.add_argument_group("edit conditioning")
    g.add_argument("--cfg-img", type=float, default=1.0,
                   help="image guidance scale; 1.0 (default) is off, exactly as upstream; above 1 enables our "
                        "three-component guidance (an extension, see docs/editing.md)")
    add_posterior_args(g, "the source")
    add_model_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    from lance_mlx import Lance
    from lance_mlx.editing import check_instruction
    from lance_mlx.media import read_video
    from lance_mlx.processing import load_image, sample_frame_indices

    is_video = args.video is not None
    suffix = args.out.suffix.lower()
    if is_video and suffix not in VIDEO_OUT_SUFFIXES:
        fail(f"--out {args.out} is not a video name: use .mp4, .gif, or a name without a suffix for PNG frames")
    if not is_video and suffix not in IMAGE_SUFFIXES:
        fail(f"--out {args.out} is not an image name: use one of {', '.join(IMAGE_SUFFIXES)}")
    if args.steps < 1:
        fail(f"--steps must be at least 1, got {args.steps}")
    try:
        check_instruction(args.instruction)
    except ValueError as e:
        fail(f"{e} (--instruction)")
    try:
        # Read the source before loading the model, so unreadable input fails in a second.
        source = read_video(args.video) if is_video else load_image(args.image)
        if is_video:
            sample_frame_indices(len(source[0]), source[1])  # too short a clip fails here
    except (ValueError, FileNotFoundError) as e:
        fail(f"cannot read the input: {e}")

    task = "video_edit" if is_video else "image_edit"
    preset = args.preset or ("video_480p" if is_video else "image_768res")
    timer = PhaseTimer()
    try:
        with timer.phase("load"):
            model = Lance.from_pretrained(args.model, task=task, dtype=args.dtype)
        progress = step_progress()

        kwargs = dict(num_steps=args.steps, cfg_scale=args.cfg, image_cfg_scale=args.cfg_img,
                      timestep_shift=args.timestep_shift, seed=args.seed, preset=preset,
                      sample_posterior=not args.posterior_mean, posterior_seed=args.posterior_seed,
                      progress=progress, decode=False, timer=timer)
        if is_video:
            frames, fps = source
            latent = model.edit_video(frames, args.instruction, fps=fps, **kwargs)
        else:
            latent = model.edit_image(source, args.instruction, **kwargs)
        meta = {"instruction": args.instruction, "source": str(args.video or args.image), "preset": preset,
                "steps": args.steps, "cfg_text": args.cfg, "cfg_img": args.cfg_img,
                "timestep_shift": args.timestep_shift, "seed": args.seed,
                "posterior": "mean" if args.posterior_mean else f"sample (seed {args.posterior_seed})",
                "model": args.model, "dtype": args.dtype, "software": "lance-mlx"}
        with timer.phase("decode + write"):
            model.save_latents(latent, args.out, fps=args.fps, metadata=meta)
    except ValueError as e:  # bad input or weights: say what is wrong and how to fix it, no traceback
        fail(str(e))

    timer.summary()
    _, t, h, w, _ = latent.shape
    what = f"{4 * (t - 1) + 1} frames at {args.fps:g} fps, " if is_video else ""
    print(f"saved {args.out} ({what}{16 * w}x{16 * h})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

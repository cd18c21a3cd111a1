"""Text-to-image, text-to-video and image-to-video with Lance on MLX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lance_mlx.cli import (PhaseTimer, add_generation_args, add_model_args, add_posterior_args, add_size_args, fail,
                           resolve_size, step_progress)
from lance_mlx.config import LanceConfig, build_lance_config  # noqa: F401  (seed API: importable from here)
from lance_mlx.media import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".gif", "")
# Size presets when --width/--height are not given: t2i 1:1 at 768² (upstream README), video the video_480p
# 16:9 bucket 848x480 (the README's t2v size).
IMAGE_ASPECT, IMAGE_RESOLUTION = "1:1", 768
VIDEO_ASPECT, VIDEO_RESOLUTION = "16:9", 640


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", required=True, help="what to generate")
    p.add_argument("--out", required=True, type=Path,
                   help="output: an image (.png keeps the settings as metadata) for one frame; .mp4, .gif or a "
                        "name without a suffix (a folder of PNG frames) for a video")
    add_size_args(p)
    # None = pick by output kind (image 1:1 at 768, video 16:9 at 640)
    p.set_defaults(aspect=None, resolution=None)
    v = p.add_argument_group("video")
    v.add_argument("--frames", type=int, default=1,
                   help="frames to generate: 1 = an image (default); 4k+1 up to 121 = a video (t2v); default "
                        f"video size {VIDEO_ASPECT} at {VIDEO_RESOLUTION}² = 848x480")
    v.add_argument("--fps", type=float, default=12, help="output video frame rate (default 12, as upstream)")
    v.add_argument("--image", type=Path,
                   help="first frame: image-to-video; the video takes the image's size bucketed to about "
                        f"RESOLUTION² pixels (default {VIDEO_RESOLUTION}, upstream's video_480p)")
    add_posterior_args(v, "the first frame (also seeds its pixel noise)")
    add_generation_args(p)
    add_model_args(p)
    return p.parse_args(argv)


def _check_output(args, is_video: bool) -> None:
    suffix = args.out.suffix.lower()
    if is_video and suffix not in VIDEO_SUFFIXES:
        fail(f"--out {args.out} is not a video name: use .mp4, .gif, or a name without a suffix for PNG frames")
    if not is_video and suffix not in IMAGE_SUFFIXES:
        hint = " (or pass --frames 5 or more for a video)" if suffix in VIDEO_SUFFIXES else ""
        fail(f"--out {args.out} is not an image name: use one of {', '.join(IMAGE_SUFFIXES)}{hint}")


def main(argv=None) -> int:
    args = parse_args(argv)

    from lance_mlx import Lance
    from lance_mlx.editing import latent_frames
    from lance_mlx.pipelines import check_image_size
    from lance_mlx.processing import Preset, load_image

    if not args.prompt.strip():
        fail("the prompt is empty; describe what to generate with --prompt")
    if args.steps < 1:
        fail(f"--steps must be at least 1, got {args.steps}")
    i2v = args.image is not None
    config = LanceConfig()
    try:
        latent_frames(args.frames, config.max_latent_frames, "--frames")
    except ValueError as e:
        fail(str(e))
    if i2v and args.frames < 5:
        fail(f"image-to-video needs --frames 5 or more (4k+1: 5, 9, ..., 121), got {args.frames}")
    is_video = args.frames > 1
    _check_output(args, is_video)
    image = None
    preset = None
    if i2v:
        if args.width is not None or args.height is not None:
            fail("image-to-video takes its size from --image (bucketed to about RESOLUTION² pixels, as upstream); "
                 "drop --width/--height")
        try:
            image = load_image(args.image)
        except (ValueError, FileNotFoundError) as e:
            fail(f"cannot read --image: {e}")
        res = args.resolution or VIDEO_RESOLUTION
        if res < 16:
            fail(f"--resolution must be at least 16, got {res}")
        # only the VAE branch of a preset is used for the first frame
        preset = Preset(f"{res}px", res, res)
        width = height = None
        task = "i2v"
    else:
        args.aspect = args.aspect or (VIDEO_ASPECT if is_video else IMAGE_ASPECT)
        args.resolution = args.resolution or (VIDEO_RESOLUTION if is_video else IMAGE_RESOLUTION)
        width, height = resolve_size(args)
        try:
            check_image_size(width, height, config)
        except ValueError as e:
            fail(str(e))
        task = "t2v" if is_video else "t2i"

    timer = PhaseTimer()
    try:
        with timer.phase("load"):
            model = Lance.from_pretrained(args.model, task=task, dtype=args.dtype)
        progress = step_progress()

        common = dict(num_steps=args.steps, cfg_scale=args.cfg, timestep_shift=args.timestep_shift, seed=args.seed,
                      progress=progress, decode=False)
        if is_video:
            first = dict(image=image, preset=preset, sample_posterior=not args.posterior_mean,
                         posterior_seed=args.posterior_seed) if i2v else {}
            latent = model.generate_video(args.prompt, num_frames=args.frames, width=width, height=height,
                                          timer=timer, **first, **common)
        else:
            with timer.phase(f"denoise {args.steps} steps"):
                latent = model.generate_image(args.prompt, width=width, height=height, **common)
        _, t, h, w, _ = latent.shape
        meta = {"prompt": args.prompt, "width": 16 * w, "height": 16 * h, "steps": args.steps, "cfg": args.cfg,
                "timestep_shift": args.timestep_shift, "seed": args.seed, "model": args.model, "dtype": args.dtype,
                "software": "lance-mlx"}
        if is_video:
            meta.update(frames=args.frames, fps=args.fps)
        if i2v:
            meta.update(image=str(args.image), resolution=preset.vae_resolution,
                        posterior="mean" if args.posterior_mean else f"sample (seed {args.posterior_seed})")
        with timer.phase("decode + write"):
            model.save_latents(latent, args.out, fps=args.fps, metadata=meta)
    except ValueError as e:  # bad input or weights: say what is wrong and how to fix it, no traceback
        fail(str(e))

    timer.summary()
    what = f"{args.frames} frames at {args.fps:g} fps, " if is_video else ""
    print(f"saved {args.out} ({what}{16 * w}x{16 * h})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

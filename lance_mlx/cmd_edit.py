"""Image and video editing with Lance on MLX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import (
    add_model_args,
    add_output_args,
    add_posterior_args,
    add_preview_args,
    add_sampling_args,
    main_guard,
    posterior_from_args,
    sampling_from_args,
)
from .config import OUTPUT_FPS
from .distributed import add_parallel_args, generate_to_file, run_prompts
from .media import check_output
from .processing import PRESETS
from .tasks import IMAGE_EDIT_PRESET, VIDEO_PRESET, ImageEdit, VideoEdit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", type=Path, help="image to edit")
    src.add_argument("--video", type=Path,
                     help="video to edit; sampled as upstream: 12 fps over at most 6 s, 4k+1 frames")
    p.add_argument("--instruction", help='how to change it, e.g. "make the sky pink" (or --prompts-file)')
    add_output_args(p, "output: an image (.png keeps the settings as metadata) for --image; .mp4, .gif or a name "
                       "without a suffix (a folder of PNG frames) for --video")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="resolution preset of the source (default image_768res for images, video_480p for "
                        "videos, as upstream); the output has the source's bucketed size")
    p.add_argument("--fps", type=float, default=OUTPUT_FPS,
                   help=f"output video frame rate (default {OUTPUT_FPS:g})")
    add_sampling_args(p, image_guidance=True)
    g = p.add_argument_group("edit conditioning")
    add_posterior_args(g, "the source")
    add_preview_args(p)
    add_parallel_args(p, "instruction")
    add_model_args(p)
    return p.parse_args(argv)


def build_request(args):

    sampling, posterior = sampling_from_args(args), posterior_from_args(args)
    if args.video is not None:
        return VideoEdit(args.video, args.instruction, args.preset or VIDEO_PRESET, fps=args.fps, sampling=sampling,
                         posterior=posterior, source=str(args.video), negative_prompt=args.negative_prompt)
    return ImageEdit(args.image, args.instruction, args.preset or IMAGE_EDIT_PRESET, sampling, posterior,
                     source=str(args.image), negative_prompt=args.negative_prompt)


def run(args) -> int:
    return run_prompts(args, run_one, "instruction", check_one)


def check_one(args):
    """(checked output path, request) of one item: what is refused before any model loads."""
    video = args.video is not None
    out = check_output(args.out, ("video", "frames") if video else ("image",), force=args.force)
    return out, build_request(args)


def run_one(args) -> int:
    out, request = check_one(args)
    meta = {"instruction": args.instruction, "source": request.source, "preset": request.preset.name,
            "posterior": request.posterior.describe()}
    if request.negative_prompt:
        meta["negative_prompt"] = request.negative_prompt
    generate_to_file(args, request, out, "encode source (ViT + VAE)", meta)
    return 0


def main(argv=None) -> int:
    return main_guard(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

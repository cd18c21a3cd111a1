"""Text-to-image, text-to-video and image-to-video with Lance on MLX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli
from .cli import (
    add_model_args,
    add_output_args,
    add_posterior_args,
    add_preview_args,
    add_sampling_args,
    add_size_args,
    main_guard,
    posterior_from_args,
    resolve_size,
    sampling_from_args,
)
from .config import OUTPUT_FPS
from .distributed import add_parallel_args, generate_to_file, run_prompts, world
from .enhance import add_enhance_args, check_run, enhance_for_run, enhancer_from_args
from .errors import InvalidRequestError
from .media import check_output
from .tasks import I2V_RESOLUTION, MAX_FRAMES, ImageToVideo, TextToImage, TextToVideo

# Size presets when --width/--height are not given: t2i 1:1 at 768² (upstream README), video the video_480p 16:9
# bucket 848x480 (the README's t2v size).
IMAGE_ASPECT, IMAGE_RESOLUTION = "1:1", 768
VIDEO_ASPECT, VIDEO_RESOLUTION = "16:9", I2V_RESOLUTION


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt", help="what to generate (or --prompts-file)")
    add_output_args(p, "output: an image (.png keeps the settings as metadata) for one frame; .mp4, .gif or a name "
                       "without a suffix (a folder of PNG frames) for a video")
    add_size_args(p)
    v = p.add_argument_group("video")
    v.add_argument("--frames", type=int, default=1,
                   help=f"frames to generate: 1 = an image (default); 4k+1 up to {MAX_FRAMES} = a video (t2v); "
                        f"default video size {VIDEO_ASPECT} at {VIDEO_RESOLUTION}² = 848x480")
    v.add_argument("--fps", type=float, default=OUTPUT_FPS,
                   help=f"output video frame rate (default {OUTPUT_FPS:g}, as upstream)")
    v.add_argument("--image", type=Path,
                   help="first frame: image-to-video; the video takes the image's size bucketed to about "
                        f"RESOLUTION² pixels (default {VIDEO_RESOLUTION}, upstream's video_480p)")
    add_posterior_args(v, "the first frame (also seeds its pixel noise)")
    add_sampling_args(p)
    add_enhance_args(p)
    add_preview_args(p)
    add_parallel_args(p, "prompt")
    add_model_args(p)
    return p.parse_args(argv)


def build_request(args):
    """The task request of the command line (every value checked here, before any model loads)."""

    sampling = sampling_from_args(args)
    if args.image is not None:
        if args.width is not None or args.height is not None:
            raise InvalidRequestError("image-to-video takes its size from --image (bucketed to about RESOLUTION² "
                                      "pixels, as upstream); drop --width/--height")
        if args.frames < 5:
            raise InvalidRequestError(f"image-to-video needs --frames 5 or more (4k+1: 5, 9, ..., {MAX_FRAMES}), "
                                      f"got {args.frames}")
        resolution = VIDEO_RESOLUTION if args.resolution is None else args.resolution
        return ImageToVideo(args.prompt, args.image, args.frames, resolution, args.fps,
                            sampling, posterior_from_args(args), source=str(args.image),
                            negative_prompt=args.negative_prompt)
    video = args.frames != 1
    aspect = args.aspect or (VIDEO_ASPECT if video else IMAGE_ASPECT)
    default_resolution = VIDEO_RESOLUTION if video else IMAGE_RESOLUTION
    width, height = resolve_size(args, aspect, default_resolution if args.resolution is None else args.resolution)
    if video:
        return TextToVideo(args.prompt, args.frames, width, height, args.fps, sampling, args.negative_prompt)
    return TextToImage(args.prompt, width, height, sampling, args.negative_prompt)


def run(args) -> int:
    return run_prompts(args, run_one, "prompt", check_one)


def check_one(args):
    """(checked output path, request) of one item: what is refused before any model loads."""
    video = args.frames != 1 or args.image is not None
    out = check_output(args.out, ("video", "frames") if video else ("image",), force=args.force)
    return out, build_request(args)


def run_one(args) -> int:
    out, request = check_one(args)
    enhancer = enhancer_from_args(args)
    meta = {"prompt": args.prompt}
    if request.negative_prompt:
        meta["negative_prompt"] = request.negative_prompt
    if request.task == "i2v":
        meta.update(image=request.source, resolution=request.resolution, posterior=request.posterior.describe())
    phase = "encode first frame (VAE)" if request.task == "i2v" else "prepare"
    if enhancer is None:
        generate_to_file(args, request, out, phase, meta)
        return 0
    batch_item = getattr(args, "batch_item", False)
    check_run(enhancer, request.task, world().size() > 1 and not batch_item, batch_item)
    if not enhancer.needs_model:  # an endpoint rewrites before anything loads
        generate_to_file(args, enhance_for_run(enhancer, request, meta), out, phase, meta)
        return 0
    def rewrite(pipe, req):
        req = enhance_for_run(enhancer, req, meta, pipe)
        if req.task == "i2v":  # the ViT only showed the frame to the rewriter: free it before denoising
            pipe.vit = None
            pipe.release()
        return req

    cli.generate_to_file(args, request, out, phase, meta, load=_load_for_enhancement, rewrite=rewrite)
    return 0


def _load_for_enhancement(args, request):
    """The pipeline of a run the checkpoint enhances: image-to-video also loads the ViT, to show it the image."""
    from .pipeline import LancePipeline

    task = "video_edit" if request.task == "i2v" else request.task  # same checkpoint, with the ViT
    return LancePipeline.from_pretrained(args.model, task=task, request=request, **cli.pipeline_options(args))


def main(argv=None) -> int:
    return main_guard(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

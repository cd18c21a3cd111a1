"""The video part of `lance-mlx-train`: the clip options, their checks, the video items' features, and validation
videos / answers of the video tasks (t2v, i2v, video-edit, v2t)."""

from __future__ import annotations

from pathlib import Path
from typing import List

from ..errors import InvalidRequestError
from . import video_data as V
from . import video_examples as VE

PIPELINE_TASK = {"t2v": "t2v", "i2v": "i2v", "video-edit": "video_edit", "v2t": "x2t_video"}


def add_video_args(p) -> None:
    g = p.add_argument_group("video tasks (t2v, i2v, video-edit, v2t)")
    g.add_argument("--num-frames", type=int, default=V.DEFAULT_NUM_FRAMES,
                   help=f"at most this many frames per clip, 4k+1 (default {V.DEFAULT_NUM_FRAMES}; upstream's 6 s at "
                        f"12 fps is 69, its v2t 2 s gives 21); shorter videos give fewer, as upstream's sampler")
    g.add_argument("--fps", type=int, default=V.SAMPLE_FPS,
                   help=f"frames per second sampled from each video (default {V.SAMPLE_FPS}, upstream's)")
    g.add_argument("--ff2v-rate", type=float, default=V.FF2V_RATE,
                   help=f"t2v: share of first-frame-to-video samples (default {V.FF2V_RATE}, upstream's t2v config; "
                        f"--task i2v trains on those alone)")


def default_resolution(task: str, image_default: int) -> int:
    return V.DEFAULT_VIDEO_RESOLUTION if task in V.VIDEO_TASKS else image_default


def check_video_args(args) -> None:
    V.check_clip_settings(args.num_frames, args.fps)
    if not 0.0 <= args.ff2v_rate <= 1.0:
        raise InvalidRequestError(f"ff2v_rate must be in [0, 1], got {args.ff2v_rate}", param="ff2v_rate")
    if args.task in ("video-edit", "v2t"):  # found now, not at the first validation after hours of training
        for p in args.validation_image:
            if p.suffix.lower() not in V.VIDEO_SUFFIXES:
                raise InvalidRequestError(f"{args.task} validates on videos ({', '.join(V.VIDEO_SUFFIXES)}); "
                                          f"{p} is not one", param="validation_image")
    elif args.task == "i2v":
        for p in args.validation_image:
            if p.suffix.lower() in V.VIDEO_SUFFIXES:
                raise InvalidRequestError(f"i2v validates on a first-frame image, not the video {p}",
                                          param="validation_image")


def clip_settings(args) -> V.ClipSettings:
    return V.ClipSettings(args.task, args.num_frames, args.fps)


def vit_resolution(args) -> int:
    return args.vit_resolution or V.VIDEO_VIT_FOR.get(args.resolution, args.resolution // 28 * 28)


def features(args, pipe, cache_dir: Path, vit_res: int, items, bar) -> List[VE.VideoFeatures]:
    return VE.cache_features(items, pipe, clip_settings(args), cache_dir, args.resolution, vit_res,
                             lambda i, n: bar.update(1))


def make_validation(pipe, args):
    """Validation outputs of one step: fixed prompts and seeds, through the pipeline like any generation (t2v /
    i2v / video-edit: an .mp4 of --num-frames frames; v2t: the answer as .txt)."""
    from ..config import SamplingParams
    from ..media import save_video
    from ..processing import Preset

    folder = args.out / "validation"
    preset = Preset("training", args.resolution, vit_resolution(args))  # the training buckets

    def run(step: int) -> List[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, prompt in enumerate(args.validation_prompt):
            sampling = SamplingParams(steps=args.validation_steps, seed=args.validation_seed + k)
            media = None if args.task == "t2v" else str(args.validation_image[k])
            path = folder / f"step_{step:07d}_{k}.{'txt' if args.task == 'v2t' else 'mp4'}"
            if args.task == "v2t":
                path.write_text(pipe.understand(media, prompt, preset=preset) + "\n")
                paths.append(path)
                continue
            if args.task == "t2v":
                frames = pipe.generate_video(prompt, args.num_frames, width=args.resolution, height=args.resolution,
                                             sampling=sampling)
            elif args.task == "i2v":
                frames = pipe.generate_video(prompt, args.num_frames, image=media, sampling=sampling,
                                             resolution=args.resolution)
            else:
                frames = pipe.edit_video(media, prompt, sampling, preset=preset)
            save_video(list(frames), path, fps=args.fps)
            paths.append(path)
        return paths

    return run


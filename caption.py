"""Image and video understanding with Lance on MLX: describe an image/video or answer a question about it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lance_mlx.cli import PhaseTimer, add_model_args, add_seed_arg, fail


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="input image (png, jpg, webp, ...)")
    src.add_argument("--video", type=Path, help="input video (mp4, mov, mkv, webm, gif)")
    p.add_argument("--question", default=None,
                   help="question about the input (default: none, the model describes it with upstream's first "
                        "caption prompt 'Generate a detailed and accurate description of the image/video ...')")
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=256, help="most answer tokens (default 256, as upstream)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy, upstream's default; > 0 samples (vLLM-Omni's example uses 0.8)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    add_seed_arg(g)
    g.add_argument("--preset", default=None,
                   help="input resolution preset (default image_768res for images, video_480p for videos)")
    add_model_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_tokens <= 0:
        fail(f"--max-tokens must be a positive number of tokens, got {args.max_tokens}")
    if args.temperature < 0:
        fail(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        fail(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.question is not None and not args.question.strip():
        fail("--question is empty; leave it out to get a description")

    from lance_mlx import Lance
    from lance_mlx.media import read_video
    from lance_mlx.processing import PRESETS, load_image, sample_frame_indices

    if args.preset is not None and args.preset not in PRESETS:
        fail(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    # Read and check the input before loading the model, so a bad file fails in a second.
    fps = None
    try:
        if args.image is not None:
            visual, task = load_image(args.image), "x2t_image"
        else:
            visual, fps = read_video(args.video)
            sample_frame_indices(len(visual), fps)
            task = "x2t_video"
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))

    timer = PhaseTimer()
    try:
        with timer.phase("load"):
            model = Lance.from_pretrained(args.model, task=task, dtype=args.dtype)
        stream = model.understand(visual, args.question, max_tokens=args.max_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, stream=True, preset=args.preset, fps=fps)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (ValueError, FileNotFoundError) as e:  # bad input or weights: say what to fix, no traceback
        fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    sys.stdout.write("\n")
    r = stream.result
    print(f"[prompt] {r.prompt_tokens} tokens in {r.prompt_seconds:.2f} s (ViT {r.vision_seconds:.2f} s, "
          f"{r.prompt_tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    print(f"[generate] {r.generated_tokens} tokens, {r.tokens_per_second:.2f} tokens/s, stopped by "
          f"{'<|im_end|>' if r.finish_reason == 'stop' else 'max tokens'}, peak memory {r.peak_memory_gb:.2f} GB",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Image and video understanding with Lance on MLX: describe an image/video or answer a question about it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import PhaseTimer, add_model_args, add_seed_arg, main_guard, pipeline_options
from .config import MAX_ANSWER_TOKENS
from .media import SOFTWARE, check_sidecar, save_metadata_json
from .memory_estimate import check_before_loading
from .pipeline import LancePipeline
from .processing import PRESETS
from .tasks import Understand


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=Path, help="input image (png, jpg, webp, ...)")
    src.add_argument("--video", type=Path, help="input video (mp4, mov, mkv, webm, gif)")
    p.add_argument("--question", default=None,
                   help="question about the input (default: none, the model describes it with upstream's first "
                        "caption prompt 'Generate a detailed and accurate description of the image/video ...')")
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=MAX_ANSWER_TOKENS,
                   help=f"most answer tokens (default {MAX_ANSWER_TOKENS}, as upstream)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy, upstream's default; > 0 samples (vLLM-Omni's example uses 0.8)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    add_seed_arg(g, default=0)
    g.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="input resolution preset (default image_768res for images, video_480p for videos)")
    o = p.add_argument_group("output")
    o.add_argument("--metadata-json", type=Path, default=None, metavar="PATH",
                   help="also write the answer with its question, input and settings as JSON to PATH")
    o.add_argument("--force", action="store_true", help="replace an earlier --metadata-json file of lance-mlx")
    add_model_args(p)
    return p.parse_args(argv)


def run(args) -> int:

    media = args.video if args.video is not None else args.image
    request = Understand(media, args.question, video=args.video is not None, preset=args.preset,
                         max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         source=str(media))
    sidecar = None if args.metadata_json is None else check_sidecar(args.metadata_json, force=args.force)
    check_before_loading(args, request)
    timer = PhaseTimer()
    with timer.phase("load"):
        pipe = LancePipeline.from_pretrained(args.model, request=request, **pipeline_options(args))
    stream = pipe.answer(request)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    r = stream.result
    print(f"[prompt] {r.prompt_tokens} tokens in {r.prompt_seconds:.2f} s (ViT {r.vision_seconds:.2f} s, "
          f"{r.prompt_tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    print(f"[generate] {r.generated_tokens} tokens, {r.tokens_per_second:.2f} tokens/s, stopped by "
          f"{'<|im_end|>' if r.finish_reason == 'stop' else 'max tokens'}, peak memory {r.peak_memory_gb:.2f} GB",
          file=sys.stderr)
    if sidecar is not None:
        save_metadata_json({"answer": r.text, "question": args.question, "input": str(media),
                            "task": request.task, "max_tokens": args.max_tokens, "temperature": args.temperature,
                            "top_p": args.top_p, "seed": args.seed, "finish_reason": r.finish_reason,
                            "model": args.model, "dtype": args.dtype, "software": SOFTWARE},
                           sidecar, replace=args.force)
    return 0


def main(argv=None) -> int:
    return main_guard(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

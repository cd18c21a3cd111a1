"""Convert the upstream Lance checkpoint (hub layout, local folder or repo id) to one MLX folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoints import UPSTREAM_REPO
from .cli import main_guard
from .conversion import ConversionOptions, check_destination, check_options, convert
from .errors import LanceError, WeightsError, WriteError
from .lora import check_lora_args
from .quantize import QUANT_EXPERTS

EPILOG = """examples:
  python convert.py --out lance-3b-bf16                        # image checkpoint from the hub, bfloat16
  python convert.py --video --out lance-3b-video-bf16           # video checkpoint (bundled ViT)
  python convert.py --model ~/Lance --out lance-3b-q8 --quantize 8 --quantize-experts und

Quantizing the generation expert (--quantize-experts all|gen) visibly costs image detail; bfloat16 is the default.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--model", default=UPSTREAM_REPO,
                     help=f"upstream folder (with Lance_3B/, Qwen2.5-VL-ViT/, Wan2.2_VAE.pth) or hub repo id "
                          f"(default {UPSTREAM_REPO}; downloads only the files a conversion needs, resumable)")
    src.add_argument("--video", action="store_true", help="convert Lance_3B_Video instead of Lance_3B")
    out = p.add_argument_group("output")
    out.add_argument("--out", "-o", required=True, type=Path, help="destination folder")
    out.add_argument("--dtype", default="bfloat16", help="LLM and ViT dtype: float32, bfloat16 (default), float16")
    out.add_argument("--vae-dtype", default="float32", help="VAE dtype: float32 (default) or bfloat16")
    out.add_argument("--force", action="store_true",
                     help="replace the destination if it is an earlier output of convert.py (any other existing "
                          "folder is left alone)")
    q = p.add_argument_group("quantization (LLM linear layers only)")
    q.add_argument("--quantize", type=int, metavar="BITS", help="quantize to 4 or 8 bits (default: no)")
    q.add_argument("--group-size", type=int, default=64, help="quantization group size: 32, 64 (default), 128")
    q.add_argument("--quantize-experts", default="all", choices=QUANT_EXPERTS,
                   help="which expert's linears: all (default), und (understanding), gen (generation, *_moe_gen)")
    out.add_argument("--fuse-lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="fold a LoRA adapter into the LLM weights (before any quantization); repeatable "
                          "(docs/training.md)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p.parse_args(argv)


def conversion_options(args: argparse.Namespace) -> ConversionOptions:
    """The options of a parsed command line, checked (dtypes, quantization, destination) before anything is read
    or downloaded; a bad one raises its `LanceError`."""
    options = ConversionOptions(video=args.video, dtype=args.dtype, vae_dtype=args.vae_dtype, quantize=args.quantize,
                                group_size=args.group_size, experts=args.quantize_experts, force=args.force,
                                fuse_lora=tuple(check_lora_args(args.fuse_lora)))
    check_options(options)
    check_destination(args.out, args.force)
    return options


def run(args: argparse.Namespace) -> int:
    options = conversion_options(args)
    try:
        dest = convert(args.model, args.out, options=options)
    except LanceError:
        raise
    except ValueError as e:  # a reader below (numpy, safetensors) refusing a malformed source file
        raise WeightsError(str(e)) from None
    except OSError as e:  # e.g. the disk filled up while writing; the temporary folder is already removed
        raise WriteError(f"conversion failed, {args.out} was left unchanged: {e}") from None
    print(f"wrote {dest}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Ctrl-C and SIGTERM leave the destination unchanged (the staging folder is removed), see cli.main_guard."""
    return main_guard(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`lance-mlx-train` / train.py: LoRA fine-tuning of Lance on a folder of images (t2i, image edit, image
understanding) or videos (t2v, i2v, video edit, video understanding) with upstream's objective (docs/training.md)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from ..checkpoints import UPSTREAM_REPO
from ..cli import add_dtype_args, main_guard
from ..errors import InputNotFoundError, InvalidRequestError, OutputError
from . import data as D
from . import loop
from . import video_cli as VC
from . import video_data as V

PIPELINE_TASK = {"t2i": "t2i", "edit": "image_edit", "i2t": "x2t_image", **VC.PIPELINE_TASK}
# LoRA targets: the generation expert for image outputs, the understanding expert for text answers.
DEFAULT_TARGETS = {"t2i": "*.self_attn.[qkvo]_proj_moe_gen,*.mlp_moe_gen.*_proj",
                   "edit": "*.self_attn.[qkvo]_proj_moe_gen,*.mlp_moe_gen.*_proj",
                   "i2t": "*.self_attn.[qkvo]_proj,*.mlp.*_proj"}
DEFAULT_TARGETS.update({"t2v": DEFAULT_TARGETS["t2i"], "i2v": DEFAULT_TARGETS["t2i"],
                        "video-edit": DEFAULT_TARGETS["edit"], "v2t": DEFAULT_TARGETS["i2t"]})
# Upstream's ViT input sizes per VAE resolution (config/train_local/i2i_local.yaml: 768 -> 672; processing.PRESETS).
VIT_FOR = {256: 224, 512: 448, 768: 672}

EPILOG = """examples:
  lance-mlx-train --data my_style/ --out runs/style --steps 1000 --validation-prompt "a lighthouse at dusk"
  lance-mlx-train --task edit --data pairs/ --out runs/edit --resolution 512
  lance-mlx-train --data my_style/ --out runs/style --resume          # continue the latest checkpoint
  lance-mlx-train --task t2v --data clips/ --out runs/clips --num-frames 17     # NAME.mp4 + NAME.txt
then: python inference.py --prompt "..." --lora runs/style --out out.png
"""


def parse_args(argv=None) -> argparse.Namespace:
    S = loop.Settings()
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, type=Path,
                   help="folder of images + same-named .txt (edit: NAME.png, NAME_target.png, NAME.txt; video tasks: "
                        "videos), a JSONL manifest or an upstream-format .parquet file (docs/training.md)")
    d.add_argument("--task", default="t2i", choices=D.TASKS + V.VIDEO_TASKS,
                   help="t2i (default), edit, i2t (image understanding), t2v, i2v, video-edit or v2t (video "
                        "understanding)")
    d.add_argument("--resolution", type=int,
                   help=f"training area resolution² in aspect buckets (default {S.resolution}, video tasks "
                        f"{V.DEFAULT_VIDEO_RESOLUTION}; upstream trains images at 768, videos at 640)")
    d.add_argument("--vit-resolution", type=int, help="ViT input resolution of edit / i2t (default: upstream's for "
                                                      "--resolution; i2t 616 at 768)")
    d.add_argument("--cache-dir", type=Path, help="where the VAE latents / ViT features go (default OUT/cache)")
    o = p.add_argument_group("run")
    o.add_argument("--out", required=True, type=Path, help="run folder: adapter, checkpoints, loss.jsonl, validation/")
    o.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from a checkpoint folder (default: the latest in OUT/checkpoints)")
    o.add_argument("--steps", type=int, default=S.steps, help=f"optimizer steps (default {S.steps})")
    o.add_argument("--save-every", type=int, default=S.save_every, help=f"checkpoint interval (default {S.save_every})")
    o.add_argument("--seed", type=int, default=S.seed, help="seed of the data order, noise and timesteps")
    v = p.add_argument_group("validation")
    v.add_argument("--validate-every", type=int, default=0, help="make validation outputs every N steps (0: never)")
    v.add_argument("--validation-prompt", action="append", default=[],
                   help="prompt (t2i), instruction (edit) or question (i2t); repeatable")
    v.add_argument("--validation-image", action="append", default=[], type=Path,
                   help="source image per validation prompt (edit, i2t; i2v: the first frame); a video for "
                        "video-edit and v2t")
    v.add_argument("--validation-steps", type=int, default=20, help="denoising steps of validation images (20)")
    v.add_argument("--validation-seed", type=int, default=42, help="seed of validation image k is this + k (42)")
    t = p.add_argument_group("optimization")
    t.add_argument("--batch-size", type=int, default=S.batch_size, help="items per micro-batch, one aspect bucket")
    t.add_argument("--grad-accum", type=int, default=S.grad_accum, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=S.lr, help=f"peak learning rate (default {S.lr:g}, upstream's)")
    t.add_argument("--min-lr", type=float, default=S.min_lr, help=f"end of the cosine (default {S.min_lr:g})")
    t.add_argument("--warmup", type=int, default=S.warmup, help=f"linear warm-up steps (default {S.warmup})")
    t.add_argument("--schedule", default=S.schedule, choices=("cosine", "constant"), help="after warm-up")
    t.add_argument("--max-grad-norm", type=float, default=S.max_grad_norm, help="gradient clipping (upstream 1.0)")
    t.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="keep every layer's activations (faster, much more memory)")
    t.add_argument("--text-drop", type=float, default=S.text_drop, help="caption drop probability for CFG (0.1)")
    t.add_argument("--vision-drop", type=float, default=S.vision_drop, help="edit: source drop probability (0.1)")
    t.add_argument("--timestep-shift", type=float, default=S.timestep_shift, help="upstream's 4.0")
    r = p.add_argument_group("LoRA")
    r.add_argument("--rank", type=int, default=S.rank, help=f"adapter rank (default {S.rank})")
    r.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, i.e. scale 1)")
    r.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    r.add_argument("--targets", help="comma-separated glob patterns of layer paths (default: the generation expert's "
                                     "attention and MLP projections; i2t: the understanding expert's)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=UPSTREAM_REPO, help=f"model folder or hub repo id (default {UPSTREAM_REPO})")
    add_dtype_args(m)
    m.add_argument("--quantize", type=int, choices=(4, 8), help="quantize the frozen base LLM (QLoRA-style)")
    m.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    VC.add_video_args(p)
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = VC.default_resolution(args.task, S.resolution)
    return args


def settings_from_args(args) -> loop.Settings:
    """Checked settings of the command line (every value, before anything loads)."""
    def positive(name, value, low=1):
        if value < low:
            raise InvalidRequestError(f"{name} must be at least {low}, got {value}", param=name)

    for name in ("steps", "batch_size", "grad_accum", "rank", "save_every"):
        positive(name, getattr(args, name))
    for name in ("warmup", "validate_every"):
        positive(name, getattr(args, name), 0)
    for name in ("text_drop", "vision_drop", "dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise InvalidRequestError(f"{name} must be in [0, 1), got {getattr(args, name)}", param=name)
    if not args.lr > 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise InvalidRequestError(f"need 0 <= min_lr <= lr and lr > 0, got lr {args.lr}, min_lr {args.min_lr}",
                                  param="lr")
    if args.resolution % 16 or not 128 <= args.resolution <= 1024:
        raise InvalidRequestError(f"resolution must be a multiple of 16 in [128, 1024], got {args.resolution}",
                                  param="resolution")
    if args.timestep_shift <= 0:
        raise InvalidRequestError("timestep_shift must be positive", param="timestep_shift")
    VC.check_video_args(args)
    targets = [t.strip() for t in (args.targets or DEFAULT_TARGETS[args.task]).split(",") if t.strip()]
    return loop.Settings(task=args.task, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, schedule=args.schedule,
                         max_grad_norm=args.max_grad_norm, rank=args.rank,
                         alpha=float(args.alpha if args.alpha is not None else args.rank), dropout=args.dropout,
                         targets=targets, seed=args.seed, checkpointing=args.checkpointing, text_drop=args.text_drop,
                         vision_drop=args.vision_drop, timestep_shift=args.timestep_shift, save_every=args.save_every,
                         validate_every=args.validate_every, resolution=args.resolution,
                         ff2v_rate=1.0 if args.task == "i2v" else args.ff2v_rate, num_frames=args.num_frames,
                         fps=args.fps)


def vit_resolution(args) -> int:
    if args.task in V.VIDEO_TASKS:
        return VC.vit_resolution(args)
    if args.vit_resolution:
        return args.vit_resolution
    if args.task == "i2t" and args.resolution == 768:
        return D.I2T_VIT_RESOLUTION
    return VIT_FOR.get(args.resolution, args.resolution // 28 * 28)


def check_run_folder(args) -> Optional[Path]:
    """The checkpoint to resume from (None for a new run); refuses a folder that holds anything else."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the run", param="out")
    if args.resume:
        ckpt = loop.latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
        if ckpt is None or not (ckpt / loop.STATE).is_file():
            raise InputNotFoundError(f"no checkpoint to resume from ({args.resume}); checkpoints are "
                                     f"{out / loop.CHECKPOINTS}/step_NNNNNNN", param="resume")
        return ckpt
    if out.is_dir() and any(out.iterdir()):
        own = (out / loop.LOSS_LOG).exists() or (out / loop.CHECKPOINTS).exists()
        hint = "pass --resume to continue it or" if own else "it holds other files;"
        raise OutputError(f"--out {out} is not empty: {hint} choose a new folder", param="out")
    return None


def check_resume(ckpt: Path, settings: loop.Settings) -> None:
    saved = json.loads((ckpt / loop.STATE).read_text())["settings"]
    for k in ("task", "rank", "alpha", "targets", "batch_size", "grad_accum", "seed"):
        if saved.get(k) != asdict(settings)[k]:
            raise InvalidRequestError(f"the checkpoint {ckpt} was trained with {k}={saved.get(k)!r}, not "
                                      f"{asdict(settings)[k]!r}; resume with the same settings", param="resume")


def check_validation(args) -> None:
    if args.validate_every and not args.validation_prompt:
        raise InvalidRequestError("validate_every needs at least one --validation-prompt", param="validate_every")
    if args.task in ("edit", "i2t", "i2v", "video-edit", "v2t") and \
            len(args.validation_image) != len(args.validation_prompt):
        raise InvalidRequestError(f"{args.task} validation needs one --validation-image per --validation-prompt",
                                  param="validation_image")
    for p in args.validation_image:
        if not p.is_file():
            raise InputNotFoundError(f"validation image {p} does not exist", param="validation_image")


def make_validation(pipe, args):
    """Validation outputs of one step: fixed prompts and seeds, through the pipeline like any generation."""
    if args.task in V.VIDEO_TASKS:
        return VC.make_validation(pipe, args)
    from ..config import SamplingParams
    from ..media import SOFTWARE, save_image
    from .validation import save_validation_grid

    folder = args.out / "validation"

    def run(step: int) -> List[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths, images = [], []
        for k, prompt in enumerate(args.validation_prompt):
            sampling = SamplingParams(steps=args.validation_steps, seed=args.validation_seed + k)
            path = folder / f"step_{step:07d}_{k}.{'txt' if args.task == 'i2t' else 'png'}"
            if args.task == "i2t":
                path.write_text(pipe.understand(str(args.validation_image[k]), prompt) + "\n")
            else:
                img = (pipe.generate_image(prompt, args.resolution, args.resolution, sampling) if args.task == "t2i"
                       else pipe.edit_image(str(args.validation_image[k]), prompt, sampling))
                # replace=True: a resumed run repeating this step replaces its own earlier image, nothing else
                save_image(img, path, {"prompt": prompt, "step": str(step), "software": SOFTWARE}, replace=True)
                images.append(img)
            paths.append(path)
        if images:  # all of the step's images in one picture, prompts in order
            paths.append(save_validation_grid(images, args.validation_prompt, folder / f"step_{step:07d}.png", step))
        return paths

    return run


def run(args) -> int:
    from tqdm import tqdm

    settings = settings_from_args(args)
    ckpt = check_run_folder(args)
    if ckpt is not None:
        check_resume(ckpt, settings)
    check_validation(args)
    video = args.task in V.VIDEO_TASKS
    items = V.find_items(args.data, VC.clip_settings(args)) if video else D.find_items(args.data, args.task)
    vit_res = vit_resolution(args)
    feature_settings = {"task": args.task, "resolution": args.resolution, "vit_resolution": vit_res,
                        "model": str(args.model)}
    if video:
        feature_settings.update(num_frames=args.num_frames, fps=args.fps)
    data_hash = D.data_hash(items, feature_settings, "video" if video else "image")

    from ..pipeline import LancePipeline
    from ..quantize import quantize_lance

    pipe = LancePipeline.from_pretrained(args.model, task=PIPELINE_TASK[args.task], dtype=args.dtype,
                                         compute_dtype=args.compute_dtype, low_memory=True)
    # The model being trained must never be released and reloaded (validation runs through the same pipeline): only
    # the ViT and VAE come and go.
    pipe.loaders.pop("model", None)
    cache = args.cache_dir or args.out / "cache"
    bar = tqdm(total=len(items), desc="caching latents", unit="item", file=sys.stderr)
    if video:
        features = VC.features(args, pipe, cache / data_hash, vit_res, items, bar)
    else:
        features = D.cache_features(items, args.task, pipe, cache / data_hash, args.resolution, vit_res,
                                    lambda i, n: bar.update(1))
    bar.close()
    pipe.release("vit", "vae")
    if args.quantize:
        quantize_lance(pipe.model, {"bits": args.quantize, "group_size": 64, "experts": "all"})
    meta = {"base_checkpoint": str(args.model), "data_hash": data_hash, "items": len(items),
            "resolution": args.resolution, "dtype": args.dtype, "quantize": args.quantize}
    trainer = loop.Trainer(pipe, features, settings, args.out, meta, make_validation(pipe, args),
                           log=lambda m: print(m, file=sys.stderr))
    if ckpt is not None:
        trainer.resume(ckpt)
        print(f"resuming at step {trainer.step} from {ckpt}", file=sys.stderr)
    result = trainer.run()
    if result["stopped"] is not None:
        print(f"stopped at step {result['step']}; checkpoint {result['checkpoint']} (continue with --resume)",
              file=sys.stderr)
        return 130
    print(f"saved adapter {args.out} ({result['step']} steps); use it with --lora {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return main_guard(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())

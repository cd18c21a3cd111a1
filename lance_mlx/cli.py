"""Argument groups, error handling and reporting shared by the command-line scripts."""

from __future__ import annotations

import argparse
import io
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional, Sequence

import mlx.core as mx

from .checkpoints import UPSTREAM_REPO
from .config import DEFAULT_SAMPLING, POSTERIOR_SEED, SAMPLERS, SamplingParams
from .errors import InvalidRequestError, LanceError
from .loading import DTYPES
from .processing import OUTPUT_ASPECT_RATIOS, output_size

D = DEFAULT_SAMPLING


def add_dtype_args(g, default_dtype: str = "bfloat16") -> None:
    """--dtype (the weights') and --compute-dtype (the LLM's activations) on a parser or argument group."""
    g.add_argument("--dtype", default=default_dtype, choices=sorted(DTYPES),
                   help=f"weights' dtype of the LLM and ViT (default {default_dtype})")
    g.add_argument("--compute-dtype", choices=sorted(DTYPES),
                   help="dtype of the LLM's activations (default: --dtype); float32 over bfloat16 weights is faster "
                        "on CPUs without a bf16 GEMM, slower on Apple GPUs (docs/performance.md)")


def add_model_args(p: argparse.ArgumentParser, default_dtype: str = "bfloat16") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=UPSTREAM_REPO,
                   help=f"local model folder or hub repo id (default {UPSTREAM_REPO}; only the files the task "
                        "needs are downloaded)")
    add_dtype_args(g, default_dtype)
    g.add_argument("--low-memory", action="store_true",
                   help="hold only what each phase needs: ViT/VAE loaded to encode or decode, the LLM released "
                        "before the decode (same results; docs/memory.md)")
    g.add_argument("--und-bits", type=int, choices=(4, 8),
                   help="quantize the understanding expert after loading (less memory, results change a little; "
                        "docs/memory.md)")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="run even when the estimated peak memory exceeds what is available (also "
                        "LANCE_MLX_SKIP_MEMORY_CHECK=1; docs/memory.md)")
    add_lora_arg(g)
    g.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def add_lora_arg(g) -> None:
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA adapter (folder or .safetensors of lance-mlx-train or PEFT) at SCALE "
                        "(default 1); repeat to stack adapters (docs/training.md)")


def pipeline_options(args) -> dict:
    """The `LancePipeline.from_pretrained` keywords of the model flags (the --lora files checked here, before any
    weights load)."""
    from .lora import check_lora_args

    return {"dtype": args.dtype, "compute_dtype": args.compute_dtype, "low_memory": args.low_memory,
            "und_bits": args.und_bits, "loras": check_lora_args(getattr(args, "lora", None) or ())}


def add_seed_arg(g, default: int = D.seed) -> None:
    g.add_argument("--seed", type=int, default=default, help=f"random seed, 0 <= seed < 2**63 (default {default})")


def _interval(text: str):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.4,1.0), got {text!r}") from None
    return lo, hi


def add_sampling_args(p: argparse.ArgumentParser, image_guidance: bool = False) -> None:
    """Denoising settings; defaults and help come from `config.SamplingParams` (upstream's, defined once)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=D.steps, help=f"denoising steps (default {D.steps})")
    g.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="what to steer away from: the guidance branches that drop the prompt carry this text in its "
                        "place (default empty: upstream's unconditional branch; docs/steering.md)")
    g.add_argument("--cfg", "--cfg-text", dest="cfg", type=float, default=D.cfg_text,
                   help=f"text guidance scale; 1 or less is off (default {D.cfg_text:g})")
    if image_guidance:
        g.add_argument("--cfg-img", type=float, default=D.cfg_image,
                       help=f"image guidance scale; {D.cfg_image:g} (default) is off, exactly as upstream; above 1 "
                            "enables our three-branch guidance (an extension, see docs/editing.md)")
    g.add_argument("--cfg-interval", type=_interval, default=D.cfg_interval, metavar="LO,HI",
                   help=f"guidance is active for LO < t <= HI (default {D.cfg_interval[0]:g},{D.cfg_interval[1]:g})")
    g.add_argument("--renorm-min", type=float, default=D.renorm_min,
                   help=f"lower clamp of the guidance renorm factor (default {D.renorm_min:g})")
    g.add_argument("--timestep-shift", type=float, default=D.shift,
                   help=f"flow-matching schedule shift (default {D.shift:g})")
    g.add_argument("--sampler", default=D.sampler, choices=SAMPLERS,
                   help="solver: euler (upstream, default), dpm++2m or unipc, one model call per step each "
                        "(docs/solvers.md)")
    add_seed_arg(g)


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(steps=args.steps, shift=args.timestep_shift, cfg_text=args.cfg,
                          cfg_image=getattr(args, "cfg_img", D.cfg_image), cfg_interval=args.cfg_interval,
                          renorm_min=args.renorm_min, seed=args.seed, sampler=args.sampler)


def add_posterior_args(g, what: str) -> None:
    """How a VAE-encoded conditioning input (`what`) is drawn: upstream samples the posterior with its global seed."""
    g.add_argument("--posterior-seed", type=int, default=POSTERIOR_SEED,
                   help=f"seed of the VAE posterior sample of {what} (default {POSTERIOR_SEED}, upstream's global "
                        "seed)")
    g.add_argument("--posterior-mean", action="store_true",
                   help=f"encode {what} with the VAE posterior mean instead of a sample (deterministic; upstream "
                        "samples)")


def posterior_from_args(args):
    from .tasks import Posterior

    return Posterior(sample=not args.posterior_mean, seed=args.posterior_seed)


def add_output_args(p: argparse.ArgumentParser, help_text: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help=help_text)
    g.add_argument("--force", action="store_true",
                   help="replace an earlier output of lance-mlx at --out (never anything else)")
    g.add_argument("--metadata-json", nargs="?", const="", default=None, type=str, metavar="PATH",
                   help="also write the settings as JSON, to PATH or, without one, beside the output as OUT.json")


def sidecar_from_args(args) -> Optional[Path]:
    """The checked `--metadata-json` path, or None when not asked for."""
    from .media import check_sidecar, sidecar_path

    if args.metadata_json is None:
        return None
    path = Path(args.metadata_json) if args.metadata_json else sidecar_path(args.out)
    return check_sidecar(path, force=args.force)


def add_preview_args(p: argparse.ArgumentParser) -> None:
    """Live previews of the picture forming (docs/steering.md)."""
    g = p.add_argument_group("preview")
    g.add_argument("--preview", type=Path, metavar="PATH",
                   help="rewrite PATH (atomically) with the picture forming as the steps go: an image, or for a "
                        "video also a .gif of its frames")
    g.add_argument("--preview-every", type=int, default=1, metavar="N",
                   help="write the preview every N steps and after the last (default 1)")
    g.add_argument("--preview-mode", choices=("fast", "full"), default="fast",
                   help="fast: a linear latent-to-RGB map, well under 1%% of a step (default); full: the VAE decode "
                        "of the predicted image (a video's first frame)")


def preview_from_args(args, request, out: Path):
    """The checked `--preview` writer of a run, or None when not asked for."""
    from .preview import PreviewFile, check_preview_path

    if getattr(args, "preview", None) is None:
        return None
    if args.preview_every < 1:
        raise InvalidRequestError(f"--preview-every must be 1 or more, got {args.preview_every}")
    # the items of a --prompts-file (distributed.run_prompts marks them batch_item) share one preview file
    rewrite = hasattr(args, "batch_item") and args.preview in _PREVIEWS_WRITTEN
    path = check_preview_path(args.preview, request.checkpoint == "video", args.force or rewrite, out)
    _PREVIEWS_WRITTEN.add(args.preview)
    return PreviewFile(path, args.preview_every, args.preview_mode, fps=getattr(request, "fps", 12.0),
                       replace=args.force or rewrite)


_PREVIEWS_WRITTEN: set = set()  # --preview paths of this process's runs


def add_size_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("size")
    g.add_argument("--width", type=int, help="output width in pixels (multiple of 16; docs/generation.md: sizes)")
    g.add_argument("--height", type=int, help="output height in pixels (multiple of 16; docs/generation.md: sizes)")
    g.add_argument("--aspect", choices=list(OUTPUT_ASPECT_RATIOS),
                   help="aspect-ratio preset used when --width/--height are not given (upstream app's sizes)")
    g.add_argument("--resolution", type=int,
                   help="area preset: the size covers about RESOLUTION² pixels (upstream app's sizes at 768, 640 "
                        "and 480, its bucket rule at others)")


def resolve_size(args, aspect: str, resolution: int) -> tuple:
    """(width, height) from explicit flags or upstream's size for the aspect/resolution preset."""
    if args.width is None and args.height is None:
        if isinstance(resolution, bool) or not 64 <= resolution <= 1024:
            raise InvalidRequestError(f"--resolution must be between 64 and 1024 pixels, got {resolution}")
        return output_size(aspect, resolution)
    if args.width is None or args.height is None:
        raise InvalidRequestError("give both --width and --height, or neither (then --aspect/--resolution apply)")
    return args.width, args.height


class PhaseTimer:
    """Prints wall time and MLX peak memory per phase on stderr, as the mlx-examples scripts do."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.rows = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        peak = mx.get_peak_memory() / 2**30
        self.rows.append((name, dt, peak))
        print(f"[{name}] {dt:.2f} s, peak memory {peak:.2f} GB", file=self.stream)

    def summary(self) -> None:
        total = sum(r[1] for r in self.rows)
        peak = max((r[2] for r in self.rows), default=0.0)
        print(f"[total] {total:.2f} s, peak memory {peak:.2f} GB", file=self.stream)


def run_steps(steps, desc: str = "denoising", show: bool = True, on_step: Optional[Callable] = None):
    """Drain a step generator (with a tqdm bar on stderr when `show`, `on_step(step)` after each step, e.g. a
    preview); returns the last step's latents."""
    from tqdm import tqdm

    latents = None
    bar = None
    for step in steps:
        if bar is None and show:
            bar = tqdm(total=step.total, desc=desc, unit="step", file=sys.stderr)
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(step)
        latents = step.latents
    if bar is not None:
        bar.close()
    return latents


@dataclass(frozen=True)
class RunRole:
    """What this process does in a generation run: one process does everything; over several ranks
    (distributed.py) only one shows progress and writes a shared output."""

    shows: bool = True  # prints phases, progress and the summary
    writes: bool = True  # decodes and writes the output (and its sidecar)
    label: str = ""  # put before the "saved" line, e.g. "[rank 1] "


def _load_pipeline(args, request):
    from .pipeline import LancePipeline

    return LancePipeline.from_pretrained(args.model, request=request, **pipeline_options(args))


def generate_to_file(args, request, out: Path, encode_phase: str, metadata: dict, *, load=_load_pipeline,
                     denoise=None, role: RunRole = RunRole(), rewrite=None) -> None:
    """The generation commands' run: load (request checked first), plan, denoise with a bar, decode and write `out`
    with `metadata` plus the settings, sizes and model; per-phase time and peak memory on stderr.

    `load(args, request)` gives the pipeline and `denoise(pipe, plan)` the step generator (default
    `pipe.denoise(plan)`); distributed.py passes its own for runs over several ranks. `rewrite(pipe, request)`
    gives the request to generate once the pipeline is loaded (prompt enhancement with the checkpoint)."""
    from .config import OUTPUT_FPS
    from .lora import check_lora_args
    from .media import SOFTWARE

    sidecar = sidecar_from_args(args) if role.writes else None
    preview = preview_from_args(args, request, out) if role.writes else None
    check_lora_args(getattr(args, "lora", None) or ())  # before the memory check resolves --model (a download)
    size_known = hasattr(request, "latent_shape")  # t2i, t2v: checked before loading; the others after plan
    if role.writes and size_known:
        check_space(out, request.latent_shape)
    if load is _load_pipeline:  # one process holds the whole model (distributed ranks each hold a share)
        from .memory_estimate import check_before_loading

        check_before_loading(args, request)
    timer = PhaseTimer(stream=sys.stderr if role.shows else io.StringIO())
    with timer.phase("load"):
        pipe = load(args, request)
    if rewrite is not None:
        with timer.phase("enhance prompt"):
            request = rewrite(pipe, request)
    with timer.phase(encode_phase):
        plan = pipe.plan(request)
    if role.writes and not size_known:
        check_space(out, plan.latent_shape)
    steps = pipe.denoise(plan) if denoise is None else denoise(pipe, plan)
    if preview is not None:
        preview.vae = lambda: pipe.component("vae")
    with timer.phase(f"denoise {request.sampling.steps} steps"):
        latents = run_steps(steps, show=role.shows, on_step=preview)
    if not role.writes:
        return
    t, h, w = plan.latent_shape
    frames, fps = 4 * (t - 1) + 1, getattr(request, "fps", OUTPUT_FPS)
    meta = {**metadata, "width": 16 * w, "height": 16 * h, **request.sampling.as_metadata(), "model": str(args.model),
            "dtype": args.dtype, "software": SOFTWARE}
    if args.compute_dtype:
        meta["compute_dtype"] = args.compute_dtype
    if getattr(args, "lora", None):
        meta["lora"] = list(args.lora)
    if request.checkpoint == "video":
        meta.update(frames=frames, fps=fps)
    with timer.phase("decode + write"):
        write_outputs(pipe, latents.reshape(1, t, h, w, -1), out, sidecar, fps, meta, args.force)
    if role.shows:
        timer.summary()
    what = f"{frames} frames at {fps:g} fps, " if request.checkpoint == "video" else ""
    print(f"{role.label}saved {out} ({what}{16 * w}x{16 * h})", file=sys.stderr)


def write_outputs(pipe, latents, out: Path, sidecar: Optional[Path], fps: float, meta: dict, force: bool) -> None:
    """Decode and write `out`, then the sidecar. When a name was taken during the run (`OutputTakenError`), the
    result is saved under a free name, the sidecar still says where, and the error is raised after both."""
    from .errors import OutputTakenError
    from .media import save_metadata_json

    taken = []
    try:
        pipe.save(latents, out, fps=fps, metadata=meta, replace=force)
    except OutputTakenError as e:
        taken.append(e)
        out = e.saved
    if sidecar is not None:
        try:
            save_metadata_json({**meta, "output": str(out)}, sidecar, replace=force)
        except OutputTakenError as e:
            taken.append(e)
    if taken:
        raise OutputTakenError("; ".join(map(str, taken)), saved=taken[0].saved)


def check_space(out: Path, latent_shape) -> None:
    """Refuse before the expensive work when the output of this latent grid (t, h, w) cannot fit on its disk."""
    from .media import check_free_space, estimate_output_bytes

    t, h, w = latent_shape
    frames = 4 * (t - 1) + 1
    check_free_space(out, estimate_output_bytes(out, 16 * w, 16 * h, frames))


def fail(msg: str, code: int = 2) -> NoReturn:
    """Exit with a one-line error (no traceback) for problems the user can fix."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


# Characters next to a word that make it part of a path, file pattern, option or quoted text, not a field name.
_NOT_A_NAME_BEFORE = r"(?<![\w\-/\\.~'\"`*])"
_NOT_A_NAME_AFTER = r"(?![\w\-/\\'\"`*]|\.\w)"


def flag_message(e: LanceError, user_values: Sequence[str] = ()) -> str:
    """The error's message on one line, its field name (`e.param`, when it names one) shown as the command-line
    flag: the first place the name stands as a word of the sentence ("steps 0 is out of range", "cannot read
    image: ..."), never inside a path, file pattern or quoted text, nor inside one of `user_values` (the command
    line's own values, e.g. an --out path named `out`), and not at all when the message already names the flag."""
    msg = str(e).replace("\n", " ")
    if not e.param:
        return msg
    flag = "--" + e.param.replace("_", "-")
    if flag in msg:
        return msg
    taken = [m.span() for v in user_values if v for m in re.finditer(re.escape(v), msg)]
    for m in re.finditer(_NOT_A_NAME_BEFORE + re.escape(e.param) + _NOT_A_NAME_AFTER, msg):
        if not any(a <= m.start() < b for a, b in taken):
            return msg[:m.start()] + flag + msg[m.end():]
    return msg


def _user_values(args) -> list:
    """The text of the parsed command line's values (paths, prompts, ids)."""
    return sorted({str(v) for v in vars(args).values() if isinstance(v, (str, Path)) and str(v)})


class Terminated(BaseException):
    """SIGTERM turned into an exception, so every `atomic_output` on the stack removes its partial file."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main_guard(run: Callable[[argparse.Namespace], int], parse: Callable[[Optional[Sequence[str]]], argparse.Namespace],
               argv: Optional[Sequence[str]] = None) -> int:
    """Parse, run, and turn errors into one line: `LanceError`s exit with their code (2 bad input, 1 failure while
    running), Ctrl-C exits 130 and SIGTERM 143 after partial outputs are removed; `--debug` shows the traceback."""
    args = parse(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return run(args)
    except LanceError as e:
        if getattr(args, "debug", False):
            traceback.print_exc()
        fail(flag_message(e, _user_values(args)), e.exit_code)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; nothing was written", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

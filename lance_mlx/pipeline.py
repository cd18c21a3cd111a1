"""`LancePipeline`: loads and owns model, tokenizer, ViT and VAE, and runs a task request to its result."""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from PIL import Image

from . import checkpoints, loading, lora
from . import understanding as U
from .conditioning import encode_edit_inputs, encode_first_frame, first_frame_mask
from .config import SamplingParams
from .errors import InvalidRequestError, WeightsError
from .lance import Lance
from .media import IMAGE_SUFFIXES, save_image, save_video, to_uint8
from .processing import preprocess_image, preprocess_video
from .sampler import Step
from .sequence import Sequence, generation_sequence
from .tasks import (
    GenerationRequest,
    ImageEdit,
    ImageToVideo,
    Request,
    TextToImage,
    TextToVideo,
    Understand,
    VideoEdit,
    check_token_count,
    latent_frames,
)

ProgressFn = Callable[[int, int], Any]


@dataclass
class GenerationPlan:
    """A generation request made ready to sample: its token sequence (conditioning encoded), its sampling settings
    (with the start latents when some are fixed) and the tokens that never change (i2v's first frame)."""

    request: GenerationRequest
    sequence: Sequence
    params: SamplingParams
    frozen: Optional[np.ndarray] = None

    @property
    def latent_shape(self):
        return self.sequence.splits[self.sequence.noise_index].grid


def _computing_in(model: Lance, compute_dtype: Optional[mx.Dtype]) -> Lance:
    model.compute_dtype = compute_dtype
    return model


class LancePipeline:
    """The components of one checkpoint and one call per task.

    Build it with `from_pretrained` (any folder layout or hub id, docs/checkpoints.md). `run(request)` takes a
    request of `lance_mlx.tasks`; `generate_image`, `generate_video`, `edit_image`, `edit_video` and `understand`
    build the request for you. Lower-level steps for progress, preview or cancellation: `plan(request)`,
    `denoise(plan)` (yields `sampler.Step`s), `preview(step)`, `decode(latents)` / `save(latents, path, ...)`.

    With `low_memory`, each phase holds only the components it needs (docs/memory.md): the ViT and VAE are loaded
    to encode and released before denoising, the LLM is released before decoding and the VAE loaded only then;
    `loaders` ({"model" | "vit" | "vae": function}) bring a released component back when a later call needs it.
    """

    def __init__(self, model: Lance, tokenizer=None, vit=None, vae=None, checkpoint: Optional[str] = None, *,
                 low_memory: bool = False, loaders: Optional[Dict[str, Callable[[], Any]]] = None):
        self.model, self.tokenizer, self.vit, self.vae = model, tokenizer, vit, vae
        self.checkpoint = checkpoint  # "image" (Lance_3B), "video" (Lance_3B_Video) or None when unknown
        self.low_memory = low_memory
        self.loaders = dict(loaders or {})
        self._config = model.config
        self.loras: List[Tuple[str, float]] = []  # (path, scale) of the adapters applied, in order

    @property
    def config(self):
        return self._config

    def component(self, name: str):
        """The "model", "vit" or "vae", loaded now if it was released or deferred (None when there is none)."""
        if getattr(self, name) is None and name in self.loaders:
            setattr(self, name, self.loaders[name]())
        return getattr(self, name)

    def release(self, *names: str) -> None:
        """Drop components that can be loaded again (`loaders`) and hand their memory back (low_memory)."""
        for name in names:
            if name in self.loaders:
                setattr(self, name, None)
        gc.collect()
        mx.clear_cache()

    @classmethod
    def from_pretrained(cls, path_or_repo: Union[str, Path] = checkpoints.UPSTREAM_REPO, task: Optional[str] = None,
                        *, request: Optional[Request] = None, precision: Optional[loading.Precision] = None,
                        low_memory: bool = False, und_bits: Optional[int] = None, loras: Union[list, tuple] = (),
                        **precision_fields) -> "LancePipeline":
        """Load a model folder or hub repo id with the components `task` needs (t2i, t2v, i2v, image_edit,
        video_edit, x2t_image, x2t_video; default: the task of `request`, else t2i).

        Before any weights load, the folder is checked to hold the checkpoint the task needs (image weights for a
        video task are refused, naming the video checkpoint) and, with `request`, its text is checked against the
        tokenizer's limit. `precision` (`loading.Precision`) holds the dtypes: `dtype` of the LLM and ViT weights
        (default bfloat16), `vae_dtype` of the VAE (default the same), `compute_dtype` the LLM computes in
        (default: `dtype`; "float32" over bfloat16 weights is faster on CPUs without a bf16 GEMM), `rope_bf16`
        (RoPE frequencies rounded like upstream's bf16 buffer; default: when dtype is bf16). Its fields can also be
        passed as keywords (`dtype="float32"`, `compute_dtype="float32"`), over `precision` when both are given.
        `low_memory` loads the LLM now and the ViT / VAE only for the phases that use them (see the class);
        `und_bits` (4 or 8) quantizes the understanding expert after loading, which changes results a little
        (docs/memory.md); the generation expert stays in `dtype`.
        `loras`: LoRA adapters to apply, each a path, "PATH:SCALE" or (path, scale) (docs/training.md); checked
        before any weights load.
        """
        p = replace(precision or loading.Precision(), **precision_fields)
        task = task or (request.task if request is not None else "t2i")
        lora_specs = lora.check_lora_args([x if isinstance(x, str) else f"{x[0]}:{x[1]}" for x in loras or ()])
        compute = None if p.compute_dtype is None else loading.parse_dtype(p.compute_dtype)  # before any download
        files = checkpoints.resolve(path_or_repo, task)
        check_checkpoint(files.checkpoint, task, str(path_or_repo))
        if request is not None:
            count_text_tokens(loading.load_tokenizer(files.tokenizer_dir), request)
        c = loading.load_components(files, task, dtype=p.dtype, vae_dtype=p.vae_dtype, rope_bf16=p.rope_bf16,
                                    low_memory=low_memory, und_bits=und_bits)
        c.model.compute_dtype = compute
        loaders = (loading.component_loaders(files, task, p.dtype, p.vae_dtype, p.rope_bf16, und_bits)
                   if low_memory else None)
        if loaders:
            load_model = loaders["model"]
            loaders["model"] = lambda: lora.apply_all(_computing_in(load_model(), compute), lora_specs)
        lora.apply_all(c.model, lora_specs)
        pipe = cls(c.model, c.tokenizer, c.vit, c.vae, checkpoint=files.checkpoint, low_memory=low_memory,
                   loaders=loaders)
        pipe.loras = [(p, s) for p, s in lora_specs]
        return pipe

    # ------------------------------------------------------------------------------------------------ LoRA
    def load_lora(self, path, scale: float = 1.0) -> int:
        """Apply a LoRA adapter (PEFT format) to the model without copying its weights; returns its index for
        `set_lora_scale`. Adapters stack: each adds its own scaled update (docs/training.md)."""
        lora.load_adapter(self.component("model"), path, scale)
        self.loras.append((str(path), float(scale)))
        return len(self.loras) - 1

    def set_lora_scale(self, index: int, scale: float) -> None:
        """Change the scale of the adapter `load_lora` returned `index` for (0: as if it were not loaded)."""
        lora.set_adapter_scale(self.component("model"), index, scale)
        path, _ = self.loras[index]
        self.loras[index] = (path, float(scale))

    # ------------------------------------------------------------------------------------------------ checks
    def check(self, request: Request) -> None:
        """What the request needs from this pipeline: the right checkpoint, its components, text within limits."""
        check_checkpoint(self.checkpoint, request.task, "this pipeline")
        _, needs_vae, needs_vit = checkpoints.TASKS[request.task]
        missing = [n for n, need in (("tokenizer", True), ("vae", needs_vae), ("vit", needs_vit))
                   if need and getattr(self, n) is None and n not in self.loaders]
        if missing:
            raise WeightsError(f"this pipeline has no {', '.join(missing)} for {request.task}: load it with "
                               f"LancePipeline.from_pretrained(..., task={request.task!r})")
        count_text_tokens(self.tokenizer, request)

    def tokenize(self, text: str) -> list:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -------------------------------------------------------------------------------------------- generation
    def plan(self, request: GenerationRequest) -> GenerationPlan:
        """Check the request, encode its conditioning (ViT / VAE) and build the token sequence it samples."""
        self.check(request)
        model, s = self.component("model"), request.sampling
        ids = model._prompt_ids(self.tokenize(request.text), None, None)
        frozen = None
        if isinstance(request, (TextToImage, TextToVideo)):
            seq = generation_sequence(request.task, ids, request.latent_shape, tokenizer=self.tokenizer)
        elif isinstance(request, ImageToVideo):
            pixels = preprocess_image(request.image, request.preset, vae=True, vit=False).vae_pixels
            H, W = pixels.shape[-3:-1]
            stride = self.config.vae_spatial_stride
            shape = (latent_frames(request.num_frames), H // stride, W // stride)
            model.latent_pos.check(shape)
            first = encode_first_frame(self.component("vae"), pixels, request.num_frames, request.posterior.sample,
                                       request.posterior.seed)
            seq = generation_sequence("i2v", ids, shape, tokenizer=self.tokenizer)
            frozen = first_frame_mask(shape)
            c = self.config.latent_channels
            x0 = model.initial_noise(len(frozen), s.seed, s.noise, shape)
            s = s.replace(noise=mx.where(mx.array(frozen)[:, None], first.reshape(-1, c), x0))
        else:
            if isinstance(request, ImageEdit):
                visual, kind = preprocess_image(request.image, request.preset), "image"
            else:
                visual, kind = preprocess_video(request.video, request.preset, fps=request.input_fps), "video"
                latent_frames(visual.vae_pixels.shape[0], "source frame count")
            inputs = encode_edit_inputs(self.component("vit"), self.component("vae"), visual, request.posterior.sample,
                                        request.posterior.seed)
            model.latent_pos.check(inputs.latent_shape)
            seq = inputs.sequence(ids, kind, tokenizer=self.tokenizer)
        seq = seq.with_negative(self.tokenize(request.negative_prompt) if request.negative_prompt else None)
        model.latent_pos.check(seq.splits[seq.noise_index].grid)
        model._check_length(seq, len(ids))
        _check_negative_length(seq, len(ids), self.config.llm.max_position_embeddings)
        if self.low_memory:  # the encoders are done: evaluate what they made, then let them go
            mx.eval([sp.data for sp in seq.splits if isinstance(sp.data, mx.array)], s.noise)
            self.release("vit", "vae")
        return GenerationPlan(request, seq, s, frozen)

    def denoise(self, plan: GenerationPlan) -> Iterator[Step]:
        """The sampling loop of a plan: a `sampler.Step` after each denoising step (stop early by not asking)."""
        return self.component("model").denoise(plan.sequence, plan.params, plan.frozen)

    def preview(self, step: Step, mode: str = "fast", max_side: Optional[int] = None):
        """`Step.preview` with this pipeline's VAE for mode "full" (loaded now if it was released: low_memory)."""
        return step.preview(mode, self.component("vae") if mode == "full" else None, max_side)

    def latents(self, request: GenerationRequest, progress: Optional[ProgressFn] = None) -> mx.array:
        """The sampled latents (1, t, h, w, 48) float32 of a generation request."""
        plan = self.plan(request)
        return self.component("model").generate(plan.sequence, plan.params, plan.frozen, progress=progress)

    # ------------------------------------------------------------------------------------------------ output
    def _require_vae(self):
        if self.low_memory and self.vae is None:  # one-shot decode: the LLM (reloaded on demand) makes room
            self.release("model", "vit")
        if self.component("vae") is None:
            raise WeightsError("this pipeline has no VAE to decode with: load it for a generation task")
        return self.vae

    def decode(self, latents: mx.array) -> np.ndarray:
        """(1, t, h, w, 48) latents → (T, H, W, 3) uint8 frames through the VAE."""
        pixels = self._require_vae().decode(latents, clamp=True)
        return to_uint8(np.array(pixels[0].astype(mx.float32)))

    def iter_frames(self, latents: mx.array) -> Iterator[np.ndarray]:
        """(H, W, 3) uint8 frames yielded as the VAE decodes them chunk by chunk (memory flat in video length)."""
        for chunk in self._require_vae().decode_stream(latents):
            yield from to_uint8(np.array(chunk[0]))

    def save(self, latents: mx.array, path, fps: float = 12.0, metadata: Optional[Dict[str, Any]] = None,
             replace: bool = False) -> Path:
        """Decode and write atomically: an image file for one frame, else a video written frame by frame.
        `replace` lets an earlier output of this tool at `path` be replaced (media.atomic_output)."""
        if latents.shape[1] == 1 and Path(path).suffix.lower() in IMAGE_SUFFIXES:
            return save_image(Image.fromarray(self.decode(latents)[0]), path, metadata, replace=replace)
        return save_video(self.iter_frames(latents), path, fps=fps, metadata=metadata, replace=replace)

    # -------------------------------------------------------------------------------------------- understanding
    def answer(self, request: Understand) -> U.TextStream:
        """A stream of answer pieces for an understanding request; `.result` holds the answer and statistics."""
        self.check(request)
        if request.video:
            visual = preprocess_video(request.media, request.preset, fps=request.input_fps, vae=False, vit=True)
        else:
            visual = preprocess_image(request.media, request.preset, vae=False, vit=True)
        embeds = U.encode_visual(self.component("vit"), visual.vit_patches, visual.grid_thw)
        if self.low_memory:  # the ViT's work is done before the LLM's begins
            mx.eval(embeds)
            self.release("vit")
        llm = self.config.llm
        prompt = U.build_prompt(self.tokenizer, visual.grid_thw, "video" if request.video else "image",
                                request.question, vit_embeds=embeds, system=request.system_prompt,
                                spatial_merge_size=llm.spatial_merge_size, tokens_per_second=llm.tokens_per_second)
        return U.generate(self.component("model"), prompt, self.tokenizer, max_tokens=request.max_tokens,
                          temperature=request.temperature, top_p=request.top_p, seed=request.seed)

    # ------------------------------------------------------------------------------------------- one call each
    def run(self, request: Request, progress: Optional[ProgressFn] = None):
        """Run a request: a PIL image (t2i, image edit), (T, H, W, 3) uint8 frames (videos), or the answer text."""
        if isinstance(request, Understand):
            return self.answer(request).run().text
        latents = self.latents(request, progress)
        frames = self.decode(latents)
        return Image.fromarray(frames[0]) if isinstance(request, (TextToImage, ImageEdit)) else frames

    def generate_image(self, prompt: str, width: int = 768, height: int = 768,
                       sampling: Optional[SamplingParams] = None, **settings) -> Image.Image:
        """Text-to-image with upstream's defaults (768², 30 steps, shift 3.5, CFG 4.0, seed 42); `settings` are
        `SamplingParams` fields (steps, cfg_text, seed, ...) applied over `sampling`; `negative_prompt=` steers away
        from a text (docs/steering.md)."""
        extra = _pop(settings, "negative_prompt")
        return self.run(TextToImage(prompt, width, height, _settings(sampling, settings), **extra))

    def generate_video(self, prompt: str, num_frames: int = 49, width: Optional[int] = None,
                       height: Optional[int] = None, image=None, sampling: Optional[SamplingParams] = None,
                       **settings) -> np.ndarray:
        """Text-to-video, or image-to-video with `image` (the video then takes the image's bucketed size; pass
        `resolution=` for another bucket area than 640²). Returns (T, H, W, 3) uint8 frames."""
        extra = _pop(settings, "resolution", "posterior", "negative_prompt")
        params = _settings(sampling, settings)
        if image is None:
            negative = _pop(extra, "negative_prompt")
            req = TextToVideo(prompt, num_frames, width or 848, height or 480, sampling=params, **negative)
        elif width is not None or height is not None:
            raise InvalidRequestError("image-to-video takes its size from the image (bucketed to about "
                                      "resolution² pixels, as upstream); leave width and height unset")
        else:
            req = ImageToVideo(prompt, image, num_frames, sampling=params, **extra)
        return self.run(req)

    def edit_image(self, image, instruction: str, sampling: Optional[SamplingParams] = None,
                   **settings) -> Image.Image:
        """Edit an image as `instruction` says (upstream image_edit); `preset=`/`posterior=` as `tasks.ImageEdit`."""
        extra = _pop(settings, "preset", "posterior", "negative_prompt")
        return self.run(ImageEdit(image, instruction, sampling=_settings(sampling, settings), **extra))

    def edit_video(self, video, instruction: str, sampling: Optional[SamplingParams] = None,
                   **settings) -> np.ndarray:
        """Edit a video as `instruction` says (upstream video_edit); options as `tasks.VideoEdit`."""
        extra = _pop(settings, "preset", "posterior", "input_fps", "negative_prompt")
        return self.run(VideoEdit(video, instruction, sampling=_settings(sampling, settings), **extra))

    def understand(self, media, question: Optional[str] = None, stream: bool = False, **options):
        """Answer `question` about an image or video, or describe it (options as `tasks.Understand`). Returns the
        text, or with stream=True a TextStream of pieces whose `.result` has the statistics."""
        out = self.answer(Understand(media, question, **options))
        return out if stream else out.run().text


# ---------------------------------------------------------------------------------------------------- helpers
def check_checkpoint(kind: Optional[str], task: str, where: str) -> None:
    """Refuse a generation task on the other checkpoint (image weights for a video task and the reverse).
    Understanding runs on either: both share the und expert's architecture, upstream merely defaults x2t_video to
    the video checkpoint."""
    need = checkpoints.checkpoint_kind_for(task)
    if kind is None or kind == need or task.startswith("x2t"):
        return
    name = checkpoints.VIDEO_LLM_DIR if need == "video" else checkpoints.IMAGE_LLM_DIR
    how = "convert.py --video" if need == "video" else "convert.py without --video"
    raise WeightsError(f"{task} needs the {need} checkpoint ({name}), but {where} holds the {kind} one: point "
                       f"--model at the upstream folder or repo (it picks {name}), at {name}/ itself, or at a "
                       f"folder written by {how}")


def _check_negative_length(seq: Sequence, n_prompt: int, limit: int) -> None:
    """The negative prompt's branch fits the context window too (it is the longer one when the negative is)."""
    n = len(seq) - n_prompt + (len(seq.negative) if seq.negative is not None else 0)
    if n > limit:
        raise InvalidRequestError(f"with the negative prompt the unconditional branch has {n} tokens but the context "
                                  f"limit is {limit}; shorten the negative prompt or use a smaller latent grid")


def count_text_tokens(tokenizer, request: Request) -> None:
    if request.text is not None:
        check_token_count(len(tokenizer(request.text, add_special_tokens=False)["input_ids"]), request.text_field)
    if request.negative_prompt:
        try:
            check_token_count(len(tokenizer(request.negative_prompt, add_special_tokens=False)["input_ids"]),
                              "negative prompt")
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), "negative_prompt") from None


def _settings(sampling: Optional[SamplingParams], settings: Dict[str, Any]) -> SamplingParams:
    base = sampling if sampling is not None else SamplingParams()
    return base.replace(**settings) if settings else base


def _pop(settings: Dict[str, Any], *names: str) -> Dict[str, Any]:
    return {n: settings.pop(n) for n in names if n in settings}

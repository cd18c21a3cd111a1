"""Task-level API of `Lance`: loading a model folder or hub repo, and one call per task."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import mlx.core as mx
import numpy as np
from PIL import Image

from . import weights as W
from .config import LanceConfig, ViTConfig
from .media import IMAGE_SUFFIXES, to_uint8

ProgressFn = Callable[[int, int], Any]


def load_config(files: W.ModelFiles) -> LanceConfig:
    """Our config.json, upstream llm_config.json with the ViT config from Qwen2.5-VL-ViT/config.json, or another
    MLX port's config.json (docs/checkpoints.md)."""
    return W.read_lance_config(files)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    # A config.json without a transformers model_type beside the tokenizer (convert.py folders) makes
    # transformers 5 suspect a Mistral tokenizer and warn; the Qwen2 tokenizer needs no regex fix.
    extra = {"fix_mistral_regex": False} if (Path(folder) / "config.json").is_file() else {}
    try:
        return AutoTokenizer.from_pretrained(str(folder), **extra)
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise W.WeightsError(f"cannot load the tokenizer from {folder}: {e}; re-download the tokenizer files "
                             f"({', '.join(W.TOKENIZER_FILES)})") from None


def check_image_size(width: int, height: int, config: LanceConfig) -> tuple:
    """Latent grid (h, w) of an output size, or a ValueError saying which sizes are allowed."""
    s, m = config.vae_spatial_stride, config.max_latent_size
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % s:
            lo, hi = max(s, (int(v) // s) * s), (int(v) // s + 1) * s
            raise ValueError(f"{name} {v} is not a positive multiple of {s}; use e.g. {lo} or {hi}")
        if v > s * m:
            raise ValueError(f"{name} {v} is above {s * m}, the largest size the model's position table covers "
                             f"({m} latents × {s} px)")
    return height // s, width // s


class LancePipelines:
    """Mixed into `Lance`: `from_pretrained` and the per-task calls. Components live outside the parameter tree,
    so `Lance.parameters()` stays exactly the LLM checkpoint."""

    tokenizer = None
    vae = None
    vit = None

    def attach(self, **components) -> None:
        """Attach tokenizer / vae / vit without registering them as MLX sub-modules."""
        for k, v in components.items():
            object.__setattr__(self, k, v)

    @classmethod
    def from_pretrained(cls, path_or_repo: Union[str, Path] = W.UPSTREAM_REPO, task: str = "t2i",
                        dtype: Union[str, mx.Dtype] = "bfloat16", vae_dtype: Union[str, mx.Dtype, None] = None,
                        lazy: bool = False, rope_bf16: Optional[bool] = None):
        """Load a model folder (upstream hub layout, one of its checkpoint folders, a convert.py folder, or another
        MLX port's folder; docs/checkpoints.md) or a hub repo id, with the components `task` needs (t2i, t2v, i2v,
        image_edit, video_edit, x2t_image, x2t_video). `dtype` is the compute dtype of the LLM and ViT (quantized
        folders keep their quantized linears); the VAE uses `vae_dtype` (default: the same) and the
        configuration its own weights imply. Weights are memory-mapped and cast lazily, so peak memory stays
        near the size of the result. `rope_bf16` rounds the LLM's RoPE frequencies to bfloat16 as upstream's
        bf16-cast buffer does (default: when `dtype` is bfloat16, so a bf16 run reproduces upstream's angles).
        """
        dt = W.parse_dtype(dtype)
        vae_dt = W.parse_dtype(vae_dtype) if vae_dtype is not None else dt
        files = W.resolve(path_or_repo, task)
        config = load_config(files)
        model = cls(config)
        model.language_model.model.rope_bf16_inv_freq = (dt == mx.bfloat16) if rope_bf16 is None else rope_bf16
        weights = W.load_llm_weights(files, dtype=dt)
        bundled_vit = {k: v for k, v in weights.items() if k.startswith("vit_model.")}
        weights = model.sanitize(weights)
        model.set_dtype(dt)
        if config.quantization or any(k.endswith(".scales") for k in weights):
            # The module structure must be quantized before the quantized tensors can be loaded into it.
            W.quantize_lance(model, config.quantization or {}, weights=weights)
        W.check_keys(model, weights, f"Lance LLM ({', '.join(p.name for p in files.llm_weights)})")
        model.load_weights(list(weights.items()), strict=True)
        del weights
        if not lazy:
            mx.eval(model.parameters())

        components: Dict[str, Any] = {"tokenizer": load_tokenizer(files.tokenizer_dir)}
        if files.vit_weights is not None or (W.TASKS[task][2] and bundled_vit):
            components["vit"] = load_vision(config.vit, files, bundled_vit, dt, lazy)
        del bundled_vit
        if files.vae_weights is not None:
            components["vae"] = W.load_vae(files.vae_weights, vae_dt, lazy)
        model.attach(**components)
        return model

    # ---------------------------------------------------------------------------------------------- helpers
    def _require(self, *names: str) -> None:
        missing = [n for n in names if getattr(self, n, None) is None]
        if missing:
            raise ValueError(f"this Lance object has no {', '.join(missing)}: load it with "
                             "Lance.from_pretrained(..., task=...) for a task that uses them")

    def decode_latents(self, latent: mx.array, clamp: bool = True) -> np.ndarray:
        """(1, T, h, w, 48) latents → (T, H, W, 3) uint8 frames through the VAE."""
        self._require("vae")
        pixels = self.vae.decode(latent, clamp=clamp)
        return to_uint8(np.array(pixels[0].astype(mx.float32)))

    # ---------------------------------------------------------------------------------------------- tasks
    def generate_image(self, prompt: str, width: int = 768, height: int = 768, num_steps: int = 30,
                       cfg_scale: float = 4.0, timestep_shift: float = 3.5, seed: int = 42, noise=None,
                       progress: Optional[ProgressFn] = None, decode: bool = True):
        """Text-to-image with upstream's defaults (768², 30 steps, shift 3.5, CFG 4.0, seed 42).

        Returns a PIL image, or with `decode=False` the latent (1, 1, h, w, 48) for `decode_image`.
        """
        self._require("tokenizer", "vae")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty; describe the image to generate")
        h, w = check_image_size(width, height, self.config)
        latent = self.sample_t2i(prompt=prompt, tokenizer=self.tokenizer, latent_shape=(1, h, w),
                                 num_steps=num_steps, timestep_shift=timestep_shift, cfg_scale=cfg_scale,
                                 seed=seed, noise=noise, progress=progress)
        return self.decode_image(latent) if decode else latent

    def decode_image(self, latent: mx.array) -> Image.Image:
        return Image.fromarray(self.decode_latents(latent)[0])

    def save_latents(self, latent: mx.array, path, fps: float = 12.0, metadata: Optional[Dict[str, Any]] = None):
        """Decode (1, t, h, w, 48) latents and write them atomically: an image file for one frame, else a video
        (.mp4 / .gif / suffix-less PNG-frame folder) written frame by frame as the VAE decodes."""
        from .editing import iter_frames
        from .media import save_image, save_video

        if latent.shape[1] == 1 and Path(path).suffix.lower() in IMAGE_SUFFIXES:
            return save_image(self.decode_image(latent), path, metadata)
        self._require("vae")
        return save_video(iter_frames(self.vae, latent), path, fps=fps, metadata=metadata)

    def understand(self, image_or_video, question: Optional[str] = None, max_tokens: int = 256,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, stream: bool = False,
                   preset: Optional[str] = None, fps: Optional[float] = None, system_prompt: Optional[str] = None):
        """Answer `question` about an image or video, or describe it when no question is given (x2t).

        Input: an image (path, PIL image, (H, W, 3) uint8 array) or a video (path with a video suffix, or decoded
        frames as a (T, H, W, 3) uint8 array / list; frames are used as given unless `fps` is passed, then they
        are sampled like a file). Presets default to upstream's: image_768res for images, video_480p for videos.
        Greedy decoding up to 256 tokens by default, as upstream; temperature > 0 samples (top_p, seed).
        Returns the answer text, or with stream=True a TextStream of pieces whose `.result` has the statistics.
        """
        from . import understanding as U
        from .media import VIDEO_SUFFIXES
        from .processing import preprocess_image, preprocess_video

        self._require("tokenizer", "vit")
        if isinstance(image_or_video, (str, Path)):
            is_video = Path(image_or_video).suffix.lower() in VIDEO_SUFFIXES
        elif isinstance(image_or_video, Image.Image):
            is_video = False
        elif isinstance(image_or_video, np.ndarray):
            if image_or_video.ndim not in (3, 4):
                raise ValueError(f"an image array is (H, W, 3) and a video array (T, H, W, 3); got shape "
                                 f"{image_or_video.shape}")
            is_video = image_or_video.ndim == 4
        elif isinstance(image_or_video, (list, tuple)):
            is_video = True
        else:
            raise TypeError(f"expected an image or video path, PIL image, array or list of frames, got "
                            f"{type(image_or_video).__name__}")
        if int(max_tokens) <= 0:
            raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
        if is_video:
            visual = preprocess_video(image_or_video, preset or "video_480p", fps=fps, vae=False, vit=True)
        else:
            img = image_or_video
            if isinstance(img, np.ndarray):
                if img.dtype != np.uint8 or img.shape[-1] != 3:
                    raise ValueError(f"an image array must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
                img = Image.fromarray(img)
            visual = preprocess_image(img, preset or "image_768res", vae=False, vit=True)
        embeds = U.encode_visual(self.vit, visual.vit_patches, visual.grid_thw)
        llm = self.config.llm
        prompt = U.build_prompt(self.tokenizer, visual.grid_thw, "video" if is_video else "image", question,
                                vit_embeds=embeds, system=system_prompt, spatial_merge_size=llm.spatial_merge_size,
                                tokens_per_second=llm.tokens_per_second)
        out = U.generate(self, prompt, self.tokenizer, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         seed=seed)
        return out if stream else out.run().text

    # ------------------------------------------------------------------------------ editing and video (editing.py)
    def edit_image(self, image, instruction: str, num_steps: int = 30, cfg_scale: float = 4.0,
                   image_cfg_scale: float = 1.0, timestep_shift: float = 3.5, seed: int = 42, noise=None,
                   preset: str = "image_768res", sample_posterior: bool = True, posterior_seed: Optional[int] = None,
                   progress: Optional[ProgressFn] = None, decode: bool = True, timer=None):
        """Edit an image (path, PIL image or (H, W, 3) uint8 array) as `instruction` says (upstream image_edit).

        The output has the source's bucketed size (`preset`, upstream image_768res). The source goes through the
        ViT and, once, through the VAE encoder; the conditioning latent is a posterior sample (`posterior_seed`,
        default upstream's global seed 2025) or with `sample_posterior=False` the mean. Text CFG `cfg_scale` as
        upstream; `image_cfg_scale` > 1 turns on our three-component image CFG (not upstream, see
        docs/editing.md). Returns a PIL image, or with `decode=False` the latent (1, 1, h, w, 48).
        """
        from . import editing as E
        from .processing import preprocess_image

        self._require("tokenizer", "vit", "vae")
        E.check_instruction(instruction)
        with _phase(timer, "encode source (ViT + VAE)"):
            visual = preprocess_image(_as_pil(image), preset)
            inputs = E.encode_edit_inputs(self, visual, sample_posterior, posterior_seed)
        with _phase(timer, f"denoise {num_steps} steps"):
            latent = E.edit_latents(self, inputs, self._tokenize(instruction), "image", num_steps, timestep_shift,
                                    cfg_scale, image_cfg_scale, seed, noise, tokenizer=self.tokenizer,
                                    progress=progress)
        return self.decode_image(latent) if decode else latent

    def edit_video(self, video, instruction: str, num_steps: int = 30, cfg_scale: float = 4.0,
                   image_cfg_scale: float = 1.0, timestep_shift: float = 3.5, seed: int = 42, noise=None,
                   preset: str = "video_480p", fps: Optional[float] = None, sample_posterior: bool = True,
                   posterior_seed: Optional[int] = None, progress: Optional[ProgressFn] = None,
                   decode: bool = True, timer=None):
        """Edit a video as `instruction` says (upstream video_edit); returns (T, H, W, 3) uint8 frames, or with
        `decode=False` the latent (1, t, h, w, 48).

        `video`: a file path (sampled like upstream: 12 fps, at most 6 s, 4k+1 frames over the whole clip), or
        decoded frames ((T, H, W, 3) uint8 array or list), used as given (4k+1 of them) unless `fps` is passed.
        The output has the sampled frame count and the source's bucketed size (`preset`, upstream video_480p).
        Other arguments as `edit_image`.
        """
        from . import editing as E
        from .processing import preprocess_video

        self._require("tokenizer", "vit", "vae")
        E.check_instruction(instruction)
        with _phase(timer, "encode source (ViT + VAE)"):
            visual = preprocess_video(video, preset, fps=fps)
            inputs = E.encode_edit_inputs(self, visual, sample_posterior, posterior_seed)
        with _phase(timer, f"denoise {num_steps} steps"):
            latent = E.edit_latents(self, inputs, self._tokenize(instruction), "video", num_steps, timestep_shift,
                                    cfg_scale, image_cfg_scale, seed, noise, tokenizer=self.tokenizer,
                                    progress=progress)
        return self.decode_latents(latent) if decode else latent

    def generate_video(self, prompt: str, num_frames: int = 49, width: Optional[int] = None,
                       height: Optional[int] = None, image=None, num_steps: int = 30, cfg_scale: float = 4.0,
                       timestep_shift: float = 3.5, seed: int = 42, noise=None, preset: str = "video_480p",
                       sample_posterior: bool = True, posterior_seed: Optional[int] = None,
                       progress: Optional[ProgressFn] = None, decode: bool = True, timer=None):
        """Text-to-video, or image-to-video when `image` (path, PIL image or (H, W, 3) uint8 array) is given.

        `num_frames` must be 4k+1, at most 121 (31 latent frames; 49 is what upstream's default NUM_FRAMES=50
        produces). t2v size: `width` x `height`, multiples of 16 (default 848x480, the video_480p 16:9 bucket);
        i2v takes the image's bucketed size (`preset`) instead, and its first latent frame is the image's
        encoding, kept fixed (spec §5.5; `sample_posterior` / `posterior_seed` as in `edit_image`). Returns
        (T, H, W, 3) uint8 frames (save at 12 fps like upstream), or with `decode=False` the latent.
        """
        from . import editing as E

        self._require("tokenizer", "vae")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty; describe the video to generate")
        ids = self._tokenize(prompt)
        if image is None:
            shape = E.video_latent_shape(self, num_frames, 848 if width is None else width,
                                         480 if height is None else height)
            with _phase(timer, f"denoise {num_steps} steps"):
                latent = E.t2v_latents(self, ids, shape, num_steps, timestep_shift, cfg_scale, seed, noise,
                                       tokenizer=self.tokenizer, progress=progress)
        else:
            from .processing import preprocess_image

            if width is not None or height is not None:
                raise ValueError("image-to-video takes its size from the image (bucketed by `preset`, as upstream); "
                                 "leave width and height unset")
            if E.latent_frames(num_frames, self.config.max_latent_frames) < 2:
                raise ValueError(f"image-to-video needs at least 5 frames (the image, then 4k more), got "
                                 f"{num_frames}; use 5, 9, ... (4k+1)")
            with _phase(timer, "encode first frame (VAE)"):
                pixels = preprocess_image(_as_pil(image), preset, vae=True, vit=False).vae_pixels
                k_pixels, k_eps = E.posterior_keys(posterior_seed)
                first = E.encode_latent(self.vae, E.i2v_pixels(pixels, num_frames, k_pixels), sample_posterior,
                                        k_eps)
            with _phase(timer, f"denoise {num_steps} steps"):
                latent = E.i2v_latents(self, ids, pixels, num_frames, num_steps, timestep_shift, cfg_scale, seed,
                                       noise, first_latent=first, tokenizer=self.tokenizer, progress=progress)
        return self.decode_latents(latent) if decode else latent

    def _tokenize(self, text: str) -> list:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _phase(timer, name: str):
    """`timer.phase(name)` of a cli.PhaseTimer, or a no-op without one."""
    from contextlib import nullcontext

    return timer.phase(name) if timer is not None else nullcontext()


def _as_pil(image):
    """Paths and PIL images pass through (processing.load_image opens them); (H, W, 3) uint8 arrays become PIL."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image)
    return image


def load_vision(config: ViTConfig, files: W.ModelFiles, bundled: Dict[str, mx.array], dtype: mx.Dtype,
                lazy: bool = False):
    """The ViT: the video checkpoint's bundled `vit_model.*` tensors when present (upstream loads them last, so
    they win), else `vit.safetensors`."""
    from .vit import VisionTransformer, sanitize_vit_weights

    vit = VisionTransformer(config)
    weights = bundled if bundled else W.load_safetensors([files.vit_weights], dtype=dtype)
    weights = sanitize_vit_weights(weights, config)
    vit.set_dtype(dtype)
    W.check_keys(vit, weights, "ViT")
    vit.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(vit.parameters())
    return vit

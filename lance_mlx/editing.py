"""Image/video editing, text-to-video and image-to-video on `Lance`: conditioning inputs, sequences, sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import sampler as S
from . import sequence as Q
from .lance import BranchState, GenerationContext, Velocity
from .media import to_uint8

# Upstream's global seed (config/config_factory.py `global_seed = 2025`): it, not the noise seed, drives the VAE
# posterior sample of conditioning latents and the pixel noise of image-to-video.
POSTERIOR_SEED = 2025
# The VAE encodes frame 0 alone, then groups of 4 (spec §7.3): valid pixel frame counts are 4k + 1.
FRAME_STRIDE = 4
# Our image-CFG extension: the context that drops the instruction (0), the conditioning latents (2) and the ViT
# block (4); upstream's own version of this branch cannot run (spec §0.1 C2).
TEXT_AND_VISION = (Q.MODALITY_TEXT, Q.MODALITY_REF_SOURCE, Q.MODALITY_REF_VIT)

ProgressFn = Callable[[int, int], Any]


# --------------------------------------------------------------------------------------------------- checks
def nearest_valid_frames(n: int) -> Tuple[int, ...]:
    """The 4k + 1 frame counts next to `n` (one value when `n` is below 5)."""
    n = int(n)
    if n <= 1:
        return (1,)
    lo = (n - 1) // FRAME_STRIDE * FRAME_STRIDE + 1
    return (lo,) if lo == n else (lo, lo + FRAME_STRIDE)


def latent_frames(num_frames: int, max_latent_frames: int, what: str = "frame count") -> int:
    """Latent frames (F - 1) / 4 + 1 of F pixel frames, or a ValueError naming the valid counts."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"{what} must be a positive integer 4k+1 (1, 5, 9, ...), got {num_frames!r}")
    max_frames = FRAME_STRIDE * (max_latent_frames - 1) + 1
    if (num_frames - 1) % FRAME_STRIDE:
        near = " or ".join(str(v) for v in nearest_valid_frames(num_frames) if v <= max_frames)
        raise ValueError(f"{what} {num_frames} is not of the form 4k+1 (the VAE encodes frame 0 alone, then groups "
                         f"of 4); use {near}")
    if num_frames > max_frames:
        raise ValueError(f"{what} {num_frames} is too long: the 3-D latent position table has {max_latent_frames} "
                         f"latent frames, so at most {max_frames} frames; use {max_frames} or fewer")
    return (num_frames - 1) // FRAME_STRIDE + 1


def check_instruction(text: Optional[str], what: str = "instruction") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"the {what} is empty; say what to change, e.g. \"make the sky pink\"")
    return text


# ------------------------------------------------------------------------------------------ conditioning
def _as_mx(a) -> mx.array:
    return a.astype(mx.float32) if isinstance(a, mx.array) else mx.array(np.asarray(a, dtype=np.float32))


def posterior_keys(posterior_seed: Optional[int]) -> Tuple[mx.array, mx.array]:
    """(pixel-noise key, posterior-eps key) derived from one seed (upstream draws both from its global RNG)."""
    seed = POSTERIOR_SEED if posterior_seed is None else int(posterior_seed)
    k_pixels, k_eps = mx.random.split(mx.random.key(seed), 2)
    return k_pixels, k_eps


def encode_latent(vae, pixels, sample_posterior: bool = True, key: Optional[mx.array] = None) -> mx.array:
    """VAE latent (1, t, h, w, 48) float32 of pixels (T, H, W, 3) in [-1, 1].

    `sample_posterior` gives upstream's conditioning latent (WanVideoVAE `use_sample=True`): mu_n +
    exp(0.5 * log_var) * eps with the raw log_var; False gives the posterior mean mu_n (deterministic).
    """
    video = _as_mx(pixels)[None]  # (1, T, H, W, 3)
    if sample_posterior:
        return vae.encode(video, key=posterior_keys(None)[1] if key is None else key)
    return vae.encode(video)


def i2v_pixels(image_pixels, num_frames: int, key: mx.array) -> mx.array:
    """Upstream ff2v_sample's pixel video (T, H, W, 3): N(0, 1) noise frames with frames 0-3 set to the image."""
    img = _as_mx(image_pixels)
    img = img.reshape(1, *img.shape[-3:])
    _, H, W, C = img.shape
    noise = mx.random.normal((num_frames, H, W, C), key=key)
    k = min(FRAME_STRIDE, num_frames)
    return mx.concatenate([mx.broadcast_to(img, (k, H, W, C)), noise[k:]], axis=0)


def vit_embeddings(vit, patches, grid_thw) -> Tuple[mx.array, Tuple[int, int, int]]:
    """ViT embeddings (K, hidden) and the merged token grid (T/2, H/28, W/28) of the ViT block."""
    m = getattr(getattr(vit, "config", None), "spatial_merge_size", 2)
    emb = vit(mx.array(np.asarray(patches)), grid_thw)
    mx.eval(emb)
    gt, gh, gw = (int(v) for v in grid_thw)
    return emb, (gt, gh // m, gw // m)


# --------------------------------------------------------------------------------------------- sequences
def build_edit_sequence(instruction_ids, vit_embeds, vit_grid, cond_latent: mx.array, vision_type: str = "image",
                        tokenizer=None) -> Q.Sequence:
    """Edit layout (spec §5.3): [template] [ViT block] [conditioning latents] [instruction] [assistant] [target].

    The ViT embeddings and the conditioning latent (1, t, h, w, 48) ride in the splits' `data`; the target grid
    equals the conditioning grid, so the target reuses the conditioning block's positions.
    """
    _, t, h, w, c = cond_latent.shape
    return Q.edit_sequence(instruction_ids, vit_grid, (t, h, w), vision_type=vision_type, tokenizer=tokenizer,
                           vit_data=vit_embeds, cond_data=cond_latent.reshape(t * h * w, c))


def first_frame_mask(shape: Tuple[int, int, int]) -> np.ndarray:
    """(t*h*w,) True on the first latent frame's tokens (i2v: kept at t = 0 and never updated)."""
    t, h, w = shape
    m = np.zeros(t * h * w, dtype=bool)
    m[:h * w] = True
    return m


# ------------------------------------------------------------------------------------- image-CFG extension
@dataclass
class EditContext:
    """A prepared edit: the conditional / text-unconditional contexts and, with image CFG, the third one."""

    gen: GenerationContext
    vision: Optional[BranchState]  # text-and-vision-dropped branch (None unless image CFG is on)


@dataclass
class GuidedVelocity(Velocity):
    """`Velocity` plus the text-and-vision-dropped velocity of the image-CFG extension."""

    v_uncond_all: Optional[mx.array] = None


def branch_state(model, branch: Q.Branch) -> BranchState:
    """Prefill one CFG branch's context into its own KV cache."""
    cache, _ = model.prefill(branch.context, branch.context_positions)
    rope = model.language_model.model.rope(branch.noise_positions)
    mx.eval(rope)
    return BranchState(branch, cache, rope, [])


def prepare_edit(model, seq: Q.Sequence, cfg_scale: float = S.CFG_SCALE,
                 image_cfg_scale: float = 1.0) -> EditContext:
    """Prefill each branch's context once: conditional; text-dropped when any guidance is on; and with
    `image_cfg_scale > 1` the context without instruction, ViT block and conditioning latents (`TEXT_AND_VISION`).

    That third branch keeps the template head and the `<|im_end|>\\n<|im_start|>assistant\\n` split with their
    conditional position ids, and its noise block takes the ids get_rope_index gives on the shortened sequence
    (no full split is left, so no shift applies): the same rule upstream uses for its text-dropped branch.
    """
    guided = cfg_scale > 1.0 or image_cfg_scale > 1.0
    ctx = model.prepare_generation(seq, cfg=guided)
    vision = branch_state(model, seq.branch(TEXT_AND_VISION)) if image_cfg_scale > 1.0 else None
    return EditContext(ctx, vision)


def guided_velocity(model, ectx: EditContext, x: mx.array, t, cfg_scale: float = S.CFG_SCALE,
                    image_cfg_scale: float = 1.0, renorm_min: float = S.CFG_RENORM_MIN) -> GuidedVelocity:
    """One step's velocity. Without image CFG this is `Lance.velocity` (upstream's two-component text CFG);
    with it, v_tv + s_text (v_c - v_t) + s_img (v_t - v_tv), renormalized globally against v_c like upstream's
    text CFG. s_img = 1 reduces to the two-component form."""
    ctx = ectx.gen
    if image_cfg_scale <= 1.0 or ectx.vision is None:
        v = model.velocity(ctx, x, t, cfg_scale, renorm_min)
        return GuidedVelocity(v.v_cond, v.v_uncond, v.v_cfg, v.scale, v.v)
    h_in = model.noise_inputs(ctx, x, t)

    def query(state):
        h = model.noise_query(ctx, state, h_in)
        return model.llm2vae(h[0, 1:-1]).astype(mx.float32)  # (N, 48)

    v_c, v_t, v_tv = query(ctx.cond), query(ctx.uncond), query(ectx.vision)
    v_cfg = v_tv + cfg_scale * (v_c - v_t) + image_cfg_scale * (v_t - v_tv)
    scale = S.renorm_scale(v_c, v_cfg, renorm_min)
    return GuidedVelocity(v_c, v_t, v_cfg, scale, v_cfg * scale, v_tv)


def sample_guided(model, ectx: EditContext, noise: mx.array, num_steps: int = S.NUM_STEPS,
                  timestep_shift: float = S.TIMESTEP_SHIFT, cfg_scale: float = S.CFG_SCALE,
                  image_cfg_scale: float = 1.0, cfg_interval: Tuple[float, float] = S.CFG_INTERVAL,
                  renorm_min: float = S.CFG_RENORM_MIN, progress: Optional[ProgressFn] = None) -> mx.array:
    """Euler loop of `Lance.sample` with the three-component guidance; both scales drop to 1 outside the CFG
    interval. Returns latents (N, 48) float32."""
    ts, dts = S.timesteps(num_steps, timestep_shift)
    x = noise.astype(mx.float32)
    for i, (t, dt) in enumerate(zip(ts.tolist(), dts.tolist())):
        on = S.cfg_active(t, cfg_interval)
        v = guided_velocity(model, ectx, x, t, cfg_scale if on else 1.0, image_cfg_scale if on else 1.0,
                            renorm_min).v
        x = S.euler_step(x, v, dt)
        mx.eval(x)
        if progress is not None:
            progress(i + 1, num_steps)
    return x


# ----------------------------------------------------------------------------------------------- requests
@dataclass
class EditInputs:
    """The encoded source of an edit: ViT embeddings (K, hidden) + merged grid, and the conditioning latent."""

    vit_embeds: mx.array
    vit_grid: Tuple[int, int, int]
    cond_latent: mx.array  # (1, t, h, w, 48) float32

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return tuple(int(v) for v in self.cond_latent.shape[1:4])


def encode_edit_inputs(model, visual, sample_posterior: bool = True,
                       posterior_seed: Optional[int] = None) -> EditInputs:
    """Run a preprocessed source (`processing.VisualInput`) through the ViT and the VAE encoder, once; the
    latent is shared by every CFG branch (separate encodes would give each branch its own sample)."""
    model._require("vit", "vae")
    latent_frames(visual.vae_pixels.shape[0], model.config.max_latent_frames, "source frame count")
    emb, grid = vit_embeddings(model.vit, visual.vit_patches, visual.grid_thw)
    cond = encode_latent(model.vae, visual.vae_pixels, sample_posterior, posterior_keys(posterior_seed)[1])
    return EditInputs(emb, grid, cond)


def edit_latents(model, inputs: EditInputs, instruction_ids, vision_type: str = "image",
                 num_steps: int = S.NUM_STEPS, timestep_shift: float = S.TIMESTEP_SHIFT,
                 cfg_scale: float = S.CFG_SCALE, image_cfg_scale: float = 1.0, seed: int = 42, noise=None,
                 cfg_interval: Tuple[float, float] = S.CFG_INTERVAL, tokenizer=None,
                 progress: Optional[ProgressFn] = None) -> mx.array:
    """Edited latents (1, t, h, w, 48) float32 of an image_edit / video_edit request.

    `instruction_ids`: the instruction alone (add_special_tokens=False). With `image_cfg_scale` = 1 (default)
    this is upstream's sampler exactly (`Lance.generate`); above 1 it uses the three-component extension.
    """
    ids = model._prompt_ids(instruction_ids, None, None)
    shape = inputs.latent_shape
    model.latent_pos.check(shape)
    seq = build_edit_sequence(ids, inputs.vit_embeds, inputs.vit_grid, inputs.cond_latent, vision_type, tokenizer)
    model._check_length(seq, len(ids))
    if image_cfg_scale <= 1.0:
        return model.generate(seq, num_steps, timestep_shift, cfg_scale, seed, noise, cfg_interval,
                              progress=progress)
    t, h, w = shape
    x0 = model.initial_noise(t * h * w, seed, noise, shape)
    ectx = prepare_edit(model, seq, cfg_scale, image_cfg_scale)
    x = sample_guided(model, ectx, x0, num_steps, timestep_shift, cfg_scale, image_cfg_scale, cfg_interval,
                      progress=progress)
    return x.reshape(1, t, h, w, model.config.latent_channels)


def video_latent_shape(model, num_frames: int, width: int, height: int) -> Tuple[int, int, int]:
    """(t, h, w) of a generated video, checking the frame count (4k+1, table length) and the size."""
    from .pipelines import check_image_size

    t = latent_frames(num_frames, model.config.max_latent_frames)
    h, w = check_image_size(width, height, model.config)
    return t, h, w


def t2v_latents(model, prompt_ids, latent_shape: Tuple[int, int, int], num_steps: int = S.NUM_STEPS,
                timestep_shift: float = S.TIMESTEP_SHIFT, cfg_scale: float = S.CFG_SCALE, seed: int = 42,
                noise=None, cfg_interval: Tuple[float, float] = S.CFG_INTERVAL, tokenizer=None,
                progress: Optional[ProgressFn] = None) -> mx.array:
    """Text-to-video latents (1, t, h, w, 48): the t2i layout with the t2v system prompt and a 3-D target."""
    ids = model._prompt_ids(prompt_ids, None, None)
    model.latent_pos.check(latent_shape)
    seq = Q.generation_sequence("t2v", ids, latent_shape, tokenizer=tokenizer)
    model._check_length(seq, len(ids))
    return model.generate(seq, num_steps, timestep_shift, cfg_scale, seed, noise, cfg_interval, progress=progress)


def i2v_latents(model, prompt_ids, image_pixels, num_frames: int, num_steps: int = S.NUM_STEPS,
                timestep_shift: float = S.TIMESTEP_SHIFT, cfg_scale: float = S.CFG_SCALE, seed: int = 42,
                noise=None, cfg_interval: Tuple[float, float] = S.CFG_INTERVAL, sample_posterior: bool = True,
                posterior_seed: Optional[int] = None, first_latent: Optional[mx.array] = None, tokenizer=None,
                progress: Optional[ProgressFn] = None) -> mx.array:
    """Image-to-video latents (1, t, h, w, 48) (upstream ff2v_sample + validation_gen_KVcache, spec §5.5).

    The pixel video = N(0, 1) frames with frames 0-3 replaced by the image (1, H, W, 3) in [-1, 1]; it is
    VAE-encoded whole (sampled), and its first latent frame replaces the noise there: those tokens stay fixed at
    t = 0 and are not updated, while the CFG renorm norms still cover them. `first_latent` (1, t, h, w, 48)
    injects that encoding instead (parity tests).
    """
    ids = model._prompt_ids(prompt_ids, None, None)
    t = latent_frames(num_frames, model.config.max_latent_frames)
    if t < 2:
        raise ValueError(f"image-to-video needs at least 5 frames (one latent frame after the image), got "
                         f"{num_frames}; use 5, 9, ... frames (4k+1)")
    H, W = np.shape(image_pixels)[-3:-1]
    s = model.config.vae_spatial_stride
    if H % s or W % s:
        raise ValueError(f"the first-frame image is {W}x{H}; width and height must be multiples of {s} (preprocess "
                         "it with processing.preprocess_image)")
    shape = (t, H // s, W // s)
    model.latent_pos.check(shape)
    if first_latent is None:
        model._require("vae")
        k_pixels, k_eps = posterior_keys(posterior_seed)
        first_latent = encode_latent(model.vae, i2v_pixels(image_pixels, num_frames, k_pixels), sample_posterior,
                                     k_eps)
    c = model.config.latent_channels
    if tuple(first_latent.shape) != (1, *shape, c):
        raise ValueError(f"first_latent has shape {tuple(first_latent.shape)}, expected {(1, *shape, c)}")
    seq = Q.generation_sequence("i2v", ids, shape, tokenizer=tokenizer)
    model._check_length(seq, len(ids))
    frozen = first_frame_mask(shape)
    x0 = model.initial_noise(len(frozen), seed, noise, shape)
    x0 = mx.where(mx.array(frozen)[:, None], first_latent.reshape(-1, c), x0)
    return model.generate(seq, num_steps, timestep_shift, cfg_scale, seed, x0, cfg_interval, frozen=frozen,
                          progress=progress)


# ------------------------------------------------------------------------------------------------ decoding
def iter_frames(vae, latent: mx.array) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 frames of latents (1, t, h, w, 48), yielded as the VAE decodes them chunk by chunk."""
    for chunk in vae.decode_stream(latent):
        for frame in to_uint8(np.array(chunk[0])):
            yield frame


__all__ = [
    "EditContext", "EditInputs", "FRAME_STRIDE", "GuidedVelocity", "POSTERIOR_SEED", "TEXT_AND_VISION",
    "branch_state", "build_edit_sequence", "check_instruction", "edit_latents", "encode_edit_inputs",
    "encode_latent", "first_frame_mask", "guided_velocity", "i2v_latents", "i2v_pixels", "iter_frames",
    "latent_frames", "nearest_valid_frames", "posterior_keys", "prepare_edit", "sample_guided", "t2v_latents",
    "video_latent_shape", "vit_embeddings",
]

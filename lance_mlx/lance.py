"""`Lance`: the pure model — MoT language model, latent adapters, context prefill and the noise-block velocity."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union
from typing import Sequence as Seq

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import sampler as S
from .batched import BatchedNoiseStep
from .config import DEFAULT_SAMPLING, LanceConfig, SamplingParams
from .errors import InvalidRequestError
from .llm import KVCache, Qwen2ForCausalLM, Rope, Routing, cache_arrays
from .sampler import Step, Velocity
from .sequence import TEXT_AND_VISION, Branch, Sequence, Split, attention_mask, generation_sequence
from .sizes import check_latent_grid

__all__ = ["Lance", "LanceConfig", "TimestepEmbedder", "LatentPositionTable", "GenerationContext", "Velocity",
           "BranchState"]


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256-d [cos, sin] frequency embedding -> Linear -> SiLU -> Linear (modeling_utils.py)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        # a list, so the keys are mlp.0.* and mlp.2.* as upstream's nn.Sequential
        self.mlp = [nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                    nn.Linear(hidden_size, hidden_size)]
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
        """(N,) times -> (N, dim) float32, cos first; t is used as is (no x1000)."""
        half = dim // 2
        # float32 arithmetic as upstream: exp(-ln(max_period) * k / half)
        freqs = np.exp(np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half))
        args = t.astype(mx.float32)[:, None] * mx.array(freqs.astype(np.float32))[None]
        emb = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
        if dim % 2:
            emb = mx.concatenate([emb, mx.zeros_like(emb[:, :1])], axis=-1)
        return emb

    def __call__(self, t: mx.array, dtype: Optional[mx.Dtype] = None) -> mx.array:
        """(N,) times -> (N, hidden), computed in `dtype` (default: the weights' dtype, as upstream)."""
        x = self.timestep_embedding(t, self.frequency_embedding_size).astype(dtype or self.mlp[0].weight.dtype)
        for layer in self.mlp:
            x = layer(x)
        return x


class LatentPositionTable:
    """Rows of upstream's fixed 3-D sin-cos latent table (frames x size x size, hidden), computed on demand.

    modeling_utils.py::get_3d_sincos_pos_embed: per axis `[sin(p*w), cos(p*w)]`, w_k = 10000^(-k/(D/2)),
    float64 then float32; axis dims d, d, hidden - 2d with d = hidden // 3 made even; entry i of the table holds
    axis positions (i // size^2, i // size % size, i % size). Latent (t, h, w) takes entry t*size^2 + h*size + w
    whatever the grid's width (data_utils.py::get_flattened_position_ids_extrapolate_video), so a column past
    `size` reads the next row's entry; only an index past the table is refused (sizes.check_latent_grid). Plain
    object (not a Module), so nothing here is a parameter.
    """

    def __init__(self, hidden_size: int, max_frames: int, max_size: int):
        d = hidden_size // 3
        d = d if d % 2 == 0 else d - 1
        self.dims = (d, d, hidden_size - 2 * d)
        self.max_frames, self.max_size = max_frames, max_size
        self._cache: Dict[Tuple[int, int, int], mx.array] = {}

    @staticmethod
    def _axis(dim: int, n: int) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.arange(n, dtype=np.float32)[:, None] * omega[None]  # float64 (n, dim/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    def check(self, shape: Tuple[int, int, int]) -> None:
        """InvalidRequestError (one line, naming the sizes that fit) when the grid indexes past the table."""
        check_latent_grid(shape, self.max_frames, self.max_size)

    def rows(self, shape: Tuple[int, int, int]) -> mx.array:
        """(t*h*w, hidden) float32 table entries of the latent grid (t, h, w) in raster order."""
        shape = tuple(int(v) for v in shape)
        if shape not in self._cache:
            self.check(shape)
            s, ids = self.max_size, self.row_ids(shape)
            # float64 sin/cos rounded to float32 per entry, as upstream's table (.float() after the concat)
            et, eh, ew = (self._axis(d, n).astype(np.float32)
                          for d, n in zip(self.dims, (self.max_frames, s, s)))
            rows = np.concatenate([et[ids // (s * s)], eh[ids // s % s], ew[ids % s]], axis=1)  # (t*h*w, hidden)
            self._cache[shape] = mx.array(rows)
        return self._cache[shape]

    def row_ids(self, shape: Tuple[int, int, int]) -> np.ndarray:
        """Upstream's flattened table indices t*size^2 + h*size + w (data_utils.py)."""
        t, h, w = shape
        s = self.max_size
        return (np.arange(t)[:, None, None] * s * s + np.arange(h)[None, :, None] * s
                + np.arange(w)[None, None, :]).reshape(-1)


@dataclass
class BranchState:
    """One CFG branch ready for noise queries: its frozen context cache and the noise block's RoPE tables."""

    branch: Branch
    cache: List[KVCache]
    rope: Rope
    context_hidden: List[mx.array]  # final-normed hidden states of each prefilled split (when kept)


@dataclass
class GenerationContext:
    """Everything fixed across the denoising steps of one request: one prefilled context per guidance branch."""

    sequence: Sequence
    shape: Tuple[int, int, int]
    cond: BranchState
    uncond: Optional[BranchState]  # text dropped (upstream's CFG branch)
    markers: mx.array  # (2, hidden): <|vision_start|>, <|vision_end|> embeddings of the noise block
    pos_rows: mx.array  # (N, hidden) 3-D table rows of the target grid, model dtype
    routing: Routing  # und, gen x N, und
    vision: Optional[BranchState] = None  # text and visual conditioning dropped (image guidance, docs/editing.md)
    # the batched step of these branches, built on first use (not copied by dataclasses.replace)
    _batched: Dict[str, BatchedNoiseStep] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.shape
        return t * h * w


class Lance(nn.Module):
    """Lance 3B (LLM + adapters). Keys equal upstream's state dict minus `latent_pos_embed.pos_embed`.

    The pure model: token and latent embeddings, context prefill, the noise block's velocity for 1-3 guidance
    branches, and the seed API `sample_t2i`. Files, tokenizers, images and tasks live in `pipeline.py`.
    """

    def __init__(self, config: LanceConfig):
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        patch_dim = config.latent_channels * config.latent_patch_size ** 3
        self.language_model = Qwen2ForCausalLM(config.llm)
        self.vae2llm = nn.Linear(patch_dim, hidden)
        self.llm2vae = nn.Linear(hidden, patch_dim)
        self.time_embedder = TimestepEmbedder(hidden, config.timestep_frequency_dim)
        # upstream discards the stored table and rebuilds this one (inference_lance.py)
        self.latent_pos = LatentPositionTable(hidden, config.max_latent_frames, config.max_latent_size)

    # ------------------------------------------------------------------------------------------------ weights
    @staticmethod
    def sanitize(weights: Dict[str, Any]) -> Dict[str, Any]:
        """Drop the stored latent position table (rebuilt) and the ViT bundled with the video checkpoint."""
        return {k: v for k, v in weights.items()
                if k != "latent_pos_embed.pos_embed" and not k.startswith("vit_model.")}

    def load_weights(self, file_or_weights, strict: bool = True):
        """`nn.Module.load_weights` after `sanitize`, so a raw upstream `model.safetensors` (whose stored
        position table and bundled ViT are not parameters here) loads strictly as is."""
        if not isinstance(file_or_weights, str):
            file_or_weights = list(self.sanitize(dict(file_or_weights)).items())
        else:
            file_or_weights = list(self.sanitize(mx.load(file_or_weights)).items())
        return super().load_weights(file_or_weights, strict=strict)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype of the activations: `compute_dtype` when set, else the weights' dtype."""
        return self.compute_dtype or self.vae2llm.weight.dtype

    @property
    def compute_dtype(self) -> Optional[mx.Dtype]:
        return self.language_model.model.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: Optional[mx.Dtype]) -> None:
        """Run the LLM's activations in `dtype` whatever the weights' dtype (None: the weights' dtype). float32
        over bfloat16 weights upcasts each weight per matmul: on CPUs without a fast bf16 GEMM that is faster than
        bf16 compute, and closer to float32 numerics; on Apple GPUs bf16 compute is faster (docs/performance.md)."""
        self.language_model.model.compute_dtype = dtype

    # --------------------------------------------------------------------------------------------- embeddings
    def embed_tokens(self, ids) -> mx.array:
        """(L,) ids -> (L, hidden)."""
        return self.language_model.model.embed_tokens(mx.array(np.asarray(ids, dtype=np.int32))).astype(self.dtype)

    def time_embed(self, t: Union[float, mx.array]) -> mx.array:
        """(1, hidden) for a scalar t, (n, hidden) for per-token times."""
        ta = mx.array(t, dtype=mx.float32).reshape(-1)
        return self.time_embedder(ta, self.dtype)

    def embed_latents(self, x: mx.array, t: Union[float, mx.array], shape: Tuple[int, int, int],
                      pos_rows: Optional[mx.array] = None) -> mx.array:
        """Latent tokens (N, 48) -> vae2llm(x) + time(t) + pos3d rows, (N, hidden) in the model dtype."""
        dt = self.dtype
        if pos_rows is None:
            pos_rows = self.latent_pos.rows(shape).astype(dt)
        return self.vae2llm(x.astype(dt)) + self.time_embed(t).astype(dt) + pos_rows

    def embed_split(self, split: Split, x: Optional[mx.array] = None, t: Union[float, mx.array] = 0.0) -> mx.array:
        """(1, L, hidden) inputs of a split. Visual blocks take `x` (or `split.data`) as the body: ViT embeddings
        (K, hidden) or latents (t*h*w, 48), conditioning latents at t = 0 by default."""
        if split.kind == "text":
            return self.embed_tokens(split.ids)[None]
        body = split.data if x is None else x
        if body is None:
            raise ValueError(f"the {split.kind} split needs its input (ViT embeddings or latents) in `data`")
        markers = self.embed_tokens([split.ids[0], split.ids[-1]])
        if split.kind == "vit":
            body = mx.array(body).astype(self.dtype)
        else:
            body = self.embed_latents(mx.array(body), t, split.grid)
        return mx.concatenate([markers[:1], body, markers[1:]], axis=0)[None]

    # ---------------------------------------------------------------------------------------------- context
    def prefill(self, splits: Seq[Split], positions: Seq[np.ndarray], cache: Optional[List[KVCache]] = None,
                return_hidden: bool = False) -> Tuple[List[KVCache], List[mx.array]]:
        """Run splits in order into a KV cache (causal splits causal over cache + split, full splits
        bidirectional over cache + split); latent bodies take the gen expert. Returns (cache, hidden), hidden
        being the final-normed (1, L, hidden) states of each split when `return_hidden` (e.g. for logits)."""
        lm = self.language_model.model
        cache = cache if cache is not None else self.language_model.make_cache()
        hidden = []
        for s, p in zip(splits, positions):
            h = lm(self.embed_split(s), p, routing=Routing(s.gen_mask),
                   cache=cache, attn="causal" if s.is_causal else "full")
            # Evaluate the outputs now: an unevaluated one would keep every layer's activations alive.
            if return_hidden:
                hidden.append(h)
                mx.eval(h, cache_arrays(cache))
            else:
                mx.eval(cache_arrays(cache))
        return cache, hidden

    def _branch_state(self, branch: Branch, keep_hidden: bool = False) -> BranchState:
        cache, hidden = self.prefill(branch.context, branch.context_positions, return_hidden=keep_hidden)
        rope = self.language_model.model.rope(branch.noise_positions)
        return BranchState(branch, cache, rope, hidden)

    def prepare_generation(self, seq: Sequence, cfg: bool = True, image_cfg: bool = False,
                           keep_hidden: bool = False) -> GenerationContext:
        """Prefill each guidance branch's context of `seq` once: the conditional one; with `cfg` the
        text-dropped one; with `image_cfg` also the one without text and visual conditioning (`TEXT_AND_VISION`).
        `keep_hidden` also keeps each prefilled split's output hidden states (debugging, parity tests).

        The third branch keeps the template head and the `<|im_end|>\\n<|im_start|>assistant\\n` split with their
        conditional position ids; its noise block takes the ids get_rope_index gives on the shortened sequence,
        the rule upstream uses for its text-dropped branch (sequence.Sequence.branch).
        """
        cond_b, uncond_b = seq.cfg_branches() if (cfg or image_cfg) else (seq.branch(()), None)
        noise = cond_b.noise
        if noise.kind != "latent":
            raise ValueError("the noise split must be a latent block")
        shape = noise.grid
        self.latent_pos.check(shape)
        dt = self.dtype
        markers = self.embed_tokens([noise.ids[0], noise.ids[-1]])
        pos_rows = self.latent_pos.rows(shape).astype(dt)
        cond = self._branch_state(cond_b, keep_hidden)
        uncond = self._branch_state(uncond_b, keep_hidden) if uncond_b is not None else None
        vision = self._branch_state(seq.branch(TEXT_AND_VISION), keep_hidden) if image_cfg else None
        ropes = [b.rope for b in (cond, uncond, vision) if b is not None]
        mx.eval(markers, pos_rows, *ropes)
        return GenerationContext(seq, shape, cond, uncond, markers, pos_rows, Routing(noise.gen_mask), vision)

    # ---------------------------------------------------------------------------------------------- velocity
    def noise_inputs(self, ctx: GenerationContext, x: mx.array, t: Union[float, mx.array]) -> mx.array:
        """(1, N+2, hidden) noise-block inputs: VS marker, latent tokens, VE marker."""
        body = self.embed_latents(x, t, ctx.shape, ctx.pos_rows)
        return mx.concatenate([ctx.markers[:1], body, ctx.markers[1:]], axis=0)[None]

    def noise_query(self, ctx: GenerationContext, state: BranchState, h_in: mx.array) -> mx.array:
        """Final-normed hidden states (1, N+2, hidden) of the noise block attending to the frozen cache."""
        return self.language_model.model(h_in, rope=state.rope, routing=ctx.routing, cache=state.cache,
                                         attn="full", update_cache=False)

    def _v(self, h_out: mx.array) -> mx.array:
        return self.llm2vae(h_out[0, 1:-1]).astype(mx.float32)  # (N, 48)

    def batched_step(self, ctx: GenerationContext) -> BatchedNoiseStep:
        """The batched noise-block forward of ctx's branches (lance_mlx/batched.py), stacked on first use."""
        states = [b for b in (ctx.cond, ctx.uncond, ctx.vision) if b is not None]
        step = ctx._batched.get("step")
        if step is None or not step.batch.matches(states):
            step = ctx._batched["step"] = BatchedNoiseStep(self, ctx.routing, states, ctx.markers, ctx.pos_rows)
        return step

    def velocity(self, ctx: GenerationContext, x: mx.array, t: Union[float, mx.array],
                 cfg_scale: float = S.CFG_SCALE, image_cfg_scale: float = 1.0,
                 renorm_min: float = S.CFG_RENORM_MIN, batched: bool = True, compiled: bool = True) -> Velocity:
        """One step's velocity at latents x (N, 48) and time t (scalar or per token): each branch the scales
        need is queried against its cached context, then `sampler.guide` combines them (text CFG as upstream;
        image guidance when `image_cfg_scale` > 1 and the context has the third branch).

        `batched` (default) runs the branches as one batch, so each weight is read once per step, through one
        `mx.compile`d forward when `compiled` (docs/performance.md); `batched=False` queries them one after the
        other (uncompiled), the reference the batched step is tested against."""
        use_all = image_cfg_scale > 1.0 and ctx.vision is not None
        use_text = ctx.uncond is not None and (cfg_scale > 1.0 or use_all)
        if batched and (ctx.uncond is not None or ctx.vision is None):  # the rows used are a prefix of the stack
            v = self.batched_step(ctx)(x, t, 1 + use_text + use_all, compiled)  # (rows, N, 48)
            return S.guide(v[0], v[1] if use_text else None, v[2] if use_all else None, cfg_scale,
                           image_cfg_scale, renorm_min)
        h_in = self.noise_inputs(ctx, x, t)
        v_c = self._v(self.noise_query(ctx, ctx.cond, h_in))
        v_t = self._v(self.noise_query(ctx, ctx.uncond, h_in)) if use_text else None
        v_a = self._v(self.noise_query(ctx, ctx.vision, h_in)) if use_all else None
        return S.guide(v_c, v_t, v_a, cfg_scale, image_cfg_scale, renorm_min)

    def velocity_uncached(self, branch: Branch, x: mx.array, t: Union[float, mx.array]) -> mx.array:
        """Reference velocity (N, 48): the branch's whole sequence in one forward with the explicit sparse mask
        of upstream create_sparse_mask (no KV cache)."""
        parts = [self.embed_split(s) for s in branch.context]
        parts.append(self.embed_split(branch.noise, x=x, t=t))
        h = mx.concatenate(parts, axis=1)
        gen = np.concatenate([s.gen_mask for s in branch.context] + [branch.noise.gen_mask])
        mask = mx.array(attention_mask(branch.split_lens, branch.attn_modes))
        out = self.language_model.model(h, branch.kv_position_ids, routing=Routing(gen), attn=mask)
        c = branch.context_len
        return self.llm2vae(out[0, c + 1:c + len(branch.noise) - 1]).astype(mx.float32)

    # ------------------------------------------------------------------------------------------------ sample
    def denoise(self, seq: Sequence, params: SamplingParams = DEFAULT_SAMPLING,
                frozen: Optional[np.ndarray] = None, batched: bool = True) -> Iterator[Step]:
        """The sampling loop (`sampler.denoise`) over the noise split of any generation sequence (t2i, t2v, i2v,
        image/video edit): start from `params.noise` or seeded N(0, 1), prefill the branches the guidance needs,
        yield a `sampler.Step` after each step. `frozen` (N,) rows of the start latents stay as given (i2v).
        `batched=False` runs the guidance branches one after the other (see `velocity`)."""
        shape = seq.splits[seq.noise_index].grid
        self.latent_pos.check(shape)
        t, h, w = shape
        x0 = self.initial_noise(t * h * w, params.seed, params.noise, shape)
        image_cfg = params.cfg_image > 1.0
        ctx = self.prepare_generation(seq, cfg=params.cfg_text > 1.0 or image_cfg, image_cfg=image_cfg)

        def velocity(x, tt, text_scale, image_scale):
            return self.velocity(ctx, x, tt, text_scale, image_scale, params.renorm_min, batched=batched)

        yield from S.denoise(velocity, x0, params, frozen, grid=shape)

    def generate(self, seq: Sequence, params: SamplingParams = DEFAULT_SAMPLING,
                 frozen: Optional[np.ndarray] = None, progress=None) -> mx.array:
        """Latents (1, T, h, w, 48) float32 of `denoise` run to the end; `progress(i, n)` after each step."""
        x = None
        for step in self.denoise(seq, params, frozen):
            x = step.latents
            if progress is not None:
                progress(step.index, step.total)
        t, h, w = seq.splits[seq.noise_index].grid
        return x.reshape(1, t, h, w, self.config.latent_channels)  # (1, T, h, w, 48)

    def _prompt_ids(self, prompt_token_ids, prompt, tokenizer) -> np.ndarray:
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("no prompt: pass prompt_token_ids= (ids of the prompt alone) or prompt= with "
                                 "tokenizer=")
            if tokenizer is None:
                raise ValueError("prompt= needs tokenizer= (or pass prompt_token_ids=)")
            prompt_token_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = np.asarray(prompt_token_ids.tolist() if isinstance(prompt_token_ids, mx.array) else prompt_token_ids,
                         dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("the prompt is empty; give a non-empty text prompt")
        vocab = self.config.llm.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}); tokenize with the model's tokenizer")
        return ids

    def _check_length(self, seq: Sequence, n_prompt: int) -> None:
        # The limit is the position window the text tower was configured for (llm max_position_embeddings,
        # 128000): template + prompt + latent block must fit in it.
        limit = self.config.llm.max_position_embeddings
        if len(seq) > limit:
            raise InvalidRequestError(f"the sequence has {len(seq)} tokens (prompt {n_prompt}) but the context limit "
                                      f"is {limit} (max_position_embeddings); shorten the prompt to at most "
                                      f"{limit - (len(seq) - n_prompt)} tokens or use a smaller latent grid")

    @staticmethod
    def _latent_shape(latent_shape) -> Tuple[int, int, int]:
        try:
            t, h, w = (int(v) for v in latent_shape)
        except (TypeError, ValueError):
            raise ValueError(f"latent_shape must be (T, h, w) latents, got {latent_shape!r}") from None
        return t, h, w

    def initial_noise(self, n: int, seed: int = DEFAULT_SAMPLING.seed, noise=None, shape=None) -> mx.array:
        """(n, 48) float32 start latents: `noise` ((n, 48) or (1, T, h, w, 48)) when given, else N(0, 1) from
        `seed` (MLX's generator; upstream's CUDA noise cannot be reproduced, inject it for parity)."""
        c = self.config.latent_channels
        if noise is None:
            return mx.random.normal((n, c), key=mx.random.key(int(seed)))
        a = mx.array(noise).astype(mx.float32)
        if a.size != n * c or a.shape[-1] != c:
            raise ValueError(f"noise has shape {tuple(a.shape)}; expected ({n}, {c}) or (1, *{tuple(shape)}, {c})")
        return a.reshape(n, c)  # (t*h*w, 48), raster order t, h, w

    def sample_t2i(self, prompt_token_ids=None, latent_shape=(1, 32, 32), num_steps: int = S.NUM_STEPS,
                   timestep_shift: float = S.TIMESTEP_SHIFT, cfg_scale: float = S.CFG_SCALE,
                   seed: int = DEFAULT_SAMPLING.seed, noise=None, prompt: Optional[str] = None, tokenizer=None,
                   cfg_interval: Tuple[float, float] = S.CFG_INTERVAL, progress=None, special_token_ids=None,
                   **ignored) -> mx.array:
        """Text-to-image latents (1, T, h, w, 48) float32 with upstream's t2i template and KV-cached sampler.

        The seed API, kept as it was: `prompt_token_ids` are the ids of the user prompt alone
        (add_special_tokens=False), or pass `prompt` + `tokenizer`. `progress(i, n)` is called after each step.
        `special_token_ids` is accepted for compatibility and ignored (the template ids are fixed).
        """
        ids = self._prompt_ids(prompt_token_ids, prompt, tokenizer)
        shape = self._latent_shape(latent_shape)
        self.latent_pos.check(shape)
        seq = generation_sequence("t2i", ids, shape, tokenizer=tokenizer)
        self._check_length(seq, len(ids))
        params = SamplingParams(steps=num_steps, shift=timestep_shift, cfg_text=cfg_scale, seed=seed, noise=noise,
                                cfg_interval=cfg_interval)
        return self.generate(seq, params, progress=progress)

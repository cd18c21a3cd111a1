"""Flow-matching sampling of Lance: the shifted schedule, guidance with global renorm, and the one denoising loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from .config import DEFAULT_SAMPLING, SamplingParams
from .solvers import make_solver

# Upstream defaults, defined once in config.SamplingParams (kept here under their old names for callers).
NUM_STEPS = DEFAULT_SAMPLING.steps
TIMESTEP_SHIFT = DEFAULT_SAMPLING.shift
CFG_SCALE = DEFAULT_SAMPLING.cfg_text
CFG_INTERVAL = DEFAULT_SAMPLING.cfg_interval
CFG_RENORM_MIN = DEFAULT_SAMPLING.renorm_min


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace bit-equal to torch's CPU kernel (first half from start, second half from end, fused
    multiply-add, i.e. one rounding per element)."""
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float64(np.float32((end - start) / (steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    head = (np.float64(np.float32(start)) + step * i).astype(np.float32)
    tail = (np.float64(np.float32(end)) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def timesteps(num_steps: int = NUM_STEPS, shift: float = TIMESTEP_SHIFT) -> Tuple[np.ndarray, np.ndarray]:
    """(t_k, dt_k) for k = 0..N-1 from `linspace(1, 0, N+1)` shifted by s*t / (1 + (s-1)*t) (float32).

    Upstream lance.py::validation_gen_KVcache; N+1 points, so exactly N Euler steps ending at t = 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    u = _torch_linspace_f32(1.0, 0.0, num_steps + 1)
    s = np.float32(shift)
    t = (s * u / (np.float32(1.0) + (s - np.float32(1.0)) * u)).astype(np.float32)
    return t[:-1], (t[:-1] - t[1:]).astype(np.float32)


def cfg_active(t: float, interval: Tuple[float, float] = CFG_INTERVAL) -> bool:
    """Guidance applies for interval[0] < t <= interval[1] (upstream compares the float32 step time)."""
    return bool(interval[0] < float(t) <= interval[1])


def cfg_combine(v_cond: mx.array, v_uncond: mx.array, scale: float) -> mx.array:
    """v_u + s * (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def renorm_scale(v_cond: mx.array, v_cfg: mx.array, renorm_min: float = CFG_RENORM_MIN) -> mx.array:
    """Global renorm factor clamp(||v_c|| / (||v_cfg|| + 1e-8), min, 1), norms over all tokens x channels."""
    n_c = mx.sqrt(mx.sum(mx.square(v_cond.astype(mx.float32))))
    n_g = mx.sqrt(mx.sum(mx.square(v_cfg.astype(mx.float32))))
    return mx.clip(n_c / (n_g + 1e-8), renorm_min, 1.0)


def euler_step(x: mx.array, v: mx.array, dt: float) -> mx.array:
    """x <- x - v * dt (v points from data to noise)."""
    return x - v * dt


# ---------------------------------------------------------------------------------------------------- guidance
@dataclass
class Velocity:
    """One step's velocities (N, 48) float32. `v_uncond` is the text-dropped branch, `v_uncond_all` the
    text-and-vision-dropped one (image guidance); fields of branches that were not run are None."""

    v_cond: mx.array
    v_uncond: Optional[mx.array]
    v_cfg: Optional[mx.array]
    scale: Optional[mx.array]
    v: mx.array
    v_uncond_all: Optional[mx.array] = None


def guide(v_cond: mx.array, v_text: Optional[mx.array], v_all: Optional[mx.array], cfg_text: float,
          cfg_image: float, renorm_min: float = CFG_RENORM_MIN) -> Velocity:
    """Combine the branch velocities of one step.

    - image guidance (cfg_image > 1, three branches): v_all + s_t (v_c - v_text) + s_i (v_text - v_all), our
      extension (docs/editing.md); s_i = 1 reduces to the two-branch form;
    - text guidance (cfg_text > 1): v_text + s_t (v_c - v_text), upstream's CFG;
    - otherwise v_c alone.
    Guided results are renormalized globally against v_c, as upstream's "global" renorm.
    """
    if cfg_image > 1.0 and v_all is not None:
        v_cfg = v_all + cfg_text * (v_cond - v_text) + cfg_image * (v_text - v_all)
    elif cfg_text > 1.0 and v_text is not None:
        v_cfg = cfg_combine(v_cond, v_text, cfg_text)
    else:
        return Velocity(v_cond, v_text, None, None, v_cond, v_all)
    scale = renorm_scale(v_cond, v_cfg, renorm_min)
    return Velocity(v_cond, v_text, v_cfg, scale, v_cfg * scale, v_all)


def guidance_scales(t: float, params: SamplingParams) -> Tuple[float, float]:
    """(text, image) scales at step time t: both drop to 1 (off) outside the guidance interval."""
    if cfg_active(t, params.cfg_interval):
        return params.cfg_text, params.cfg_image
    return 1.0, 1.0


# ------------------------------------------------------------------------------------------------- the loop
@dataclass
class Step:
    """What the loop yields after each step: `index` steps of `total` are done, `t` is the time this step started
    from, `latents` (N, 48) float32 the evaluated state after it. `grid` is the (T, h, w) latent grid of the N
    tokens; `x_t`, `v` and `t_at` (scalar or per token) the state, velocity and time the step started from, kept so
    that `prediction()` and `preview()` cost nothing unless called."""

    index: int
    total: int
    t: float
    latents: mx.array
    grid: Optional[Tuple[int, int, int]] = None
    x_t: Optional[mx.array] = field(default=None, repr=False)
    v: Optional[mx.array] = field(default=None, repr=False)
    t_at: Union[float, mx.array, None] = field(default=None, repr=False)

    def prediction(self) -> mx.array:
        """The data prediction x0 = x_t - t * v (N, 48) of this step (docs/solvers.md); frozen tokens have t = 0."""
        t = self.t_at if isinstance(self.t_at, float) else self.t_at[:, None]
        return self.x_t - t * self.v

    def preview(self, mode: str = "fast", vae=None, max_side: Optional[int] = None):
        """The picture forming at this step: a PIL image, or a list of them for a video (`preview.preview`)."""
        from .preview import preview

        return preview(self, mode, vae, max_side)


# velocity(x (N, 48), t (scalar or (N,) per token), cfg_text, cfg_image) -> Velocity
VelocityFn = Callable[[mx.array, object, float, float], Velocity]


def denoise(velocity: VelocityFn, x0: mx.array, params: SamplingParams,
            frozen: Optional[np.ndarray] = None, grid: Optional[Tuple[int, int, int]] = None) -> Iterator[Step]:
    """The denoising loop of every generation task: `params.sampler` steps from `x0` (N, 48) over the shifted
    schedule (Euler, upstream's; or a multistep solver of `solvers.py`, one model call per step all the same).

    The velocity is queried at the schedule's step times, so the guidance interval applies exactly as with Euler
    (a multistep solver's history runs on across the interval's edge, as in diffusers; docs/solvers.md). `frozen`
    (N,) marks tokens that stay as given, at t = 0, and are never updated (image-to-video's first latent frame);
    renorm norms still cover every token, as upstream. Yields a `Step` after each step (latents evaluated), so
    callers can show progress, preview, cancel or stop early by not asking for the next one; `grid` (T, h, w) of
    the tokens is passed on to the steps for their previews.
    """
    ts, dts = timesteps(params.steps, params.shift)
    solver = make_solver(params.sampler, ts, dts)
    x = x0.astype(mx.float32)
    fz = None if frozen is None else mx.array(np.asarray(frozen, dtype=bool))
    for i, t in enumerate(ts.tolist()):
        text_scale, image_scale = guidance_scales(t, params)
        tt = t if fz is None else mx.where(fz, 0.0, t)
        v = velocity(x, tt, text_scale, image_scale).v
        x_new = solver.step(i, x, v)
        x_t, x = x, (x_new if fz is None else mx.where(fz[:, None], x, x_new))
        mx.eval(x, v, solver.state)  # v is part of x's graph: evaluating it too costs nothing and keeps it for previews
        yield Step(i + 1, params.steps, t, x, grid, x_t, v, tt)

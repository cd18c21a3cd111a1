"""Flow-matching sampler of Lance: shifted N+1-point schedule, Euler steps, text CFG with global renorm."""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx
import numpy as np

# Upstream defaults: inference_lance.sh (30 steps, shift 3.5, cfg 4.0) and config/config_factory.py
# (cfg_interval [0.4, 1.0], cfg_renorm_type "global", cfg_renorm_min 0.0).
NUM_STEPS = 30
TIMESTEP_SHIFT = 3.5
CFG_SCALE = 4.0
CFG_INTERVAL = (0.4, 1.0)
CFG_RENORM_MIN = 0.0


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
    """CFG applies for interval[0] < t <= interval[1] (upstream compares the float32 step time)."""
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

"""Flow-matching ODE solvers on Lance's time grid: Euler (upstream), DPM-Solver++(2M) and UniPC (bh2, order 2)."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import mlx.core as mx

# Lance's flow: x_t = t * noise + (1 - t) * x0 for t from 1 to 0, and the model predicts v = noise - x0, so the
# data prediction is m = x0_hat = x_t - t * v. In the notation of diffusers' DPMSolverMultistepScheduler and
# UniPCMultistepScheduler with flow sigmas (`_sigma_to_alpha_sigma_t`: alpha = 1 - t, sigma = t), their
# data-prediction updates from s to t need only
#   sigma_t / sigma_s = t / s  and  -alpha_t * (exp(-h) - 1) = 1 - t / s,  h = lambda(t) - lambda(s),
# with lambda(t) = log(alpha / sigma) = log((1 - t) / t); the first-order update a * x + (1 - a) * m, a = t / s,
# is then exactly an Euler step x - v * (s - t). lambda is -inf at t = 1 (where Lance's grid starts) and +inf at
# t = 0 (where it ends); the limits are taken in IEEE arithmetic, as torch does in those schedulers.


def log_snr(t: float) -> float:
    """lambda(t) = log((1 - t) / t): -inf at t = 1, +inf at t = 0."""
    if t >= 1.0:
        return -math.inf
    if t <= 0.0:
        return math.inf
    return math.log1p(-t) - math.log(t)


class Euler:
    """Upstream's update x <- x - v * dt (lance.py::validation_gen_KVcache), float32 dt as upstream."""

    def __init__(self, dts: Sequence[float]):
        self.dts = [float(d) for d in dts]

    @property
    def state(self) -> List[mx.array]:
        return []

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        return x - v * self.dts[i]


class DPMSolver2M:
    """DPM-Solver++(2M), midpoint form, on data predictions (diffusers DPMSolverMultistepScheduler,
    `multistep_dpm_solver_second_order_update`): first order on the first step and on the last one (to t = 0,
    `final_sigmas_type="zero"`), second order otherwise:
        x_t = a x + (1 - a) (m + r/2 (m - m_prev)),  a = t / s,  r = h / h_prev.
    """

    def __init__(self, grid: Sequence[float]):
        self.t = [float(v) for v in grid]  # N + 1 times, ending at 0
        self.m_prev: Optional[mx.array] = None  # the previous step's data prediction

    @property
    def state(self) -> List[mx.array]:
        return [a for a in (self.m_prev,) if a is not None]

    def order(self, i: int) -> int:
        return 2 if self.m_prev is not None and self.t[i + 1] > 0.0 else 1

    def predict(self, i: int, x: mx.array, m: mx.array, order: int) -> mx.array:
        s, t = self.t[i], self.t[i + 1]
        a = t / s
        if order == 2:  # h_prev is infinite when the previous point is t = 1: r = 0, a first-order step
            lam_s = log_snr(s)
            r = (log_snr(t) - lam_s) / (lam_s - log_snr(self.t[i - 1]))
            m = m + (0.5 * r) * (m - self.m_prev)
        return a * x + (1.0 - a) * m

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        m = x - self.t[i] * v
        x_next = self.predict(i, x, m, self.order(i))
        self.m_prev = m
        return x_next


class UniPC(DPMSolver2M):
    """UniPC with the bh2 variant on data predictions, solver order 2 (diffusers UniPCMultistepScheduler,
    `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update`). The predictor UniP-2 is the DPM-Solver++(2M)
    update above; before it, the corrector UniC refines the current point s (reached from p, and pp before it) with
    the new data prediction m_s, at no extra model call (m_s stays the one made at the uncorrected point, as in
    diffusers):
        order 1:  x_s = a x_p + (1 - a) (m_p + 1/2 (m_s - m_p)),   a = s / p,
        order 2:  x_s = a x_p + (1 - a) (m_p + rho_0 (m_pp - m_p) / r_k + rho_1 (m_s - m_p)),
    with h = lambda_s - lambda_p, r_k = (lambda_pp - lambda_p) / h and [[1, 1], [r_k, 1]] (rho_0, rho_1) = b
    (`_uni_c_weights`). The order of the correction is the order of the step that reached s; no correction follows
    the last step (there is no model call at t = 0).
    """

    def __init__(self, grid: Sequence[float]):
        super().__init__(grid)
        self.x_prev: Optional[mx.array] = None  # the previous (corrected) point
        self.m_pp: Optional[mx.array] = None  # the data prediction before m_prev, when the last step used it
        self.order_prev = 0

    @property
    def state(self) -> List[mx.array]:
        return [a for a in (self.m_prev, self.x_prev, self.m_pp) if a is not None]

    def correct(self, i: int, m: mx.array) -> mx.array:
        p, s = self.t[i - 1], self.t[i]
        a = s / p
        if self.order_prev == 1:
            return a * self.x_prev + (1.0 - a) * (self.m_prev + 0.5 * (m - self.m_prev))
        rho_pp, rho_s = _uni_c_weights(self.t[i - 2], p, s)
        d = self.m_prev + rho_pp * (self.m_pp - self.m_prev) + rho_s * (m - self.m_prev)
        return a * self.x_prev + (1.0 - a) * d

    def step(self, i: int, x: mx.array, v: mx.array) -> mx.array:
        m = x - self.t[i] * v  # the data prediction at the point the model saw
        if self.x_prev is not None:
            x = self.correct(i, m)
        order = self.order(i)
        x_next = self.predict(i, x, m, order)
        self.m_pp = self.m_prev if order == 2 else None
        self.x_prev, self.m_prev, self.order_prev = x, m, order
        return x_next


def _uni_c_weights(t_pp: float, t_p: float, t_s: float):
    """(rho_0 / r_k, rho_1) of the order-2 UniC-bh2 corrector from p to s with the extra point pp: with g = -h,
    B = e^g - 1 (bh2), p1 = B / g - 1, p2 = p1 / g - 1/2, the right side is b = (p1 / B, 2 p2 / B).
    rho_0 / r_k is 0 when pp is t = 1 (r_k = -inf)."""
    lam_p = log_snr(t_p)
    h = log_snr(t_s) - lam_p
    rk = (log_snr(t_pp) - lam_p) / h
    g = -h
    B = math.expm1(g)
    p1 = B / g - 1.0
    p2 = p1 / g - 0.5
    b0, b1 = p1 / B, 2.0 * p2 / B
    rho0 = (b1 - b0) / (rk - 1.0)
    return rho0 / rk, b0 - rho0


def make_solver(name: str, ts: Sequence[float], dts: Sequence[float]):
    """The solver `name` ("euler", "dpm++2m", "unipc") for step times `ts` and steps `dts` (sampler.timesteps)."""
    if name == "euler":
        return Euler(dts)
    grid = [float(t) for t in ts] + [0.0]
    if name == "dpm++2m":
        return DPMSolver2M(grid)
    if name == "unipc":
        return UniPC(grid)
    raise ValueError(f"unknown sampler {name!r}")

"""Samplers of the one denoising loop: choice and validation, update rules against diffusers' formulas, convergence
order on an analytic flow, the guidance interval, and every task with DPM-Solver++(2M) and UniPC."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from lance_mlx import sampler as S
from lance_mlx import solvers as V
from lance_mlx import tasks as T
from lance_mlx.config import SAMPLERS, SamplingParams
from lance_mlx.errors import InvalidRequestError, InvalidTypeError
from lance_mlx.processing import Preset

MULTISTEP = ("dpm++2m", "unipc")
TINY = Preset("tiny", 48, 56)  # 48x32 inputs -> VAE 64x48 (4x3 latents), ViT 56x28
PROMPT = "a boat on a lake at dawn"


def run(velocity, x0, **settings):
    """Final latents of the loop with a plain velocity function v(x, t)."""
    steps = list(S.denoise(lambda x, t, s_t, s_i: SimpleNamespace(v=velocity(x, t)), x0, SamplingParams(**settings)))
    assert [s.index for s in steps] == list(range(1, len(steps) + 1))
    return steps[-1].latents


# --------------------------------------------------------------------------------------------- choice, checks
def test_sampler_names_are_validated():
    assert SAMPLERS[0] == "euler" and set(MULTISTEP) <= set(SAMPLERS)
    assert SamplingParams().sampler == "euler"  # upstream's, the default
    assert SamplingParams(sampler=" UniPC ").sampler == "unipc"
    with pytest.raises(InvalidRequestError, match="unknown sampler 'heun': use one of euler, dpm\\+\\+2m, unipc") as e:
        SamplingParams(sampler="heun")
    assert e.value.param == "sampler"
    with pytest.raises(InvalidTypeError, match="sampler must be a name"):
        SamplingParams(sampler=2)


def test_generation_clis_pass_sampler_and_guidance_controls(tmp_path):
    from lance_mlx import cmd_edit, cmd_generate

    flags = ["--sampler", "dpm++2m", "--cfg-interval", "0.3,0.9", "--renorm-min", "0.25", "--steps", "12"]
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (48, 32)).save(img)
    cases = [(cmd_generate, ["--prompt", "x", "--out", "a.png", "--width", "32", "--height", "32"]),
             (cmd_generate, ["--prompt", "x", "--out", "a.mp4", "--frames", "5", "--width", "32", "--height", "32"]),
             (cmd_generate, ["--prompt", "x", "--out", "a.mp4", "--frames", "5", "--image", str(img)]),
             (cmd_edit, ["--image", str(img), "--instruction", "x", "--out", "b.png", "--cfg-img", "1.5"])]
    for cmd, argv in cases:
        s = cmd.build_request(cmd.parse_args(argv + flags)).sampling
        assert (s.sampler, s.cfg_interval, s.renorm_min, s.steps) == ("dpm++2m", (0.3, 0.9), 0.25, 12)
    assert s.cfg_image == 1.5


# ------------------------------------------------------------------------------------------------ update rules
def test_euler_is_the_upstream_update_bit_for_bit():
    x0 = mx.random.normal((5, 48), key=mx.random.key(0))
    w = mx.random.normal((48, 48), key=mx.random.key(1)) * 0.1

    def vel(x, t):
        return mx.tanh(x @ w) + t * x

    got = run(vel, x0, steps=7, cfg_text=1.0)
    ts, dts = S.timesteps(7, 3.5)
    x = x0
    for t, dt in zip(ts.tolist(), dts.tolist()):
        x = S.euler_step(x, vel(x, t), dt)
    assert mx.array_equal(got, x)


def test_first_order_steps_equal_euler():
    """The first step (from t = 1) and the last (to t = 0) are first order, i.e. Euler steps; the second step of
    DPM-Solver++(2M) is too, because the previous point's log-SNR is -inf: up to 3 steps it is Euler."""
    x0 = mx.random.normal((5, 48), key=mx.random.key(2))
    w = mx.random.normal((48, 48), key=mx.random.key(3)) * 0.1

    def vel(x, t):
        return mx.tanh(x @ w) + t * x

    def final(n, name):
        return np.array(run(vel, x0, steps=n, cfg_text=1.0, sampler=name))

    for n in (1, 2, 3):
        np.testing.assert_allclose(final(n, "dpm++2m"), final(n, "euler"), atol=2e-6)
    # UniPC too, up to 2 steps: the last step lands on the data prediction made at the uncorrected point
    for n in (1, 2):
        np.testing.assert_allclose(final(n, "unipc"), final(n, "euler"), atol=2e-6)
    assert np.abs(final(3, "unipc") - final(3, "euler")).max() > 1e-4  # its corrector moved the second point
    assert np.abs(final(4, "dpm++2m") - final(4, "euler")).max() > 1e-4


def diffusers_form(name, grid, vel, x):
    """DPM-Solver++(2M) midpoint and UniPC-bh2 (solver order 2, lower order on the last step, final sigma 0) in the
    alpha / sigma / lambda notation of diffusers' schedulers with flow sigmas, float64."""
    alpha, sigma = (lambda t: 1.0 - t), (lambda t: t)
    lam = lambda t: np.log(alpha(t)) - np.log(sigma(t))
    n = len(grid) - 1
    ms, x_last, order_last = [], None, 0

    def predict(i, x, order):
        s, t = grid[i], grid[i + 1]
        h = lam(t) - lam(s)
        x_t = sigma(t) / sigma(s) * x - alpha(t) * np.expm1(-h) * ms[-1]
        if order == 2:
            rk = (lam(grid[i - 1]) - lam(s)) / h
            x_t = x_t - alpha(t) * np.expm1(-h) * 0.5 * (ms[-2] - ms[-1]) / rk
        return x_t

    def correct(i, m_new):  # UniC from grid[i-1] to grid[i], of the order the predictor used
        p, s = grid[i - 1], grid[i]
        h = lam(s) - lam(p)
        hh = -h
        rks = [(lam(grid[i - 2]) - lam(p)) / h] if order_last == 2 else []
        d1s = [(ms[-2] - ms[-1]) / rk for rk in rks]
        rks = np.array(rks + [1.0])
        phi, fact, R, b = np.expm1(hh) / hh - 1, 1, [], []
        for k in range(1, order_last + 1):
            R.append(rks ** (k - 1))
            b.append(phi * fact / np.expm1(hh))
            fact *= k + 1
            phi = phi / hh - 1 / fact
        rhos = [0.5] if order_last == 1 else np.linalg.solve(np.array(R), np.array(b))
        res = sum(r * d for r, d in zip(rhos[:-1], d1s)) + rhos[-1] * (m_new - ms[-1])
        x_t = sigma(s) / sigma(p) * x_last - alpha(s) * np.expm1(hh) * ms[-1]
        return x_t - alpha(s) * np.expm1(hh) * res  # bh2: B(h) = expm1(-h)

    with np.errstate(divide="ignore"):
        for i in range(n):
            m = x - grid[i] * vel(x, grid[i])
            if name == "unipc" and i > 0:
                x = correct(i, m)
            ms.append(m)
            order = 1 if i == 0 or i == n - 1 else 2
            x_last, order_last = x, order
            x = predict(i, x, order)
    return x


@pytest.mark.parametrize("name", MULTISTEP)
def test_updates_match_the_diffusers_formulas(name):
    grid = [0.97, 0.9, 0.78, 0.6, 0.45, 0.3, 0.17, 0.07, 0.0]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 48)) * 0.15
    x0 = rng.standard_normal((6, 48))
    vel64 = lambda x, t: np.tanh(x @ w) * (1 + t) + 0.3 * x
    ref = diffusers_form(name, grid, vel64, x0)
    solver = V.make_solver(name, grid[:-1], np.diff(grid) * -1)
    x = mx.array(x0.astype(np.float32))
    for i, t in enumerate(grid[:-1]):
        x = solver.step(i, x, mx.tanh(x @ mx.array(w.astype(np.float32))) * (1 + t) + 0.3 * x)
    np.testing.assert_allclose(np.array(x), ref, rtol=1e-5, atol=1e-5)
    euler = x0
    for s, t in zip(grid[:-1], grid[1:]):
        euler = euler - vel64(euler, s) * (s - t)
    assert np.abs(ref - euler).max() > 1e-2  # the second-order terms are really exercised


# --------------------------------------------------------------------------------------------- convergence
def gaussian_flow(seed=0, dim=256):
    """Data x0 ~ N(mu, diag(sd^2)): the exact velocity of x_t = t * noise + (1 - t) * x0 is affine in x, and the
    flow maps noise z to mu + sd * z (x_t = (1 - t) mu + s(t) z, s(t)^2 = (1 - t)^2 sd^2 + t^2)."""
    rng = np.random.default_rng(seed)
    mu = mx.array(rng.standard_normal(dim).astype(np.float32) * 0.5)
    sd = mx.array(rng.uniform(0.5, 1.5, dim).astype(np.float32))
    z = mx.array(rng.standard_normal(dim).astype(np.float32))

    def vel(x, t):
        s = mx.sqrt((1 - t) ** 2 * sd ** 2 + t ** 2)
        ds = (t - (1 - t) * sd ** 2) / s
        return -mu + ds / s * (x - (1 - t) * mu)

    return vel, z, np.array(mu + sd * z)


def errors(name, steps, shift):
    vel, z, exact = gaussian_flow()
    return np.array([np.linalg.norm(np.array(run(vel, z, steps=n, cfg_text=1.0, shift=shift, sampler=name)) - exact)
                     / np.linalg.norm(exact) for n in steps])


def test_convergence_orders():
    steps = np.array([32, 64, 128, 256])
    slope = {s: -np.polyfit(np.log(steps), np.log(errors(s, steps, 1.0)), 1)[0] for s in SAMPLERS}
    assert 0.9 < slope["euler"] < 1.1, slope
    assert slope["dpm++2m"] > 1.6 and slope["unipc"] > 1.9, slope
    # Lance's shifted schedule: far fewer steps for the same error
    euler30 = errors("euler", [30], 3.5)[0]
    for name in MULTISTEP:
        assert errors(name, [12], 3.5)[0] < euler30, name


# ------------------------------------------------------------------------------------------ guidance interval
@pytest.mark.parametrize("interval", [(0.4, 1.0), (0.2, 0.7)])
def test_guidance_interval_is_honoured_by_every_sampler(interval):
    seen = {}
    for name in SAMPLERS:
        calls = []

        def velocity(x, t, s_t, s_i):
            calls.append((t, s_t, s_i))
            return SimpleNamespace(v=0.1 * x)

        params = SamplingParams(steps=12, sampler=name, cfg_interval=interval, cfg_image=2.0)
        list(S.denoise(velocity, mx.ones((3, 48)), params))
        seen[name] = calls
    ts, _ = S.timesteps(12, 3.5)
    expect = [(t, *S.guidance_scales(t, SamplingParams(cfg_interval=interval, cfg_image=2.0))) for t in ts.tolist()]
    assert all(calls == expect for calls in seen.values())
    assert {c[1] for c in expect} == {1.0, 4.0}  # both sides of the interval were visited


# ---------------------------------------------------------------------------------------- every task, tiny model
def rel(a, b):
    return float(mx.linalg.norm(a - b) / mx.linalg.norm(b))


def task_requests():
    rng = np.random.default_rng(0)
    image = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    video = (rng.random((9, 32, 48, 3)) * 255).astype(np.uint8)
    return {
        "t2i": lambda s: T.TextToImage(PROMPT, 64, 64, s),
        "t2v": lambda s: T.TextToVideo(PROMPT, 5, 48, 32, sampling=s),
        "edit": lambda s: T.ImageEdit(image, "make it pink", TINY, s),
        "i2v": lambda s: T.ImageToVideo(PROMPT, image, 5, TINY.vae_resolution, sampling=s),
        "edit 3 branches": lambda s: T.ImageEdit(image, "make it pink", TINY, s.replace(cfg_image=1.5)),
        "video edit": lambda s: T.VideoEdit(video, "make it pink", TINY, input_fps=12, sampling=s),
    }


@pytest.mark.parametrize("task", ["t2i", "t2v", "edit"])
def test_fewer_steps_closer_to_the_converged_latent(tiny_pipe, task):
    """On the tiny model with upstream's guidance: at 8 steps both multistep solvers land nearer a 96-step
    Euler run than Euler does with 8 steps."""
    make = task_requests()[task]
    ref = tiny_pipe.latents(make(SamplingParams(steps=96)))
    err = {name: rel(tiny_pipe.latents(make(SamplingParams(steps=8, sampler=name))), ref) for name in SAMPLERS}
    for name in MULTISTEP:
        assert err[name] < 0.85 * err["euler"], err


@pytest.mark.parametrize("task", ["i2v", "edit 3 branches", "video edit"])
def test_every_task_runs_with_each_multistep_solver(tiny_pipe, task):
    make = task_requests()[task]
    euler = tiny_pipe.latents(make(SamplingParams(steps=4)))
    for name in MULTISTEP:
        lat = tiny_pipe.latents(make(SamplingParams(steps=4, sampler=name)))
        assert lat.shape == euler.shape and bool(mx.isfinite(lat).all())
        assert 1e-4 < rel(lat, euler) < 0.5, (name, rel(lat, euler))
        if task == "i2v":  # the encoded first frame stays exactly as given
            assert mx.array_equal(lat[:, 0], euler[:, 0])


def test_api_takes_the_sampler(tiny_pipe):
    img = tiny_pipe.generate_image(PROMPT, width=32, height=32, steps=3, sampler="unipc", cfg_interval=(0.5, 1.0),
                                   renorm_min=0.1)
    assert img.size == (32, 32)


# ------------------------------------------------------------------------------------------ low-memory pipeline
def test_low_memory_pipeline_gives_the_same_results(upstream_root):
    """low_memory holds fewer components at a time (ViT / VAE loaded for their phase, LLM released before the
    decode) and reloads what a later call needs; every output is bit-equal to the default pipeline's."""
    import mlx.nn as nn

    from lance_mlx import LancePipeline

    rng = np.random.default_rng(0)
    image = (rng.random((32, 48, 3)) * 255).astype(np.uint8)
    for task, call in [("t2i", lambda p: np.asarray(p.generate_image(PROMPT, width=32, height=32, steps=2))),
                       ("image_edit", lambda p: np.asarray(p.edit_image(image, "make it pink", steps=2,
                                                                        preset=TINY))),
                       ("i2v", lambda p: p.generate_video(PROMPT, 5, image=image, steps=2,
                                                          resolution=TINY.vae_resolution)),
                       ("x2t_image", lambda p: p.understand(image, "what is it?", max_tokens=3))]:
        ref = call(LancePipeline.from_pretrained(upstream_root, task, dtype="float32"))
        low = LancePipeline.from_pretrained(upstream_root, task, dtype="float32", low_memory=True)
        assert low.vae is None and low.vit is None  # loaded when a phase needs them
        assert np.array_equal(call(low), ref) if not isinstance(ref, str) else call(low) == ref
        if task != "x2t_image":
            assert low.model is None and low.vit is None and low.vae is not None  # released before the decode
            assert np.array_equal(call(low), ref)  # the LLM comes back for the next request
    und4 = LancePipeline.from_pretrained(upstream_root, "t2i", dtype="float32", low_memory=True, und_bits=4)
    layer = und4.model.language_model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, nn.QuantizedLinear) and type(layer.mlp_moe_gen.up_proj) is nn.Linear
    assert und4.generate_image(PROMPT, width=32, height=32, steps=2).size == (32, 32)

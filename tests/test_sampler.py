"""Flow-matching schedule, CFG interval, global renorm and Euler update of lance_mlx.sampler."""

import mlx.core as mx
import numpy as np
import pytest

from lance_mlx import sampler as S

# modeling/lance/lance.py::validation_gen_KVcache schedule: t_k for N = 30, shift 3.5 (rounded to 6 digits).
SPEC_T30 = [1.0, 0.990244, 0.98, 0.969231, 0.957895, 0.945946, 0.933333, 0.92, 0.905882, 0.890909, 0.875,
            0.858065, 0.84, 0.82069, 0.8, 0.777778, 0.753846, 0.728, 0.7, 0.669565, 0.636364, 0.6, 0.56, 0.51579,
            0.466667, 0.411765, 0.35, 0.28, 0.2, 0.107692]


def test_schedule_matches_spec_list():
    t, dt = S.timesteps(30, 3.5)
    assert t.dtype == np.float32 and dt.dtype == np.float32
    assert len(t) == len(dt) == 30
    np.testing.assert_allclose(t, SPEC_T30, atol=1e-6)
    # N+1 points: the steps end exactly at t = 0
    assert abs(float(t[-1] - dt[-1])) < 1e-7
    np.testing.assert_allclose(dt.sum(), 1.0, atol=1e-6)


def test_schedule_bit_equal_to_torch_formula():
    import torch
    for n, s in [(1, 3.5), (4, 3.5), (24, 4.0), (30, 3.5), (50, 1.0), (97, 3.0)]:
        u = torch.linspace(1, 0, n + 1)
        ref = s * u / (1 + (s - 1) * u)
        t, dt = S.timesteps(n, s)
        np.testing.assert_array_equal(t, ref[:-1].numpy())
        np.testing.assert_array_equal(dt, (ref[:-1] - ref[1:]).numpy())


def test_golden_four_step_schedule():
    d = np.load(__import__("fixtures").GOLDEN / "golden_t2i_sample4.npz")
    t, dt = S.timesteps(4, 3.5)
    np.testing.assert_array_equal(t, d["timesteps"])
    np.testing.assert_array_equal(dt, d["dts"])


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_steps"):
        S.timesteps(0)


def test_cfg_interval():
    t, _ = S.timesteps(30, 3.5)
    active = [S.cfg_active(x) for x in t]
    assert active == [True] * 26 + [False] * 4  # config/config_factory.py cfg_interval: steps 0-25 use CFG
    assert not S.cfg_active(0.4) and S.cfg_active(0.4000001) and S.cfg_active(1.0)
    assert not S.cfg_active(1.0000001)
    assert S.cfg_active(0.1, (0.0, 1.0)) and not S.cfg_active(0.5, (0.6, 1.0))


def test_cfg_combine_and_global_renorm():
    rng = np.random.default_rng(0)
    vc = rng.standard_normal((24, 48)).astype(np.float32)
    vu = rng.standard_normal((24, 48)).astype(np.float32)
    vcfg = np.array(S.cfg_combine(mx.array(vc), mx.array(vu), 4.0))
    np.testing.assert_allclose(vcfg, vu + 4.0 * (vc - vu), rtol=1e-6, atol=1e-6)
    scale = float(S.renorm_scale(mx.array(vc), mx.array(vcfg)))
    ref = np.linalg.norm(vc) / (np.linalg.norm(vcfg) + 1e-8)  # one norm over all tokens x channels
    assert 0 < ref < 1
    assert abs(scale - ref) < 1e-6
    # clamped at 1 when the guided velocity is not larger; at renorm_min from below
    assert float(S.renorm_scale(mx.array(vc), mx.array(vc * 0.5))) == 1.0
    assert abs(float(S.renorm_scale(mx.array(vc), mx.array(vc * 10), 0.5)) - 0.5) < 1e-7


def test_euler_step():
    x, v = mx.array([1.0, 2.0]), mx.array([0.5, -1.0])
    np.testing.assert_allclose(np.array(S.euler_step(x, v, 0.1)), [0.95, 2.1], rtol=1e-6)

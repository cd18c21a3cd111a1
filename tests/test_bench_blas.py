"""The benchmarks' machine line names the BLAS that MLX's float32 GEMMs call, and OpenBLAS's core (bench/common.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from common import GENERIC_OPENBLAS_CORES, suggested_coretype  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"  # Debian's libopenblas0-pthread
LINE = ("import sys; sys.path.insert(0, 'bench'); import mlx.core as mx; mx.set_default_device(mx.cpu); "
        "from common import blas_line; print(blas_line())")


def machine_line(**env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", LINE], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_suggested_coretype_follows_the_vector_units():
    assert suggested_coretype("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n") == "SkylakeX"
    assert suggested_coretype("flags\t\t: fpu sse2 avx avx2 fma\n") == "Haswell"
    assert suggested_coretype("flags\t\t: fpu sse2 sse3\n") is None
    assert suggested_coretype("processor : 0\n") is None
    assert {"prescott", "core2", "katmai", "generic"} <= set(GENERIC_OPENBLAS_CORES)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/maps: Linux only (macOS: Accelerate)")
def test_without_preload_the_blas_mlx_links_is_named():
    line = machine_line()
    assert "float32 GEMMs: " in line and "WARNING" not in line
    assert "numpy" not in line.split("float32 GEMMs: ")[1]  # another BLAS in the process is not MLX's


@pytest.mark.skipif(not Path(OPENBLAS).exists(), reason=f"needs Debian's OpenBLAS at {OPENBLAS}")
def test_preloaded_openblas_core_and_the_generic_fallback_warning():
    generic = machine_line(LD_PRELOAD=OPENBLAS, OPENBLAS_CORETYPE="Prescott")
    assert "OpenBLAS" in generic and "core Prescott (OPENBLAS_CORETYPE=Prescott)" in generic
    hint = suggested_coretype()
    assert "WARNING: OpenBLAS runs its generic Prescott kernels" in generic
    assert (f"set OPENBLAS_CORETYPE={hint}" in generic) == (hint is not None)
    if hint is not None:
        tuned = machine_line(LD_PRELOAD=OPENBLAS, OPENBLAS_CORETYPE=hint)
        assert f"core {hint} (OPENBLAS_CORETYPE={hint})" in tuned and "WARNING" not in tuned

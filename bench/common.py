"""Shared pieces of the step benchmarks: model build, BLAS report, interleaved timing, the matmul floor of a step."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from lance_mlx.lance import Lance, LanceConfig
from lance_mlx.loading import parse_dtype

FULL_LAYERS = LanceConfig().llm.num_hidden_layers
T_STEP = 0.8  # a step time inside upstream's guidance interval (0.4, 1.0]: every guidance branch runs


def build(layers: int, dtype: str, compute_dtype: Optional[str] = None) -> Lance:
    """Random full-size Lance with `layers` decoder layers in `dtype`, computing in `compute_dtype` (None: `dtype`),
    parameters evaluated one at a time (so a float32 initialisation of the whole model never exists at once)."""
    cfg = LanceConfig()
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=layers))
    mx.random.seed(0)
    m = Lance(cfg)
    m.set_dtype(parse_dtype(dtype))
    m.compute_dtype = None if compute_dtype is None else parse_dtype(compute_dtype)
    for _, p in tree_flatten(m.parameters()):
        mx.eval(p)
    return m


def layer_bytes(m: Lance) -> int:
    return sum(v.nbytes for _, v in tree_flatten(m.language_model.model.layers[0].parameters()))


def dtype_words(args) -> str:
    compute = args.compute_dtype or args.dtype
    return f"weights {args.dtype}, activations {compute}"


# OpenBLAS's pre-AVX kernels (DYNAMIC_ARCH builds): what it runs on a CPU model it does not know, e.g. Debian's
# OpenBLAS 0.3.21 on a Sapphire Rapids Xeon picks Prescott, about 5x slower GEMMs than SkylakeX (docs/performance.md).
GENERIC_OPENBLAS_CORES = ("katmai", "coppermine", "northwood", "prescott", "banias", "core2", "generic")


def _mapped_file(address: int) -> Optional[str]:
    """The file mapped at `address` in this process (/proc/self/maps), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= address < hi and len(parts) > 5:
                return parts[5]
    return None


def mlx_blas() -> Optional[str]:
    """Path of the library whose `cblas_sgemm` MLX's CPU GEMMs call, or None where it cannot be told (no
    /proc/self/maps: macOS, where MLX uses Accelerate). The dynamic linker binds libmlx's `cblas_sgemm` in the global
    scope first (an LD_PRELOADed OpenBLAS), then in libmlx's own dependencies (the BLAS its wheel bundles); other
    BLAS copies in the process (numpy's) are not it."""
    if not os.path.exists("/proc/self/maps"):
        return None
    libmlx = os.path.join(os.path.dirname(mx.__file__), "lib", "libmlx.so")
    for lib in (None, libmlx):
        try:
            fn = ctypes.CDLL(lib).cblas_sgemm
        except (OSError, AttributeError):
            continue
        return _mapped_file(ctypes.cast(fn, ctypes.c_void_p).value)
    return None


def openblas_core(path: str) -> Optional[str]:
    """The kernel set a loaded OpenBLAS runs (`openblas_get_corename`), or None for another BLAS."""
    try:
        fn = ctypes.CDLL(path).openblas_get_corename
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def suggested_coretype(cpuinfo: Optional[str] = None) -> Optional[str]:
    """The OPENBLAS_CORETYPE for this CPU's vector units (x86: AVX-512 -> SkylakeX, AVX2 -> Haswell), or None."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None


def cpu_blas() -> Tuple[str, Optional[str]]:
    """(what runs MLX's float32 CPU GEMMs, a warning or None): the loaded library, and for OpenBLAS its core."""
    path = mlx_blas()
    if path is None:
        return ("Accelerate" if platform.system() == "Darwin" else "not identified"), None
    core = openblas_core(path)
    if core is None:
        bundled = "mlx" in path and os.path.basename(path).startswith("libblas")
        return (f"MLX's bundled reference BLAS ({path}; slow: preload OpenBLAS, docs/performance.md)" if bundled
                else path), None
    forced = os.environ.get("OPENBLAS_CORETYPE")
    words = f"OpenBLAS {path}, core {core}" + (f" (OPENBLAS_CORETYPE={forced})" if forced else " (autodetected)")
    warning = None
    if core.lower() in GENERIC_OPENBLAS_CORES:
        hint = suggested_coretype()
        warning = (f"WARNING: OpenBLAS runs its generic {core} kernels on this CPU (several times slower GEMMs)"
                   + (f"; set OPENBLAS_CORETYPE={hint}" if hint else "") + " (docs/performance.md)")
    return words, warning


def blas_words() -> str:
    """`cpu_blas` in one line, the warning included."""
    words, warning = cpu_blas()
    return words + (f"; {warning}" if warning else "")


def blas_line() -> str:
    if mx.default_device() == mx.gpu:
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        arch = str(info.get("architecture", ""))
        tf32 = (f"; float32 GEMMs in TF32 unless MLX_ENABLE_TF32=0 (here {os.environ.get('MLX_ENABLE_TF32', 'unset')})"
                if arch.startswith("sm_") else "")
        return (f"- machine: {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
                f"{info.get('device_name', 'GPU')} {arch}: every op on the GPU{tf32}")
    blas, warning = cpu_blas()
    return (f"- machine: {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, {mx.default_device()}; "
            f"float32 GEMMs: {blas}; bfloat16/float16 GEMMs: MLX's own CPU kernel"
            + (f"\n- {warning}" if warning else ""))


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


def floor_step(m: Lance, n_noise: int, rows: int, batched: bool) -> Callable[[], None]:
    """The GEMMs of one step, alone: every Linear of every layer on inputs of the step's shapes, with the model's
    own weights and dtype (attention, norms, RoPE and elementwise work left out).

    Per layer the und expert (q, k, v, o, gate, up, down) runs on the 2 markers and the gen expert on the N latent
    tokens of each branch: once on 2*rows and N*rows tokens when `batched`, else `rows` times on 2 and N; plus
    vae2llm on N tokens and llm2vae on N*rows.
    """
    hidden, inter = m.config.llm.hidden_size, m.config.llm.intermediate_size
    reps, per = (1, rows) if batched else (rows, 1)
    key = mx.random.key(1)
    inputs = {}
    for n in (2 * per, n_noise * per):
        inputs[n] = (mx.random.normal((n, hidden), key=key).astype(m.dtype),
                     mx.random.normal((n, inter), key=key).astype(m.dtype))
    lat = mx.random.normal((n_noise, m.config.latent_channels * m.config.latent_patch_size ** 3), key=key)
    lat = lat.astype(m.dtype)
    mx.eval(inputs, lat)

    def expert_gemms(layer, sfx: str, x, mid) -> List[mx.array]:
        att, mlp = layer.self_attn, (layer.mlp_moe_gen if sfx else layer.mlp)
        outs = [att[f"{p}_proj{sfx}"](x) for p in "qkvo"]  # o_proj's input has the hidden width too
        return outs + [mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj(mid)]

    def run():
        for _ in range(reps):
            for layer in m.language_model.model.layers:
                mx.eval(expert_gemms(layer, "", *inputs[2 * per])
                        + expert_gemms(layer, "_moe_gen", *inputs[n_noise * per]))
            mx.eval(m.llm2vae(inputs[n_noise * per][0]))
        mx.eval(m.vae2llm(lat))

    return run


def interleaved(cases: Dict[str, Callable[[], None]], rounds: int, warmup: Dict[str, int],
                log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> Dict[str, Dict]:
    """Run the cases A, B, C, A, B, C, ... `rounds` times (after `warmup[name]` untimed calls of each), so machine
    load drifts over all of them alike. Returns per case the wall and process-CPU seconds of every round; `log`
    gets a line per timed call as it finishes (stderr by default: the table on stdout comes at the end)."""
    for name, fn in cases.items():
        for _ in range(warmup.get(name, 0)):
            fn()
    out = {name: {"wall": [], "cpu": []} for name in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            out[name]["wall"].append(time.perf_counter() - w0)
            out[name]["cpu"].append(time.process_time() - c0)
            log(f"  round {r + 1} {name}: {out[name]['wall'][-1]:.1f} s wall, {out[name]['cpu'][-1]:.1f} s CPU, "
                f"{load_line()}")
    return out


def summary(times: Dict) -> Dict[str, float]:
    return {"wall_min": min(times["wall"]), "wall_med": statistics.median(times["wall"]),
            "cpu_min": min(times["cpu"]), "cpu_med": statistics.median(times["cpu"])}

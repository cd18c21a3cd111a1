"""Shared pieces of the step benchmarks: model build, BLAS report, interleaved timing, the matmul floor of a step."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional

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


def blas_line() -> str:
    if mx.default_device() == mx.gpu:
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        arch = str(info.get("architecture", ""))
        tf32 = (f"; float32 GEMMs in TF32 unless MLX_ENABLE_TF32=0 (here {os.environ.get('MLX_ENABLE_TF32', 'unset')})"
                if arch.startswith("sm_") else "")
        return (f"- machine: {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, "
                f"{info.get('device_name', 'GPU')} {arch}: every op on the GPU{tf32}")
    preload = os.environ.get("LD_PRELOAD", "")
    blas = f"OpenBLAS via LD_PRELOAD={preload}" if "openblas" in preload else "MLX's bundled reference BLAS"
    return (f"- machine: {platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__}, {mx.default_device()}; "
            f"float32 GEMMs: {blas}; bfloat16/float16 GEMMs: MLX's own CPU kernel")


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

"""Quantization error and weight bytes at the full-size Lance config: velocity and logits of each option vs bf16.

Errors isolate the weights: the reference has bf16 weights, each option the same weights quantized (bf16 scales, as
convert.py writes them) and dequantized again, and all activations are computed in float32. MLX's CPU quantized
matmul is far too slow for this machine; on Apple silicon the fused kernels compute the same products.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
from common import blas_words  # bench/common.py (this script's folder)
from mlx.utils import tree_flatten

from lance_mlx import quantize as Qz
from lance_mlx import sequence as Q
from lance_mlx.lance import Lance, LanceConfig

# "A cat holds a poster with rainbow text "STOP"" in the Qwen2.5 vocabulary
PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]
OPTIONS = [(bits, experts) for bits in (8, 4) for experts in ("und", "gen", "all")]


def config(layers: int) -> LanceConfig:
    cfg = LanceConfig()
    return replace(cfg, llm=replace(cfg.llm, num_hidden_layers=layers))


def outputs(model: Lance, grid) -> tuple:
    """One t2i CFG velocity (t = 0.7, fixed noise) and the understanding logits of a 64-token text."""
    ctx = model.prepare_generation(Q.generation_sequence("t2i", PROMPT_IDS, grid), cfg=True)
    x = mx.random.normal((int(np.prod(grid)), 48), key=mx.random.key(1))
    v = model.velocity(ctx, x, 0.7, cfg_scale=4.0).v
    ids = np.random.default_rng(0).integers(0, 151643, 64)
    logits = model.language_model(mx.array(ids[None])).astype(mx.float32)
    mx.eval(v, logits)
    return np.array(v, dtype=np.float64), np.array(logits, dtype=np.float64)


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def llm_bytes(cfg: LanceConfig, q=None) -> int:
    """Weight bytes of the LLM (+ adapters) at bf16, optionally quantized; shapes only, nothing is computed."""
    m = Lance(cfg)
    m.set_dtype(mx.bfloat16)
    if q:
        Qz.quantize_lance(m, q)
    return Qz.weight_bytes(m)


def dequantized(model: Lance) -> Lance:
    """The model with every quantized linear replaced by a float32 Linear holding its dequantized weight."""
    from mlx import nn

    for path, m in list(model.named_modules()):
        if isinstance(m, nn.QuantizedLinear):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits).astype(mx.float32)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
            lin.weight = w
            if "bias" in m:
                lin.bias = m.bias.astype(mx.float32)
            parent, name = path.rsplit(".", 1)
            setattr(_get(model, parent), name, lin)
    mx.eval(model.parameters())
    return model


def _get(model, path: str):
    m = model
    for part in path.split("."):
        m = m[int(part)] if isinstance(m, list) else getattr(m, part)
    return m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=8, help="decoder layers to run (36 = full size; default 8)")
    p.add_argument("--size", type=int, default=8, help="latent grid side (8 = 128 px)")
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args(argv)
    grid = (1, args.size, args.size)

    t0 = time.perf_counter()
    mx.random.seed(0)
    model = Lance(config(args.layers))  # random weights
    model.set_dtype(mx.bfloat16)
    for _, v in tree_flatten(model.parameters()):
        mx.eval(v)
    bf16_params = model.parameters()
    ref = Lance(model.config)
    ref.update(bf16_params)
    ref.set_dtype(mx.float32)  # bf16-rounded weights, float32 compute
    mx.eval(ref.parameters())
    v16, l16 = outputs(ref, grid)
    del ref
    rows = [("bf16 (reference)", "-", 0.0, 0.0, llm_bytes(config(36)))]

    for bits, experts in OPTIONS:
        q = {"bits": bits, "group_size": args.group_size, "experts": experts}
        m = Lance(model.config)
        m.update(bf16_params)  # shares the bf16 arrays; quantization makes new ones
        Qz.quantize_lance(m, q)
        m = dequantized(m)
        m.set_dtype(mx.float32)
        vq, lq = outputs(m, grid)
        rows.append((f"{bits}-bit", experts, rel(vq, v16), rel(lq, l16), llm_bytes(config(36), q)))
        del m
        print(rows[-1], file=sys.stderr, flush=True)

    print(f"\n{platform.machine()}, MLX {mx.__version__}, device {mx.default_device()}, "
          f"BLAS: {blas_words()}; full-width Lance (hidden 2048, 16 heads) with "
          f"{args.layers} of 36 decoder layers, random weights, float32 activations; t2i velocity at a "
          f"{args.size}x{args.size} latent grid "
          f"(CFG 4, t = 0.7), logits of 64 text tokens; group size {args.group_size}; "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| weights | experts quantized | velocity rel. error vs bf16 | logits rel. error vs bf16 | "
          "LLM weight bytes (36 layers) |")
    print("|---|---|---|---|---|")
    for name, experts, ev, el, nbytes in rows:
        print(f"| {name} | {experts} | {ev:.4f} | {el:.4f} | {nbytes / 1e9:.2f} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU quantized matmul: MLX's fused kernel against lance_mlx.quantize.QuantizedLinear's dequantize-then-BLAS route.

One decoder MLP projection of the full-size model (2048 -> 11008, 4-bit, group 64, bf16 scales as convert.py writes
them), for row counts from a decode step (1) to a 256² training sequence (309), float32 and bfloat16 inputs, the
two paths interleaved per row count (A/B/A/B). The baseline is the fused kernel (`mx.quantized_matmul`); the table
gives where the route's threshold (`CPU_DEQUANTIZE_MIN_ROWS`) should sit. Run with OpenBLAS preloaded to measure
what users with a fast BLAS see.
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
from common import blas_line, interleaved, load_line, summary  # bench/common.py (this script's folder)

from lance_mlx import quantize as Qz


def cases(layer: Qz.QuantizedLinear, rows: int, dtype) -> dict:
    x = mx.random.normal((rows, layer.weight.shape[1] * 32 // layer.bits), key=mx.random.key(rows)).astype(dtype)
    mx.eval(x)
    return {"fused kernel": lambda: mx.eval(mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases,
                                                                 group_size=layer.group_size, bits=layer.bits)),
            "dequantize + BLAS": lambda: mx.eval(x @ layer._dequantized(x).T)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="1,2,4,8,16,64,309", help="comma-separated row counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bits", type=int, default=4, choices=(4, 8))
    args = p.parse_args(argv)
    from mlx import nn

    lin = nn.Linear(2048, 11008, bias=False)
    lin.weight = (lin.weight).astype(mx.bfloat16)
    layer = Qz.QuantizedLinear.from_linear(lin, 64, args.bits)
    mx.eval(layer.parameters())
    table = []
    for dtype in (mx.float32, mx.bfloat16):
        for rows in (int(r) for r in args.rows.split(",")):
            t = interleaved(cases(layer, rows, dtype), args.rounds, {"fused kernel": 1, "dequantize + BLAS": 1})
            s = {k: summary(v) for k, v in t.items()}
            table.append((str(dtype).split(".")[-1], rows, s["fused kernel"], s["dequantize + BLAS"],
                          layer._dequantize_first(mx.zeros((rows, 2048), dtype=dtype))))
    print(f"\n{blas_line()}\n- {load_line()}\n- 2048 -> 11008 projection, {args.bits}-bit, group 64; "
          f"median of {args.rounds} interleaved rounds; baseline: the fused kernel\n")
    print("| input dtype | rows | fused wall ms | fused CPU ms | dequantize + BLAS wall ms | CPU ms | speed-up (wall) "
          "| route taken |")
    print("|---|---|---|---|---|---|---|---|")
    for dt, rows, f, d, taken in table:
        print(f"| {dt} | {rows} | {f['wall_med'] * 1e3:.1f} | {f['cpu_med'] * 1e3:.1f} | {d['wall_med'] * 1e3:.1f} | "
              f"{d['cpu_med'] * 1e3:.1f} | {f['wall_med'] / d['wall_med']:.2f}x | {'yes' if taken else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

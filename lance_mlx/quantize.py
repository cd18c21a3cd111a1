"""Quantization of the LLM's decoder linears: option checks, which modules, swapping them in place, weight bytes."""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_map_with_path

from .errors import InvalidRequestError, WeightsError

# mlx affine group-wise quantization, as convert.py offers it.
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
QUANT_EXPERTS = ("all", "und", "gen")

# Only the linear layers of the MoT decoder layers are quantized: per expert, q/k/v/o projections and the MLP.
# embed_tokens and lm_head stay in the model dtype (docs/checkpoints.md: they feed every task's conditioning /
# every generated token and are ~10% of the weights), as do all norms, the latent adapters (vae2llm, llm2vae,
# time_embedder), the ViT and the VAE.
_QUANT_PATH = re.compile(r"^language_model\.model\.layers\.\d+\."
                         r"(self_attn\.[qkvo]_proj(?P<g1>_moe_gen)?|mlp(?P<g2>_moe_gen)?\.(gate|up|down)_proj)$")


# MLX's CPU kernel for quantized matmuls costs time in proportion to the rows it multiplies, while dequantizing the
# weight once and calling BLAS costs about the same for 1 or 300 rows. bench/quantized_matmul.py measures the crossing
# for a 2048 -> 11008 projection, 4-bit (docs/performance.md; OpenBLAS, 2 cores): float32 inputs between 8 and 16
# rows (8: 216 ms fused, 277 ms dequantized; 16: 462 / 288 ms; 309 rows, a 256² training sequence: 8.6 s / 0.52 s),
# bfloat16 inputs from 2 rows (330 / 245 ms). Apple GPUs keep the fused kernel, which is fast there.
CPU_DEQUANTIZE_MIN_ROWS = {mx.float32: 12}
CPU_DEQUANTIZE_MIN_ROWS_OTHER = 2


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that, on the CPU and for enough rows, multiplies through its dequantized weight.

    The weight is dequantized with float32 scales and biases, so the product equals the fused kernel's up to float32
    summation order (tests/test_quantize.py); the dequantized copy is a temporary of one layer. Only the affine mode
    that quantize_lance writes takes this route."""

    def _dequantize_first(self, x: mx.array) -> bool:
        if self.mode != "affine" or mx.default_device() != mx.cpu or x.ndim == 0:
            return False
        rows = x.size // max(x.shape[-1], 1)
        return rows >= CPU_DEQUANTIZE_MIN_ROWS.get(x.dtype, CPU_DEQUANTIZE_MIN_ROWS_OTHER)

    def _dequantized(self, like: mx.array) -> mx.array:
        """The float weight in `like`'s dtype, computed only once `like` exists: left alone, the graph evaluator
        would dequantize every layer's weight up front and hold all the copies at once."""
        w, scales, biases = mx.depends([self["weight"], self["scales"], self["biases"]], [like])
        return mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=self.group_size,
                             bits=self.bits).astype(like.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        if not self._dequantize_first(x):
            return super().__call__(x)

        # The backward pass dequantizes again instead of keeping the forward's copy, so a training step holds one
        # float matrix at a time, not a float copy of every layer's weights until the backward pass reaches it.
        @mx.custom_function
        def product(x):
            return x @ self._dequantized(x).T

        @product.vjp
        def product_vjp(x, cotangent, output):
            return cotangent @ self._dequantized(cotangent)

        y = product(x)
        if "bias" in self:
            y = y + self["bias"]
        return y


def _quantized(module: nn.Module, group_size: int, bits: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        return QuantizedLinear.from_linear(module, group_size, bits)
    return module.to_quantized(group_size=group_size, bits=bits)


def check_quantization(q: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate {"bits", "group_size", "experts"}; returns it normalized, or None for no quantization."""
    if not q:
        return None
    bits, group, experts = q.get("bits"), q.get("group_size", 64), q.get("experts", "all")
    if bits not in QUANT_BITS:
        raise InvalidRequestError(f"unsupported quantization bit width {bits!r}: use "
                                  f"{' or '.join(map(str, QUANT_BITS))} (or no quantization: bfloat16 keeps the most "
                                  "detail)")
    if group not in QUANT_GROUP_SIZES:
        raise InvalidRequestError(f"unsupported quantization group size {group!r}: use one of "
                                  f"{', '.join(map(str, QUANT_GROUP_SIZES))}")
    if experts not in QUANT_EXPERTS:
        raise InvalidRequestError(f"unknown expert selection {experts!r} for quantization: use one of "
                                  f"{', '.join(QUANT_EXPERTS)} (und = understanding weights, gen = *_moe_gen weights)")
    return {"bits": int(bits), "group_size": int(group), "experts": experts}


def is_quantized_linear(path: str, experts: str, in_features: int, group_size: int) -> bool:
    """Whether the LLM linear at module `path` is quantized for the expert selection."""
    m = _QUANT_PATH.match(path)
    if m is None or in_features % group_size:
        return False
    gen = bool(m.group("g1") or m.group("g2"))
    return experts == "all" or (experts == "gen") == gen


def quantization_warning(experts: str) -> str | None:
    if experts in ("all", "gen"):
        return ("quantizing the generation expert (*_moe_gen) costs visible detail in generated images and "
                "videos (other ports found the same at 4 and 8 bits); bfloat16 or --quantize-experts und keeps "
                "generation at full precision")
    return None


def quantize_lance(model: nn.Module, quantization: dict[str, Any], weights: dict[str, Any] | None = None) -> None:
    """Swap the selected LLM linears for quantized ones, in place. With `weights` (a checkpoint about to be
    loaded), exactly the modules whose `.scales` it holds are quantized, so the structure always matches the
    file; without, the rule of `is_quantized_linear` picks them (and quantizes the current weights)."""
    q = dict(quantization or {})
    bits, group = q.get("bits"), q.get("group_size", 64)
    if weights is not None:
        scaled = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}
        if bits is None:
            raise WeightsError("the weights hold quantized tensors (.scales) but config.json has no `quantization` "
                               "block with their bits and group_size; re-download or re-convert the folder")

        def pred(path, module):
            return hasattr(module, "to_quantized") and path in scaled
    else:
        q = check_quantization(q)
        if q is None:
            return
        bits, group = q["bits"], q["group_size"]

        def pred(path, module):
            return isinstance(module, nn.Linear) and is_quantized_linear(path, q["experts"], module.weight.shape[-1],
                                                                        group)
    if bits not in QUANT_BITS + (2, 3, 5, 6):
        # only reachable with `weights`: the bit width comes from the folder's config.json
        raise WeightsError(f"unsupported quantization bit width {bits!r} in the model config")
    # as nn.quantize, with this module's QuantizedLinear for the linear layers
    leaves = tree_map_with_path(lambda path, m: _quantized(m, group, bits) if pred(path, m) else m,
                                model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))

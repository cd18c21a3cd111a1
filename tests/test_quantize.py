"""Quantization of the LLM linears: which modules, option checks, weight-driven structure, error vs float32."""

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from lance_mlx import quantize
from lance_mlx import sequence as Q
from tiny_checkpoints import tiny_lance

PROMPT_IDS = [32, 8251, 9982, 264, 22361]


def quantized_paths(model):
    return {p for p, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def outputs(model):
    ctx = model.prepare_generation(Q.generation_sequence("t2i", PROMPT_IDS, (1, 2, 3)), cfg=True)
    v = model.velocity(ctx, mx.random.normal((6, 48), key=mx.random.key(0)), 0.7, cfg_scale=4.0).v
    logits = model.language_model(mx.array([PROMPT_IDS]))
    return np.array(v), np.array(logits.astype(mx.float32))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference():
    return outputs(tiny_lance())


@pytest.mark.parametrize("experts", ["all", "und", "gen"])
def test_only_the_selected_expert_linears(experts):
    model = tiny_lance()
    quantize.quantize_lance(model, {"bits": 4, "group_size": 32, "experts": experts})
    got = quantized_paths(model)
    layers = model.config.llm.num_hidden_layers
    und = {f"language_model.model.layers.{i}.{n}" for i in range(layers)
           for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    gen = {p.replace("_proj", "_proj_moe_gen") if "self_attn" in p else p.replace(".mlp.", ".mlp_moe_gen.")
           for p in und}
    assert got == {"all": und | gen, "und": und, "gen": gen}[experts]
    # never: embeddings, lm_head, norms, the latent adapters
    for p, m in model.named_modules():
        if not p.startswith("language_model.model.layers.") or "norm" in p:
            assert p not in got


def test_group_size_that_does_not_divide_leaves_the_linear_alone():
    model = tiny_lance()  # hidden 64, intermediate 128
    quantize.quantize_lance(model, {"bits": 8, "group_size": 128, "experts": "und"})
    got = quantized_paths(model)
    assert got == {f"language_model.model.layers.{i}.mlp.down_proj" for i in range(3)}


@pytest.mark.parametrize("q,match", [
    ({"bits": 3}, "bit width 3: use 4 or 8"),
    ({"bits": 16}, "bit width 16"),
    ({"bits": 4, "group_size": 100}, "group size 100"),
    ({"bits": 4, "experts": "vision"}, "unknown expert selection 'vision'"),
])
def test_bad_options(q, match):
    with pytest.raises(ValueError, match=match):
        quantize.check_quantization(q)
    with pytest.raises(ValueError, match=match):
        quantize.quantize_lance(tiny_lance(), q)
    assert quantize.check_quantization(None) is None
    assert quantize.check_quantization({"bits": 8}) == {"bits": 8, "group_size": 64, "experts": "all"}


def test_structure_follows_the_weights_when_given():
    model = tiny_lance()
    key = "language_model.model.layers.1.mlp_moe_gen.up_proj"
    weights = {f"{key}.scales": None, f"{key}.biases": None, f"{key}.weight": None}
    quantize.quantize_lance(model, {"bits": 8, "group_size": 32, "experts": "und"}, weights=weights)  # the file wins
    assert quantized_paths(model) == {key}


def test_warning_only_for_the_generation_expert():
    assert "generation expert" in quantize.quantization_warning("all")
    assert "generation expert" in quantize.quantization_warning("gen")
    assert quantize.quantization_warning("und") is None


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("experts", ["all", "und", "gen"])
def test_error_against_float32(reference, bits, experts):
    model = tiny_lance()
    full = quantize.weight_bytes(model)
    quantize.quantize_lance(model, {"bits": bits, "group_size": 32, "experts": experts})
    assert quantize.weight_bytes(model) < full
    v, logits = outputs(model)
    v_ref, logits_ref = reference
    assert np.isfinite(v).all() and np.isfinite(logits).all()
    # Loose bounds on random tiny weights (indicative only; docs/checkpoints.md has the full-size numbers).
    assert rel(v, v_ref) < {4: 0.5, 8: 0.1}[bits]
    if experts == "gen":  # text logits use only the understanding expert
        np.testing.assert_array_equal(logits, logits_ref)
    else:
        assert rel(logits, logits_ref) < {4: 0.5, 8: 0.1}[bits]


def test_dequantized_weights_give_the_quantized_outputs():
    """bench/quantize.py measures errors with dequantized weights (MLX's CPU quantized matmul is slow); that is
    the same computation as the quantized layers, up to float32 rounding."""
    model = tiny_lance()
    quantize.quantize_lance(model, {"bits": 4, "group_size": 32, "experts": "all"})
    v, logits = outputs(model)
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.QuantizedLinear):
            lin = nn.Linear(m.weight.shape[1] * 32 // m.bits, m.weight.shape[0], bias="bias" in m)
            lin.weight = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
            if "bias" in m:
                lin.bias = m.bias
            parent, name = path.rsplit(".", 1)
            target = model
            for part in parent.split("."):
                target = target[int(part)] if isinstance(target, list) else getattr(target, part)
            setattr(target, name, lin)
    assert not quantized_paths(model)
    v2, logits2 = outputs(model)
    assert rel(v2, v) < 1e-5 and rel(logits2, logits) < 1e-5



def exact(layer, x):
    """The quantized layer's product computed in float32 from its float32-dequantized weight."""
    w = mx.dequantize(layer.weight, layer.scales.astype(mx.float32), layer.biases.astype(mx.float32),
                      group_size=layer.group_size, bits=layer.bits)
    return x.astype(mx.float32) @ w.T + layer.bias.astype(mx.float32)


def fused(layer, x):
    """The fused kernel nn.QuantizedLinear calls."""
    y = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True,
                            group_size=layer.group_size, bits=layer.bits)
    return y + layer.bias


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype,rows", [(mx.float32, 1), (mx.float32, 11), (mx.float32, 12), (mx.float32, 300),
                                        (mx.bfloat16, 1), (mx.bfloat16, 2), (mx.bfloat16, 40)])
def test_cpu_route_equals_the_quantized_product(bits, dtype, rows):
    """On the CPU, enough rows go through the dequantized weight (float32 scales). float32 inputs: values and input
    gradients equal the fused kernel's and the exact product up to float32 rounding. bfloat16 inputs: within bf16
    rounding of the exact product (MLX's fused CPU kernel is less accurate there: 5 % at 2048 inputs, measured).
    Fewer rows: exactly the fused kernel's output."""
    lin = nn.Linear(512, 96, bias=True)
    lin.update({"weight": lin.weight.astype(mx.bfloat16), "bias": lin.bias.astype(mx.bfloat16)})
    layer = quantize.QuantizedLinear.from_linear(lin, 32, bits)
    x = mx.random.normal((rows, 512), key=mx.random.key(rows)).astype(dtype)
    min_rows = quantize.CPU_DEQUANTIZE_MIN_ROWS.get(dtype, quantize.CPU_DEQUANTIZE_MIN_ROWS_OTHER)
    assert layer._dequantize_first(x) == (rows >= min_rows)
    assert layer._dequantize_first(x[None]) == (rows >= min_rows)  # rows counted over all leading axes
    y = layer(x)
    assert y.dtype == fused(layer, x).dtype == dtype
    f32 = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    g = mx.grad(lambda x: (layer(x).astype(mx.float32) ** 2).sum())(x)
    g_exact = mx.grad(lambda x: (exact(layer, x) ** 2).sum())(x.astype(mx.float32))
    if rows < min_rows:  # the fused kernel itself
        np.testing.assert_array_equal(f32(y), f32(fused(layer, x)))
    elif dtype == mx.float32:
        assert rel(f32(y), f32(fused(layer, x))) < 1e-5 and rel(f32(y), f32(exact(layer, x))) < 1e-5
        g_fused = mx.grad(lambda x: (fused(layer, x) ** 2).sum())(x)
        assert rel(f32(g), f32(g_fused)) < 1e-5 and rel(f32(g), f32(g_exact)) < 1e-5
    else:
        assert rel(f32(y), f32(exact(layer, x))) < 1e-2 and rel(f32(g), f32(g_exact)) < 2e-2


def test_cpu_route_is_what_quantize_lance_installs():
    """Every quantized decoder linear is the CPU-routing class (a subclass: isinstance checks still hold)."""
    model = tiny_lance()
    quantize.quantize_lance(model, {"bits": 4, "group_size": 32, "experts": "all"})
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(type(m) is quantize.QuantizedLinear for m in layers)
    assert layers[0]._dequantize_first(mx.zeros((64, layers[0].weight.shape[1] * 32 // 4)))


def test_cpu_route_keeps_no_float_weights_for_the_backward_pass():
    """Training through a stack of quantized layers holds a few dequantized matrices at a time, however many layers:
    not a float copy of every layer's weight until the backward pass reaches it (measured: 4 matrices for 4 to 16
    layers; without the recomputing backward and the ordering, 18 for 16 layers)."""
    layers = [quantize.QuantizedLinear.from_linear(nn.Linear(1024, 1024, bias=False), 64, 4) for _ in range(16)]
    mx.eval([m.parameters() for m in layers])
    x = mx.random.normal((64, 1024), key=mx.random.key(0))
    mx.eval(x)

    def loss(x):
        for m in layers:
            x = mx.tanh(m(x))
        return x.sum()

    assert layers[0]._dequantize_first(x)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(mx.grad(loss)(x))
    matrix = 1024 * 1024 * 4  # one layer's weight in float32
    assert mx.get_peak_memory() - base < 8 * matrix

"""float32 activations over bfloat16 weights (`compute_dtype`) equal a float32 model holding the same bf16-rounded
weights, on the sequential, batched and compiled paths and for understanding; the default is unchanged."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map
from test_batched import TASKS, assert_close, case

from lance_mlx.pipeline import LancePipeline
from tiny_checkpoints import tiny_lance, write_tiny_upstream_root

RTOL = 1e-5  # bf16 -> float32 upcasts are exact, so only float32 summation order can differ


@pytest.fixture(scope="module")
def models():
    """(reference, mixed): float32 weights rounded to bf16 computing in float32, and the same weights stored
    bf16 with compute_dtype float32."""
    ref, mixed = tiny_lance(), tiny_lance()
    ref.update(tree_map(lambda p: p.astype(mx.bfloat16).astype(mx.float32), ref.parameters()))
    mixed.set_dtype(mx.bfloat16)
    mixed.compute_dtype = mx.float32
    mx.eval(ref.parameters(), mixed.parameters())
    return ref, mixed


def test_weights_stay_bf16_and_activations_are_float32(models):
    ref, mixed = models
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(mixed.parameters()))
    assert mixed.dtype == mx.float32 and ref.dtype == mx.float32
    assert mixed.embed_tokens([1, 2]).dtype == mx.float32
    plain = tiny_lance()
    plain.set_dtype(mx.bfloat16)
    assert plain.compute_dtype is None and plain.dtype == mx.bfloat16  # default: compute in the weights' dtype
    assert plain.embed_tokens([1, 2]).dtype == mx.bfloat16


@pytest.mark.parametrize("task", TASKS)
def test_velocity_equals_float32_model_with_rounded_weights(models, task):
    ref_model, mixed = models
    seq, kw, t, s_text, s_image = case(ref_model, task)
    ref_ctx = ref_model.prepare_generation(seq, **kw)
    ctx = mixed.prepare_generation(seq, **kw)
    x = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(7))
    assert ctx.cond.cache[0].keys.dtype == mx.float32  # the context is prefilled in float32 too
    ref = ref_model.velocity(ref_ctx, x, t, s_text, s_image, batched=False).v
    for opts in ({"batched": False}, {"compiled": False}, {}):
        assert_close(mixed.velocity(ctx, x, t, s_text, s_image, **opts).v, ref, RTOL)


def test_understanding_logits_equal(models):
    ref, mixed = models
    ids = [32, 8251, 9982, 264, 22361]
    got, want = mixed.language_model(ids), ref.language_model(ids)
    assert got.dtype == mx.float32
    assert_close(got, want, RTOL)


def test_pipeline_option_survives_low_memory_reload(tmp_path):
    root = write_tiny_upstream_root(tmp_path / "m")
    pipe = LancePipeline.from_pretrained(root, task="t2i", dtype="bfloat16", compute_dtype="float32",
                                         low_memory=True)
    assert pipe.model.compute_dtype == mx.float32
    pipe.release("model")
    assert pipe.component("model").compute_dtype == mx.float32
    assert LancePipeline.from_pretrained(root, task="t2i", dtype="bfloat16").model.compute_dtype is None

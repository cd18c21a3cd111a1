"""LoRA layers and adapter files: gradients and outputs against PEFT + torch, scales, fusing, loading everywhere."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from lance_mlx import lora as L

MLP_PATHS = [f"language_model.model.layers.0.mlp_moe_gen.{p}_proj" for p in ("gate", "up", "down")]


@pytest.fixture(scope="module")
def tiny():
    from tiny_checkpoints import tiny_lance

    return tiny_lance()


def _fresh():
    from tiny_checkpoints import tiny_lance

    return tiny_lance()


def _random_adapter(model, paths, r=4, alpha=8.0, seed=3):
    """An adapter with non-zero B (a trained one), so every factor gets a gradient."""
    factors = L.add_adapter(model, paths, r, alpha, seed=seed)
    rng = np.random.default_rng(seed)
    for a in factors:
        a.lora_b = mx.array(rng.standard_normal(a.lora_b.shape).astype(np.float32) * 0.1)
    return dict(zip(sorted(paths), factors))


def _torch_mlp(mlx_mlp):
    """The same MLP in torch, with module names matching ours (the PEFT target paths)."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("gate_proj", "up_proj", "down_proj"):
                w = np.array(getattr(mlx_mlp, name).base.weight if isinstance(getattr(mlx_mlp, name), L.LoRALinear)
                             else getattr(mlx_mlp, name).weight)
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = torch.from_numpy(w.copy())
                setattr(self, name, lin)

        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    return MLP()


def _torch_tree(mlp):
    """language_model.model.layers[0].mlp_moe_gen = mlp, so PEFT sees our module paths."""
    import torch

    root = torch.nn.Module()
    root.language_model = torch.nn.Module()
    root.language_model.model = torch.nn.Module()
    layer = torch.nn.Module()
    layer.mlp_moe_gen = mlp
    root.language_model.model.layers = torch.nn.ModuleList([layer])
    return root


def test_gradients_match_peft():
    import torch
    from mlx.utils import tree_flatten
    from peft import LoraConfig, get_peft_model

    model = _fresh()
    model.freeze()
    adapters = _random_adapter(model, MLP_PATHS, r=4, alpha=8.0)
    mlp = model.language_model.model.layers[0].mlp_moe_gen
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = rng.standard_normal((5, 64)).astype(np.float32)

    def loss(m):
        return (m.language_model.model.layers[0].mlp_moe_gen(mx.array(x)) * mx.array(w)).sum()

    value, grads = nn.value_and_grad(model, loss)(model)
    grads = dict(tree_flatten(grads))

    root = _torch_tree(_torch_mlp(mlp))
    peft_model = get_peft_model(root, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=MLP_PATHS))
    tmlp = peft_model.base_model.model.language_model.model.layers[0].mlp_moe_gen
    for name in ("gate_proj", "up_proj", "down_proj"):
        a = adapters[f"language_model.model.layers.0.mlp_moe_gen.{name}"]
        layer = getattr(tmlp, name)
        layer.lora_A["default"].weight.data = torch.from_numpy(np.array(a.lora_a))
        layer.lora_B["default"].weight.data = torch.from_numpy(np.array(a.lora_b))
    tx = torch.from_numpy(x)
    out = (tmlp(tx) * torch.from_numpy(w)).sum()
    out.backward()
    assert float(value.item()) == pytest.approx(float(out), rel=1e-5)
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(tmlp, name)
        for ours, theirs in (("lora_a", layer.lora_A["default"].weight.grad),
                             ("lora_b", layer.lora_B["default"].weight.grad)):
            g = np.array(grads[f"language_model.model.layers.0.mlp_moe_gen.{name}.adapters.0.{ours}"])
            t = theirs.numpy()
            assert np.abs(g - t).max() <= 1e-4 * np.abs(t).max(), (name, ours)
    # the base stays frozen: only the factors are trainable
    assert all(".adapters.0.lora_" in k for k in grads)


def test_saved_adapter_loads_in_peft(tmp_path):
    import torch
    from peft import PeftModel

    model = _fresh()
    adapters = _random_adapter(model, MLP_PATHS, r=4, alpha=8.0)
    info = L.AdapterInfo(4, 8.0, 0.0, MLP_PATHS, {"base_checkpoint": "tiny", "task": "t2i"})
    L.save_adapter(adapters, tmp_path / "ad", info)
    cfg = json.loads((tmp_path / "ad" / L.ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["lance_mlx"]["task"] == "t2i"

    plain = _fresh()
    root = _torch_tree(_torch_mlp(plain.language_model.model.layers[0].mlp_moe_gen))
    peft_model = PeftModel.from_pretrained(root, str(tmp_path / "ad"))
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    with torch.no_grad():
        theirs = peft_model.base_model.model.language_model.model.layers[0].mlp_moe_gen(torch.from_numpy(x)).numpy()
    ours = np.array(model.language_model.model.layers[0].mlp_moe_gen(mx.array(x)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # and it loads back into a fresh model through our loader
    L.load_adapter(plain, tmp_path / "ad")
    again = np.array(plain.language_model.model.layers[0].mlp_moe_gen(mx.array(x)))
    np.testing.assert_array_equal(again, ours)


def _latents(pipe, seed=5):
    from lance_mlx.config import SamplingParams
    from lance_mlx.tasks import TextToImage

    req = TextToImage("a red kite", 64, 64, SamplingParams(steps=2, seed=seed))
    return np.array(pipe.latents(req))


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    model = _fresh()
    paths = L.match_targets(model, L.GEN_EXPERT_TARGETS)
    adapters = _random_adapter(model, paths, r=4, alpha=4.0)
    folder = tmp_path_factory.mktemp("adapter")
    L.save_adapter(adapters, folder, L.AdapterInfo(4, 4.0, 0.0, paths, {"task": "t2i"}))
    return folder


def test_scale_zero_is_bit_equal_and_scales_apply(saved_adapter):
    from tiny_checkpoints import tiny_pipeline

    pipe = tiny_pipeline()
    base = _latents(pipe)
    idx = pipe.load_lora(str(saved_adapter), 0.0)
    np.testing.assert_array_equal(_latents(pipe), base)
    pipe.set_lora_scale(idx, 1.0)
    on = _latents(pipe)
    assert np.abs(on - base).max() > 1e-3
    pipe.set_lora_scale(idx, 0.0)
    np.testing.assert_array_equal(_latents(pipe), base)
    assert pipe.loras == [(str(saved_adapter), 0.0)]


def test_fused_equals_unfused(saved_adapter):
    from tiny_checkpoints import tiny_pipeline

    pipe = tiny_pipeline()
    pipe.load_lora(str(saved_adapter), 0.7)
    unfused = _latents(pipe)
    assert L.fuse(pipe.model) == 21
    assert not L.lora_layers(pipe.model)
    np.testing.assert_allclose(_latents(pipe), unfused, rtol=1e-5, atol=1e-5)


def test_lora_args_and_errors(tmp_path, saved_adapter):
    from lance_mlx.errors import LanceError

    assert L.parse_lora_arg("a/b:0.5") == ("a/b", 0.5)
    assert L.parse_lora_arg("C:/x/ad") == ("C:/x/ad", 1.0)
    assert L.check_lora_args([f"{saved_adapter}:2"]) == [(str(saved_adapter), 2.0)]
    with pytest.raises(LanceError, match="no LoRA adapter"):
        L.check_lora_args([str(tmp_path / "missing")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / L.ADAPTER_WEIGHTS).write_bytes(b"x")
    with pytest.raises(LanceError, match="adapter_config.json"):
        L.check_lora_args([str(tmp_path / "bad")])
    other = _fresh()
    other.language_model.model.layers = other.language_model.model.layers[:1]  # a smaller model
    with pytest.raises(LanceError, match="does not have"):
        L.load_adapter(other, saved_adapter)


def test_cli_lora_refused_before_loading(tmp_path, no_model, capsys):
    from lance_mlx.cmd_generate import main

    with pytest.raises(SystemExit) as e:
        main(["--prompt", "x", "--out", str(tmp_path / "o.png"), "--lora", f"{tmp_path / 'nope'}:0.5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no LoRA adapter" in err[0]


def test_convert_fuse_lora(upstream_root, saved_adapter, tmp_path):
    from lance_mlx.conversion import ConversionOptions, convert
    from tiny_checkpoints import tiny_pipeline

    out = convert(upstream_root, tmp_path / "fused", options=ConversionOptions(
        dtype="float32", fuse_lora=((str(saved_adapter), 0.5),)), progress=False, log=lambda m: None)
    from lance_mlx.pipeline import LancePipeline

    fused = LancePipeline.from_pretrained(out, task="t2i", dtype="float32")
    pipe = tiny_pipeline()
    pipe.vae = fused.vae  # the same decoder: compare latents only
    pipe.load_lora(str(saved_adapter), 0.5)
    np.testing.assert_allclose(_latents(fused), _latents(pipe), rtol=1e-5, atol=1e-5)
    plain = LancePipeline.from_pretrained(upstream_root, task="t2i", dtype="float32",
                                          loras=[f"{saved_adapter}:0.5"])
    np.testing.assert_allclose(_latents(plain), _latents(fused), rtol=1e-5, atol=1e-5)


def test_serve_lora_flag(saved_adapter, tmp_path):
    from lance_mlx.cmd_serve import build_config, parse_args
    from lance_mlx.errors import LanceError

    cfg = build_config(parse_args(["--lora", f"{saved_adapter}:0.5", "--output-dir", str(tmp_path)]))
    assert cfg.loras == (f"{saved_adapter}:0.5",)
    with pytest.raises(LanceError, match="no LoRA adapter"):  # serve.py's main: one line, exit 2
        build_config(parse_args(["--lora", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]))


def test_lora_over_a_quantized_base():
    """A 4-bit base (QLoRA-style): the adapter trains on QuantizedLinear layers and fuses after dequantizing."""
    from lance_mlx.quantize import quantize_lance

    model = _fresh()
    quantize_lance(model, {"bits": 4, "group_size": 64, "experts": "all"})
    model.freeze()
    paths = L.match_targets(model, L.GEN_EXPERT_TARGETS)
    assert len(paths) == 21
    adapters = _random_adapter(model, paths, r=2, alpha=2.0)
    assert adapters[MLP_PATHS[2]].lora_a.shape == (2, 128)  # down_proj input: the unpacked width
    x = mx.array(np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32))
    mlp = model.language_model.model.layers[0].mlp_moe_gen
    _, grads = nn.value_and_grad(model, lambda m: m.language_model.model.layers[0].mlp_moe_gen(x).sum())(model)
    from mlx.utils import tree_flatten

    assert all(np.abs(np.array(v)).max() > 0 for k, v in tree_flatten(grads) if ".layers.0.mlp_moe_gen." in k)
    before = np.array(mlp(x))
    with pytest.raises(Exception, match="quantized"):
        L.fuse(model)
    L.fuse(model, dequantize=True)
    np.testing.assert_allclose(np.array(model.language_model.model.layers[0].mlp_moe_gen(x)), before,
                               rtol=1e-4, atol=1e-4)

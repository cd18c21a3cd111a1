"""convert.py and loading every layout: round trips of tiny upstream checkpoints, other ports' layouts, bad input."""

import json
import os
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import tiny_checkpoints as tiny
from fixtures import GOLDEN, tree_hash
from lance_mlx import checkpoints, conversion, loading, quantize
from lance_mlx import cmd_convert as convert_cli
from lance_mlx import sequence as Q
from lance_mlx.conversion import ConversionOptions, convert
from lance_mlx.errors import WeightsError

PROMPT_IDS = [32, 8251, 9982, 264, 22361]
GRID = (1, 2, 3)


def load(path, task, **kw):
    files = checkpoints.resolve(path, task)
    return loading.load_components(files, task, **kw)


def velocity(model, seed=0, grid=GRID, task="t2i"):
    """One CFG velocity (N, 48) at t = 0.7 for injected noise: the quantity a denoising step uses."""
    ctx = model.prepare_generation(Q.generation_sequence(task, PROMPT_IDS, grid), cfg=True)
    n = int(np.prod(grid))
    x = mx.random.normal((n, 48), key=mx.random.key(seed))
    return np.array(model.velocity(ctx, x, 0.7, cfg_scale=4.0).v)


def vit_features(c):
    x = mx.array(np.random.default_rng(1).standard_normal((16, 1176)).astype(np.float32))
    return np.array(c.vit(x, [(1, 4, 4)]).astype(mx.float32))


def vae_decode(c):
    z = mx.random.normal((1, 2, 2, 3, 48), key=mx.random.key(5))
    return np.array(c.vae.decode(z, clamp=False))


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def params(model):
    return {k: np.array(v.astype(mx.float32)) if mx.issubdtype(v.dtype, mx.floating) else np.array(v)
            for k, v in tree_flatten(model.parameters())}


def add_bundled_vit(root):
    """Make Lance_3B_Video/model.safetensors carry `vit_model.*` tensors that differ from vit.safetensors, and a
    video-sized (31-frame) latent position table, as the real video checkpoint does."""
    from safetensors.numpy import load_file, save_file

    path = root / "Lance_3B_Video" / "model.safetensors"
    w = load_file(str(path))
    vit = load_file(str(GOLDEN / "vit_tiny.safetensors"))
    for k, v in vit.items():
        w[f"vit_model.{k}"] = (v * np.float32(1.5)).astype(v.dtype)
    hidden = w["vae2llm.weight"].shape[0]
    w["latent_pos_embed.pos_embed"] = np.zeros((31 * 64 * 64, hidden), np.float32)
    save_file(w, str(path), metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return tiny.write_tiny_upstream_root(tmp_path_factory.mktemp("up_image"))


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    root = tiny.write_tiny_upstream_root(tmp_path_factory.mktemp("up_video"), video=True)
    return add_bundled_vit(root)


@pytest.fixture(scope="module")
def upstream_image(image_root):
    return load(image_root, "image_edit", dtype="float32", vae_dtype="float32")


@pytest.fixture(scope="module")
def converted_f32(image_root, tmp_path_factory):
    return convert(image_root, tmp_path_factory.mktemp("c") / "f32", options=ConversionOptions(dtype="float32"),
                   progress=False, log=lambda m: None)


# ------------------------------------------------------------------------------------------- round trips
def test_image_round_trip_is_exact(upstream_image, converted_f32):
    files = sorted(os.listdir(converted_f32))
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors", "vit.safetensors",
            "vae.safetensors", "vocab.json", "merges.txt"} <= set(files)
    assert not any(".partial" in f for f in os.listdir(converted_f32.parent))
    cfg = json.loads((converted_f32 / "config.json").read_text())
    assert cfg["mlx_layout"] is True and cfg["quantization"] is None and cfg["vae"]["c_dim"] == 8
    located = checkpoints.locate(converted_f32, "image_edit")
    assert located.layout == "mlx" and located.checkpoint == "image"

    conv = load(converted_f32, "image_edit", dtype="float32", vae_dtype="float32")
    pu, pc = params(upstream_image.model), params(conv.model)
    assert pu.keys() == pc.keys()
    for k in pu:
        np.testing.assert_array_equal(pc[k], pu[k], err_msg=k)
    np.testing.assert_array_equal(velocity(conv.model), velocity(upstream_image.model))
    np.testing.assert_array_equal(vit_features(conv), vit_features(upstream_image))
    np.testing.assert_array_equal(vae_decode(conv), vae_decode(upstream_image))


def test_vae_is_built_from_its_own_weights(upstream_image):
    # the tiny VAE (widths 8/10) loads although the default config describes the released 160/256 one
    assert upstream_image.model.config.vae.c_dim == 160
    assert upstream_image.vae.model.encoder.conv1.weight.shape[0] == tiny.TINY_VAE["c_dim"]


def test_video_round_trip_uses_the_bundled_vit(video_root, tmp_path):
    out = convert(video_root, tmp_path / "video", options=ConversionOptions(video=True, dtype="float32"),
                  progress=False, log=lambda m: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["conversion"]["checkpoint"] == "Lance_3B_Video" and "bundled" in cfg["conversion"]["vit"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith(("vit_model.", "latent_pos_embed")) for k in index)
    assert checkpoints.locate(out, "video_edit").checkpoint == "video"

    up = load(video_root, "video_edit", dtype="float32", vae_dtype="float32")
    conv = load(out, "video_edit", dtype="float32", vae_dtype="float32")
    np.testing.assert_array_equal(vit_features(conv), vit_features(up))
    np.testing.assert_array_equal(velocity(conv.model, grid=(2, 2, 2), task="t2v"),
                                  velocity(up.model, grid=(2, 2, 2), task="t2v"))
    # the bundled tensors (scaled by 1.5 in the fixture) won over Qwen2.5-VL-ViT/vit.safetensors
    golden = mx.load(str(GOLDEN / "vit_tiny.safetensors"))["merger.ln_q.weight"]
    np.testing.assert_allclose(np.array(conv.vit.merger.ln_q.weight), np.array(golden) * 1.5, rtol=1e-6)


def test_bfloat16_folder(upstream_image, image_root, tmp_path):
    out = convert(image_root, tmp_path / "bf16", progress=False, log=lambda m: None)  # default bfloat16
    shard = checkpoints.sharded_files(out)[0]
    dtypes = {v["dtype"] for k, v in checkpoints.check_safetensors(shard).items() if k != "__metadata__"}
    assert dtypes == {"BF16"}
    vae_header = checkpoints.check_safetensors(out / "vae.safetensors")
    assert {v["dtype"] for k, v in vae_header.items() if k != "__metadata__"} == {"F32"}
    model = load(out, "t2i").model
    assert model.dtype == mx.bfloat16
    v = velocity(model)
    assert np.isfinite(v).all() and rel(v, velocity(upstream_image.model)) < 0.05


def test_small_shards_and_the_index(image_root, tmp_path, upstream_image):
    out = convert(image_root, tmp_path / "sharded", options=ConversionOptions(dtype="float32", shard_bytes=4 * 2**20),
                  progress=False, log=lambda m: None)
    shards = checkpoints.sharded_files(out)
    assert len(shards) >= 3
    for p in shards:  # a shard over the limit holds one tensor bigger than the limit (the 39 MB vocabulary tables)
        names = [k for k in checkpoints.check_safetensors(p) if k != "__metadata__"]
        assert p.stat().st_size <= 4 * 2**20 + 2**16 or len(names) == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    conv = load(out, "t2i", dtype="float32")
    np.testing.assert_array_equal(velocity(conv.model), velocity(upstream_image.model))


# ------------------------------------------------------------------------------------------- quantized
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("experts", ["all", "und", "gen"])
def test_quantized_folders_load_and_run(image_root, upstream_image, tmp_path, bits, experts):
    logs = []
    out = convert(image_root, tmp_path / "q", options=ConversionOptions(quantize=bits, group_size=32, experts=experts),
                  progress=False, log=logs.append)
    assert bool(logs) == (experts != "und")  # the generation-expert warning
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"bits": bits, "group_size": 32, "experts": experts}

    model = load(out, "t2i").model
    layer = model.language_model.model.layers[0]
    kinds = {name: type(m).__name__ for name, m in (("und", layer.mlp.gate_proj), ("gen", layer.mlp_moe_gen.gate_proj),
                                                     ("und_attn", layer.self_attn.q_proj),
                                                     ("gen_attn", layer.self_attn.o_proj_moe_gen))}
    want_und, want_gen = experts in ("all", "und"), experts in ("all", "gen")
    assert (kinds["und"] == "QuantizedLinear") == want_und and (kinds["und_attn"] == "QuantizedLinear") == want_und
    assert (kinds["gen"] == "QuantizedLinear") == want_gen and (kinds["gen_attn"] == "QuantizedLinear") == want_gen
    assert type(model.language_model.lm_head).__name__ == "Linear"
    assert type(model.language_model.model.embed_tokens).__name__ == "Embedding"

    # the folder equals quantizing the upstream model in memory (same rule, same rounding)
    ref = load(image_root, "t2i").model
    quantize.quantize_lance(ref, cfg["quantization"])
    mine, theirs = params(model), params(ref)
    assert mine.keys() == theirs.keys()
    for k in mine:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    v = velocity(model)
    np.testing.assert_array_equal(v, velocity(ref))
    # Loose bound (relative L2 error vs float32) on random tiny weights; measured 0.13-0.21 at 4 bits and
    # 0.01-0.04 at 8 bits (bfloat16 alone: 0.04).
    assert np.isfinite(v).all() and rel(v, velocity(upstream_image.model)) < {4: 0.5, 8: 0.1}[bits]


# ------------------------------------------------------------------------------------------- other MLX ports
def _stripped_name(k):
    for pre, new in (("language_model.model.", ""), ("language_model.", ""), ("vae2llm.", "vae_in_proj.vae2llm."),
                     ("time_embedder.mlp.0.", "time_embedder.proj_in."),
                     ("time_embedder.mlp.2.", "time_embedder.proj_out."),
                     ("llm2vae.", "llm2vae.llm2vae.")):
        if k.startswith(pre):
            return new + k[len(pre):]
    return k


def _mlx_video_name(k):
    import re

    k = re.sub(r"\.(residual|head)\.(\d+)\.", r".\1.layer_\2.", k)
    k = re.sub(r"\.(to_qkv|proj)\.(weight|bias)$", r".\1_\2", k)
    return re.sub(r"\.resample\.1\.(weight|bias)$", r".resample_\1", k)


@pytest.mark.parametrize("style", ["upstream", "stripped"])
def test_other_mlx_port_layouts(image_root, upstream_image, converted_f32, tmp_path, style):
    """RockTalk-style (upstream names, nested-conv VAE) and mlx-community-style (stripped names, mlx-video VAE
    names) folders."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / style
    d.mkdir()
    src = load_file(str(image_root / "Lance_3B" / "model.safetensors"))
    if style == "stripped":
        src = {_stripped_name(k): v for k, v in src.items()}
    save_file(src, str(d / "model.safetensors"))
    shutil.copy(image_root / "Lance_3B" / "llm_config.json", d / "config.json")
    for f in (GOLDEN / "tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    shutil.copy(image_root / "Qwen2.5-VL-ViT" / "vit.safetensors", d / "vit.safetensors")
    vae = mx.load(str(converted_f32 / "vae.safetensors"))
    if style == "upstream":  # each conv nested in a `.conv` module, as MLX ports that wrap nn.Conv3d store it
        convs = {k[: -len(".weight")] for k, v in vae.items() if k.endswith(".weight") and v.ndim >= 4}
        vae = {(k.rsplit(".", 1)[0] + ".conv." + k.rsplit(".", 1)[1]) if k.rsplit(".", 1)[0] in convs else k: v
               for k, v in vae.items()}
        assert "encoder.conv1.conv.weight" in vae and "encoder.conv1.conv.bias" in vae
    else:  # mlx-video's Wan 2.2 VAE names, which mlx-community's vae.safetensors loads into
        vae = {_mlx_video_name(k): v for k, v in vae.items()}
        assert "decoder.middle.1.to_qkv_weight" in vae and "decoder.head.layer_2.weight" in vae
    mx.save_safetensors(str(d / "vae.safetensors"), vae)

    files = checkpoints.locate(d, "t2i")
    assert files.layout == "mlx-other" and files.key_style == style
    model = load(d, "t2i", dtype="float32", vae_dtype="float32")
    np.testing.assert_array_equal(velocity(model.model), velocity(upstream_image.model))
    np.testing.assert_array_equal(vae_decode(model), vae_decode(upstream_image))


def test_unknown_layout_names_what_was_found(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"transformer.h.0.attn.weight": mx.zeros((2, 2))})
    with pytest.raises(WeightsError, match=r"match no known Lance layout.*transformer\.h\.0\.attn\.weight"):
        checkpoints.locate(tmp_path, "t2i")
    with pytest.raises(WeightsError, match=r"not a Lance model folder.*found \['notes.txt'\]"):
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "notes.txt").write_text("hi")
        convert(tmp_path / "x", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------- bad input
def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        convert_cli.main(argv)
    return e.value.code, capsys.readouterr().err


def test_cli_converts_and_refuses_an_existing_destination(image_root, tmp_path, capsys):
    dest = tmp_path / "cli"
    assert convert_cli.main(["--model", str(image_root), "--out", str(dest), "--dtype", "float16"]) == 0
    assert json.loads((dest / "config.json").read_text())["conversion"]["dtype"] == "float16"
    stamp = (dest / "config.json").stat().st_mtime_ns
    code, err = run_cli(["--model", str(image_root), "--out", str(dest)], capsys)
    assert code == 2 and "already exists" in err and "--force" in err
    assert (dest / "config.json").stat().st_mtime_ns == stamp
    assert convert_cli.main(["--model", str(image_root), "--out", str(dest), "--force"]) == 0
    assert json.loads((dest / "config.json").read_text())["conversion"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("args,match", [
    (["--dtype", "float8"], "unsupported dtype 'float8'"),
    (["--vae-dtype", "float16"], "unsupported VAE dtype"),
    (["--quantize", "3"], "unsupported quantization bit width 3: use 4 or 8"),
    (["--quantize", "4", "--group-size", "48"], "unsupported quantization group size 48"),
])
def test_cli_rejects_bad_options(image_root, tmp_path, capsys, args, match):
    code, err = run_cli(["--model", str(image_root), "--out", str(tmp_path / "o"), *args], capsys)
    assert code == 2 and match in err and not (tmp_path / "o").exists()


def test_malicious_pth_is_refused(image_root, tmp_path, capsys):
    root = tmp_path / "evil"
    shutil.copytree(image_root, root)
    marker = tmp_path / "payload_ran"

    class RunsShell:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"encoder.conv1.weight": torch.zeros(2), "x": RunsShell()}, root / "Wan2.2_VAE.pth")
    code, err = run_cli(["--model", str(root), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "system" in err and "Wan2.2_VAE.pth" in err
    assert not marker.exists() and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_truncated_safetensors_is_refused(image_root, tmp_path, capsys):
    root = tmp_path / "cut"
    shutil.copytree(image_root, root)
    f = root / "Lance_3B" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    code, err = run_cli(["--model", str(root), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "truncated" in err and not (tmp_path / "o").exists()


def test_interrupted_conversion_leaves_nothing(image_root, tmp_path, monkeypatch):
    calls = []
    real = conversion._write_safetensors

    def flaky(path, tensors, metadata):
        calls.append(path.name)
        if path.name.startswith("model-"):
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the LLM shards were written
        real(path, tensors, metadata)

    monkeypatch.setattr(conversion, "_write_safetensors", flaky)
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(image_root, dest, progress=False)
    assert calls == ["vae.safetensors", "model-00001-of-00001.safetensors"]
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space(image_root, tmp_path, monkeypatch):
    monkeypatch.setattr(conversion.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(WeightsError, match=r"not enough disk space.*needs about 0\.0[0-9] GB.*0\.00 GB free"):
        convert(image_root, tmp_path / "out", options=ConversionOptions(dtype="float32"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_requantizing_a_quantized_folder_is_refused(image_root, tmp_path):
    q = convert(image_root, tmp_path / "q", options=ConversionOptions(quantize=8, group_size=32, experts="und"),
                progress=False, log=lambda m: None)
    with pytest.raises(WeightsError, match="already quantized"):
        convert(q, tmp_path / "again", options=ConversionOptions(quantize=4), progress=False)


# ------------------------------------------------------------------------------------------- --force ownership



@pytest.mark.parametrize("kind", ["foreign", "extra_file", "no_conversion_record"])
def test_force_leaves_a_folder_convert_did_not_write_alone(image_root, tmp_path, capsys, kind):
    dest = tmp_path / "mine"
    if kind == "foreign":
        (dest / "photos").mkdir(parents=True)
        (dest / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        (dest / "notes.txt").write_text("keep me")
    else:  # what an earlier conversion writes, plus something of the user's, or a config.json of another tool
        dest.mkdir()
        cfg = {"mlx_layout": True, "conversion": {"source": "x"}}
        if kind == "no_conversion_record":
            cfg = {"mlx_layout": True}
        (dest / "config.json").write_text(json.dumps(cfg))
        (dest / "model-00001-of-00001.safetensors").write_bytes(b"weights")
        if kind == "extra_file":
            (dest / "notes.txt").write_text("keep me")
    before = tree_hash(dest)
    for force in ([], ["--force"]):
        code, err = run_cli(["--model", str(image_root), "--out", str(dest), *force], capsys)
        assert code == 2 and str(dest) in err and "not written by convert.py" in err and "new destination" in err
        assert tree_hash(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left beside it


def test_ownership_is_checked_before_the_source_is_read(tmp_path, capsys):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    code, err = run_cli(["--model", str(tmp_path / "no_such_model"), "--out", str(dest), "--force"], capsys)
    assert code == 2 and "not written by convert.py" in err and "no_such_model" not in err


@pytest.mark.parametrize("out", [".", "..", "~", "/"])
def test_current_parent_home_and_root_are_refused(tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree_hash(tmp_path)
    code, err = run_cli(["--model", str(tmp_path / "no_such_model"), "--out", out, "--force"], capsys)
    assert code == 2 and "refusing" in err and "new destination" in err
    assert tree_hash(tmp_path) == before


def test_force_replaces_an_earlier_conversion(image_root, tmp_path, capsys):
    dest = tmp_path / "out"
    old = convert(image_root, dest, options=ConversionOptions(dtype="float32", shard_bytes=4 * 2**20),
                  progress=False, log=lambda m: None)
    assert len(checkpoints.sharded_files(old)) >= 3
    assert convert_cli.main(["--model", str(image_root), "--out", str(dest), "--force"]) == 0
    assert json.loads((dest / "config.json").read_text())["conversion"]["dtype"] == "bfloat16"
    assert sorted(p.name for p in dest.glob("model-*")) == ["model-00001-of-00001.safetensors"]  # no stale shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither the old folder nor a temporary one


def test_failed_forced_conversion_leaves_the_earlier_one(image_root, converted_f32, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    shutil.copytree(converted_f32, dest)
    before = tree_hash(dest)

    def broken(path, tensors, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conversion, "_write_safetensors", broken)
    with pytest.raises(OSError):
        convert(image_root, dest, options=ConversionOptions(force=True), progress=False)
    assert tree_hash(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

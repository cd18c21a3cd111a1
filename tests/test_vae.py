"""Wan 2.2 VAE: parity with the official PyTorch code, weight loading, release architecture, input errors."""

import zipfile

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from lance_mlx.torch_checkpoint import CheckpointError, load_torch_checkpoint
from lance_mlx.vae_wan22 import (
    LATENTS_MEAN,
    LATENTS_STD,
    VAEInputError,
    Wan2_2_VAE,
    WeightsMismatchError,
    _patchify,
    infer_vae_config,
    sanitize_vae_weights,
)
from vae_reference import (
    RELEASE,
    SMALL,
    load_reference_module,
    random_reference_vae,
    reference_encode,
    rel_err,
    to_channels_last,
)

# Parity tolerance: max-abs-diff / max-abs-reference (float32 on both sides; observed ~1e-6).
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return load_reference_module()


@pytest.fixture(scope="module")
def small(ref, tmp_path_factory):
    """(official torch model, its .pth written by torch.save, our VAE loaded from that file)."""
    model = random_reference_vae(ref, **SMALL)
    pth = tmp_path_factory.mktemp("vae") / "small_vae.pth"
    torch.save(model.state_dict(), pth)
    vae = Wan2_2_VAE(**SMALL).load_weights(pth)
    return model, pth, vae


def _scale():
    mean = torch.tensor(LATENTS_MEAN)
    return [mean, 1.0 / torch.tensor(LATENTS_STD)]


@pytest.mark.parametrize("frames,height,width", [(1, 64, 64), (9, 64, 64), (5, 48, 80)],
                         ids=["image64", "video9x64", "video5x48x80"])
def test_parity_with_official(small, frames, height, width):
    model, _, vae = small
    gen = torch.Generator().manual_seed(frames * 1000 + width)
    video = torch.rand(1, 3, frames, height, width, generator=gen) * 2 - 1
    video_mx = mx.array(to_channels_last(video))

    raw_mu_ref, log_var_ref = reference_encode(model, video, [0.0, 1.0])
    latent_ref, _ = reference_encode(model, video, _scale())
    with torch.no_grad():
        decoded_ref = model.decode(latent_ref, _scale())

    mus, log_vars = zip(*vae.model.encode_chunks(_patchify(video_mx)))
    assert rel_err(mx.concatenate(mus, axis=1), to_channels_last(raw_mu_ref)) < TOL
    assert rel_err(mx.concatenate(log_vars, axis=1), to_channels_last(log_var_ref)) < TOL

    latent, log_var = vae.encode(video_mx, return_log_var=True)
    t = 1 + (frames - 1) // 4
    assert latent.shape == (1, t, height // 16, width // 16, 48)
    assert rel_err(latent, to_channels_last(latent_ref)) < TOL
    assert rel_err(log_var, to_channels_last(log_var_ref)) < TOL

    raw = vae.decode(mx.array(to_channels_last(latent_ref)), clamp=False)
    assert raw.shape == (1, frames, height, width, 3)
    assert rel_err(raw, to_channels_last(decoded_ref)) < TOL


@pytest.mark.parametrize("t", [2, 3])
def test_decode_random_latents(small, t):
    model, _, vae = small
    gen = torch.Generator().manual_seed(t)
    latent = torch.randn(1, 48, t, 4, 5, generator=gen)
    with torch.no_grad():
        expected = model.decode(latent, _scale())
    latent_mx = mx.array(to_channels_last(latent))
    raw = vae.decode(latent_mx, clamp=False)
    assert raw.shape == (1, 1 + 4 * (t - 1), 64, 80, 3)
    assert rel_err(raw, to_channels_last(expected)) < TOL

    chunks = list(vae.decode_stream(latent_mx, clamp=False))
    assert [c.shape[1] for c in chunks] == [1] + [4] * (t - 1)
    np.testing.assert_array_equal(np.array(mx.concatenate(chunks, axis=1)), np.array(raw))
    clamped = vae.decode(latent_mx)
    np.testing.assert_array_equal(np.array(clamped), np.clip(np.array(raw), -1, 1))


def test_posterior_sample(small):
    _, _, vae = small
    video = mx.random.uniform(-1, 1, (1, 5, 32, 48, 3), key=mx.random.key(1))
    latent, log_var = vae.encode(video, return_log_var=True)
    key = mx.random.key(7)
    sample = vae.encode(video, key=key)
    expected = latent + mx.exp(0.5 * log_var) * mx.random.normal(latent.shape, key=key)
    np.testing.assert_allclose(np.array(sample), np.array(expected), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.array(vae.encode(video, key=key)), np.array(sample))
    assert not np.allclose(np.array(sample), np.array(latent))


def test_batch_matches_single_items(small):
    vae = small[2]
    video = mx.random.uniform(-1, 1, (2, 5, 32, 48, 3), key=mx.random.key(4))
    latent = vae.encode(video)
    decoded = vae.decode(latent)
    for i in range(2):
        np.testing.assert_allclose(np.array(latent[i:i + 1]), np.array(vae.encode(video[i:i + 1])), atol=1e-6)
        np.testing.assert_allclose(np.array(decoded[i:i + 1]), np.array(vae.decode(latent[i:i + 1])), atol=1e-6)


def test_bfloat16_close_to_float32(small):
    _, pth, vae = small
    half = Wan2_2_VAE(**SMALL, dtype=mx.bfloat16).load_weights(pth)
    assert {v.dtype for _, v in tree_flatten(half.model.parameters())} == {mx.bfloat16}
    video = mx.random.uniform(-1, 1, (1, 5, 32, 48, 3), key=mx.random.key(2))
    latent = vae.encode(video)
    assert half.encode(video).dtype == mx.float32  # outputs are returned as float32
    assert rel_err(half.encode(video), latent) < 0.05
    assert rel_err(half.decode(latent, clamp=False), vae.decode(latent, clamp=False)) < 0.05


def test_safetensors_round_trip(small, tmp_path):
    _, _, vae = small
    path = tmp_path / "vae.safetensors"
    vae.save_weights(path)
    again = Wan2_2_VAE(**SMALL).load_weights(path)
    direct = Wan2_2_VAE(**SMALL)
    direct.model.load_weights(list(mx.load(str(path)).items()), strict=True)
    params = dict(tree_flatten(vae.model.parameters()))
    for other in (again, direct):
        other_params = dict(tree_flatten(other.model.parameters()))
        assert other_params.keys() == params.keys()
        for k, v in params.items():
            np.testing.assert_array_equal(np.array(other_params[k]), np.array(v), err_msg=k)
    latent = mx.random.normal((1, 2, 2, 3, 48), key=mx.random.key(3))
    np.testing.assert_array_equal(np.array(again.decode(latent)), np.array(vae.decode(latent)))


def test_load_from_dict(small):
    model, _, vae = small
    from_torch = Wan2_2_VAE(**SMALL).load_weights({k: v.numpy() for k, v in model.state_dict().items()})
    params = dict(tree_flatten(vae.model.parameters()))
    from_mlx = Wan2_2_VAE(**SMALL).load_weights(params, source="ours")
    latent = mx.random.normal((1, 2, 2, 3, 48), key=mx.random.key(5))
    expected = np.array(vae.decode(latent))
    for other in (from_torch, from_mlx):
        np.testing.assert_array_equal(np.array(other.decode(latent)), expected)
    del params["conv2.bias"]
    with pytest.raises(WeightsMismatchError, match=r"^ours: .*1 missing keys: conv2.bias"):
        Wan2_2_VAE(**SMALL).load_weights(params, source="ours")


def test_sanitize_is_idempotent(small):
    _, pth, vae = small
    raw = load_torch_checkpoint(pth)
    assert infer_vae_config(raw) == dict(dim=8, dec_dim=10, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                                         temperal_downsample=(False, True, True))
    once = sanitize_vae_weights(raw)  # configuration inferred from the weights
    twice = sanitize_vae_weights(once)
    with_model = sanitize_vae_weights(once, vae.model)
    expected = {k: v.shape for k, v in tree_flatten(vae.model.parameters())}
    assert {k: v.shape for k, v in once.items()} == expected
    for k in once:
        np.testing.assert_array_equal(twice[k], once[k])
        np.testing.assert_array_equal(with_model[k], once[k])
    assert raw["encoder.conv1.weight"].shape == (8, 12, 3, 3, 3)
    assert once["encoder.conv1.weight"].shape == (8, 3, 3, 3, 12)
    np.testing.assert_array_equal(once["encoder.conv1.weight"], raw["encoder.conv1.weight"].transpose(0, 2, 3, 4, 1))


def _mlx_layout(name, shape):
    if name.endswith("gamma"):
        return (shape[0],)
    if len(shape) in (4, 5):  # Conv2d / Conv3d: channels-in moves last
        return (shape[0], *shape[2:], shape[1])
    return tuple(shape)


def test_release_architecture_matches_official(ref):
    with torch.device("meta"):
        official = ref.WanVAE_(**RELEASE)
    want = {k: _mlx_layout(k, tuple(v.shape)) for k, v in official.state_dict().items()}
    vae = Wan2_2_VAE()  # parameters stay lazy: nothing is evaluated here
    got = {k: tuple(v.shape) for k, v in tree_flatten(vae.model.parameters())}
    assert got == want
    assert len(got) == 196
    count = {part: sum(int(np.prod(s)) for k, s in got.items() if k.startswith(part))
             for part in ("encoder.", "decoder.")}
    assert sum(int(np.prod(s)) for s in got.values()) == 704_688_668
    assert count == {"encoder.": 149_627_776, "decoder.": 555_049_228}


# ---- input errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,match", [
    ((1, 1, 40, 64, 3), r"multiples of 16.*got 40x64.*height 32 or 48"),
    ((1, 1, 64, 8, 3), r"multiples of 16.*width 16"),
    ((1, 6, 64, 64, 3), r"1 \+ 4k.*got 6.*use 5 or 9"),
    ((1, 2, 64, 64, 3), r"got 2.*use 1 or 5"),
    ((1, 1, 64, 64, 4), r"3 \(RGB\) channels.*got 4"),
    ((1, 64, 64, 3), r"\(B, T, H, W, 3\).*x\[:, None\]"),
])
def test_bad_video_shapes(small, shape, match):
    with pytest.raises(VAEInputError, match=match):
        small[2].encode(mx.zeros(shape))


def test_bad_latent_shape(small):
    with pytest.raises(VAEInputError, match=r"\(B, t, h, w, 48\).*transpose"):
        small[2].decode(mx.zeros((1, 48, 1, 4, 4)))


# ---- weight-file errors -------------------------------------------------------------------------------------

def test_missing_weight_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*nope.pth"):
        Wan2_2_VAE(**SMALL).load_weights(tmp_path / "nope.pth")


def test_truncated_pth(small, tmp_path):
    data = small[1].read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*truncated or corrupt.*Fix"):
        Wan2_2_VAE(**SMALL).load_weights(bad)


def test_corrupt_pth_record(small, tmp_path):
    data = bytearray(small[1].read_bytes())
    with zipfile.ZipFile(small[1]) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # Local header: 30 bytes + name + extra, then the stored (uncompressed) record.
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 8:start + 16] = bytes(255 - b for b in data[start + 8:start + 16])
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt\.pth.*(CRC|corrupt)"):
        Wan2_2_VAE(**SMALL).load_weights(bad)


def test_truncated_safetensors(small, tmp_path):
    good = tmp_path / "good.safetensors"
    small[2].save_weights(good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*truncated or corrupt"):
        Wan2_2_VAE(**SMALL).load_weights(bad)


def test_missing_and_unexpected_keys(small, tmp_path):
    model = small[0]
    state = dict(model.state_dict())
    del state["decoder.head.2.bias"], state["encoder.middle.1.proj.weight"]
    state["encoder.extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError) as err:
        Wan2_2_VAE(**SMALL).load_weights(path)
    msg = str(err.value)
    assert "2 missing keys: decoder.head.2.bias, encoder.middle.1.proj.weight" in msg
    assert "1 unexpected keys: encoder.extra.weight" in msg
    assert "Fix:" in msg


def test_wrong_configuration(small):
    hint = r"shape mismatches.*looks like Wan2_2_VAE\(z_dim=48, c_dim=8, dec_dim=10,.*Fix"
    with pytest.raises(WeightsMismatchError, match=hint):
        Wan2_2_VAE(c_dim=16, dec_dim=10).load_weights(small[1])

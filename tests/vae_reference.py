"""The official Wan2.2 VAE (wan/modules/vae2_2.py of the wan22 package) as a parity reference with random weights."""

import importlib.util
import os

import numpy as np

SMALL = dict(c_dim=8, dec_dim=10)  # reduced widths; z_dim, dim_mult and temporal flags stay as released
RELEASE = dict(dim=160, dec_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
               temperal_downsample=[False, True, True])


def load_reference_module():
    """Import vae2_2.py by path: `import wan` would pull in flash_attn and the rest of the package."""
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the official Wan 2.2 code is missing: pip install --no-deps -r requirements-ref.txt")
    path = os.path.join(list(spec.submodule_search_locations)[0], "modules", "vae2_2.py")
    mod_spec = importlib.util.spec_from_file_location("wan_vae2_2_ref", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def random_reference_vae(ref, c_dim, dec_dim, seed=0):
    """Official WanVAE_ with random weights, gammas included (the default init leaves them at one)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    cfg = dict(RELEASE, dim=c_dim, dec_dim=dec_dim)
    model = ref.WanVAE_(**cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # unit-variance outputs keep the deep stack well conditioned
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def reference_encode(model, video_ncthw, scale):
    """Official encode; also returns the raw log_var, read from the output of `conv1` (mu | log_var)."""
    import torch

    captured = {}
    hook = model.conv1.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    try:
        with torch.no_grad():
            mu = model.encode(video_ncthw, scale)
    finally:
        hook.remove()
    log_var = captured["h"][:, model.z_dim:]
    return mu, log_var


def to_channels_last(t) -> np.ndarray:
    """(B, C, T, H, W) torch tensor -> (B, T, H, W, C) numpy."""
    return t.permute(0, 2, 3, 4, 1).contiguous().numpy()


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the tolerance measure of the parity tests)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())

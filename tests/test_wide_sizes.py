"""Sizes wider or taller than 64 latents, as upstream runs them: the 3-D table index t*64*64 + h*64 + w wraps
a column past 64 onto the next row's entry; only an index past the table's end is refused."""

import html.parser
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from lance_mlx import cmd_generate
from lance_mlx import sequence as Q
from lance_mlx.config import SamplingParams
from lance_mlx.errors import InvalidRequestError
from lance_mlx.processing import OUTPUT_ASPECT_RATIOS, output_size
from lance_mlx.server import schemas
from lance_mlx.server.settings import ServerConfig
from lance_mlx.tasks import TextToImage, TextToVideo, check_size
from tiny_checkpoints import tiny_lance

PROMPT = [32, 8251, 1467, 13]
WIDE = (1168, 496)  # upstream's app, 21:9 at image_768res (common/gradio_utils/settings.py)
WIDE_GRID = (1, 496 // 16, 1168 // 16)  # 31 rows x 73 columns


@pytest.fixture(scope="module")
def model():
    return tiny_lance()


@lru_cache(maxsize=1)
def upstream_table(hidden: int, frames: int = 31, side: int = 64) -> np.ndarray:
    """The whole (frames*side*side, hidden) table as upstream builds it (modeling_utils.py::get_3d_sincos_pos_embed:
    an ij meshgrid of (t, h, w), per axis [sin, cos] of pos * 10000^(-k/(D/2)) in float64, then float32)."""
    d = hidden // 3
    d = d if d % 2 == 0 else d - 1
    tt, hh, ww = np.meshgrid(np.arange(frames, dtype=np.float32), np.arange(side, dtype=np.float32),
                             np.arange(side, dtype=np.float32), indexing="ij")

    def axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(d, tt), axis(d, hh), axis(hidden - 2 * d, ww)], axis=1).astype(np.float32)


def upstream_rows(table: np.ndarray, shape, side: int = 64) -> np.ndarray:
    """table[t*side*side + h*side + w] for the grid in raster order (data_utils.py, extrapolate_video)."""
    t, h, w = shape
    ids = [ti * side * side + hi * side + wi for ti in range(t) for hi in range(h) for wi in range(w)]
    return table[np.array(ids)]


# ------------------------------------------------------------------------------------------- the table rows
@pytest.mark.parametrize("shape", [WIDE_GRID, (3, 5, 70), (2, 66, 4), (31, 30, 73)])
def test_rows_are_upstreams_flat_index(model, shape):
    table = upstream_table(model.config.llm.hidden_size)
    got = np.array(model.latent_pos.rows(shape))
    np.testing.assert_array_equal(got, upstream_rows(table, shape))


def test_a_column_past_64_reads_the_next_rows_entry(model):
    t, h, w = WIDE_GRID
    rows = np.array(model.latent_pos.rows(WIDE_GRID)).reshape(h, w, -1)
    inside = np.array(model.latent_pos.rows((1, h + 1, 64))).reshape(h + 1, 64, -1)
    np.testing.assert_array_equal(rows[3, 64:73], inside[4, 0:9])  # columns 64..72 of row 3 = row 4's 0..8
    np.testing.assert_array_equal(rows[:, :64], inside[:h])


def test_the_last_table_entry_fits_one_past_is_refused(model):
    last = (31, 64, 64)  # index 31*4096 - 1, the table's last row
    np.testing.assert_array_equal(np.array(model.latent_pos.rows(last))[-1:],
                                  upstream_table(model.config.llm.hidden_size)[-1:])
    for shape in [(31, 64, 65), (1, 1985, 1), (32, 1, 1)]:
        with pytest.raises(InvalidRequestError, match="past the model's 3-D position table"):
            model.latent_pos.rows(shape)


# --------------------------------------------------------------------------------- 1168x496 through the model
def assert_close(got, ref, rtol=1e-5):  # batched vs sequential: float32 rounding only (tests/test_batched.py)
    got, ref = np.array(got), np.array(ref)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert np.abs(got - ref).max() / np.abs(ref).max() <= rtol


def test_21_9_t2i_batched_equals_sequential(model):
    """One guided step at 1168x496: the table rows are upstream's, the batched branches equal the sequential."""
    seq = Q.generation_sequence("t2i", PROMPT, WIDE_GRID)
    ctx = model.prepare_generation(seq)
    np.testing.assert_array_equal(np.array(ctx.pos_rows),
                                  upstream_rows(upstream_table(model.config.llm.hidden_size), WIDE_GRID))
    x = mx.random.normal((ctx.num_tokens, 48), key=mx.random.key(5))
    ref = model.velocity(ctx, x, 0.9, 4.0, batched=False)
    got = model.velocity(ctx, x, 0.9, 4.0)
    for name in ("v_cond", "v_uncond", "v"):
        assert_close(getattr(got, name), getattr(ref, name))


def test_wrapped_grid_denoise_loop_batched_equals_sequential(model):
    """Whole loops (guided and unguided steps) on a small grid whose columns 64..69 wrap."""
    shape = (1, 3, 70)
    seq = Q.generation_sequence("t2i", PROMPT, shape)
    params = SamplingParams(steps=4, cfg_text=4.0, cfg_interval=(0.8, 1.0),
                            noise=mx.random.normal((210, 48), key=mx.random.key(6)))
    ref = list(model.denoise(seq, params, batched=False))
    assert min(s.t for s in ref) <= 0.8 < max(s.t for s in ref)
    assert_close(list(model.denoise(seq, params))[-1].latents, ref[-1].latents)


def test_21_9_t2i_through_the_pipeline(tiny_pipe):
    req = TextToImage("a coastline at dawn", *WIDE, sampling=SamplingParams(steps=1, seed=3))
    assert req.latent_shape == WIDE_GRID
    assert tiny_pipe.run(req).size == WIDE


# ------------------------------------------------------------------------------------------- size checks
@pytest.mark.parametrize("aspect", OUTPUT_ASPECT_RATIOS)
@pytest.mark.parametrize("resolution", [480, 640, 768, 1024])
def test_every_preset_size_is_accepted(aspect, resolution):
    w, h = output_size(aspect, resolution)
    assert TextToImage("x", w, h).latent_shape == (1, h // 16, w // 16)
    if resolution <= 768:  # at 121 frames the last frame leaves 4096 entries: 64 rows of 64 (1024²'s tall sizes: no)
        assert TextToVideo("x", 121, w, h).latent_shape == (31, h // 16, w // 16)


@pytest.mark.parametrize("args, frames, largest", [
    ((16, 31760), 1, "16x31744"),  # 1985 rows of one column: index 1984*64 is the table's end
    ((1040, 1024), 121, "1040x1008 or 1024x1024 or 117 frames"),  # 31 frames, 64 x 65: one past
])
def test_past_the_table_is_refused_naming_the_largest_size(args, frames, largest):
    with pytest.raises(InvalidRequestError, match="past the model's 3-D position table") as e:
        check_size(*args, frames)
    assert str(e.value).endswith("the largest that fit: " + largest) and "\n" not in str(e.value)
    w, h = (int(v) for v in largest.split(" or ")[0].split("x"))
    assert check_size(w, h, frames) == (w, h)


def test_more_latents_than_the_context_is_refused():
    with pytest.raises(InvalidRequestError, match="more than the model's context of 128000 tokens"):
        TextToImage("x", 16384, 16384)


@pytest.mark.parametrize("argv, message", [
    (["--width", "16", "--height", "31760"], "the largest that fit: 16x31744"),
    (["--width", "1040", "--height", "1024", "--frames", "121"], "1040x1008 or 1024x1024 or 117 frames"),
])
def test_cli_refuses_before_loading(argv, message, tmp_path, no_model, capsys):
    out = tmp_path / ("o.mp4" if "--frames" in argv else "o.png")
    with pytest.raises(SystemExit) as e:
        cmd_generate.main(["--prompt", "x", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_aspect_21_9_generates(upstream_root, tmp_path):
    out = tmp_path / "wide.png"
    assert cmd_generate.main(["--model", str(upstream_root), "--dtype", "float32", "--prompt", "a wide bay",
                              "--aspect", "21:9", "--steps", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == WIDE


def test_server_21_9_at_768():
    parsed = schemas.image_generation(schemas.Fields({"prompt": "x", "aspect_ratio": "21:9", "resolution": 768}),
                                      ServerConfig())
    assert (parsed.request.width, parsed.request.height) == WIDE


class _Inputs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.found = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "input" and a.get("id") in ("width", "height"):
            self.found[a["id"]] = a


def test_page_size_fields_take_every_preset():
    """The page's width/height fields carry no `max` below a preset (the browser would block the form)."""
    page = _Inputs()
    page.feed((Path(schemas.__file__).parent / "static" / "index.html").read_text())
    assert set(page.found) == {"width", "height"}
    largest = max(max(output_size(a, r)) for a in OUTPUT_ASPECT_RATIOS for r in (480, 640, 768, 1024))
    for attrs in page.found.values():
        assert "max" not in attrs or int(attrs["max"]) >= largest, attrs

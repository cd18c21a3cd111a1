"""Image/video writing (atomic, metadata) and video reading."""

import numpy as np
import pytest
from PIL import Image

from lance_mlx import media
from lance_mlx.video_input import read_video


def _frames(n=9, h=32, w=48):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_mp4_is_h264_and_reads_back_every_frame(tmp_path):
    out = media.save_video(iter(_frames()), tmp_path / "clip.mp4", fps=12)
    frames, fps = read_video(out)
    assert frames.shape == (9, 32, 48, 3) and fps == pytest.approx(12.0)
    import subprocess

    import imageio_ffmpeg

    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out)],
                           capture_output=True, text=True).stderr
    assert "h264" in probe
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_gif_and_png_frame_fallbacks(tmp_path):
    fr = _frames(5)
    frames, _ = read_video(media.save_video(fr, tmp_path / "clip.gif", fps=10))
    assert frames.shape == (5, 32, 48, 3)
    folder = media.save_video(fr, tmp_path / "clip_frames")
    pngs = sorted(folder.iterdir())
    assert len(pngs) == 5 and np.array_equal(np.asarray(Image.open(pngs[2])), fr[2])


def test_png_metadata_and_uint8_conversion(tmp_path):
    px = np.linspace(-1.2, 1.2, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    u8 = media.to_uint8(px)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    out = media.save_image(u8, tmp_path / "a.png", {"prompt": "a cat", "seed": 42})
    assert Image.open(out).text == {"prompt": "a cat", "seed": "42"}


def test_failed_write_leaves_nothing(tmp_path):
    def broken():
        yield _frames(1)[0]
        raise KeyboardInterrupt  # e.g. the user stops generation half-way

    with pytest.raises(KeyboardInterrupt):
        media.save_video(broken(), tmp_path / "clip.mp4")
    with pytest.raises(KeyboardInterrupt):
        media.save_video(broken(), tmp_path / "frames")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unsupported video format"):
        media.save_video(_frames(1), tmp_path / "x.avi")
    with pytest.raises(ValueError, match="cannot tell the image format"):
        media.save_image(_frames(1)[0], tmp_path / "x.unknown")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 10)
    with pytest.raises(ValueError, match="cannot decode video"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="not found"):
        read_video(tmp_path / "missing.mp4")

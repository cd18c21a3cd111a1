"""Input videos (lance_mlx/video_input.py): the frames the model sees are those of decoding everything and sampling,
bit for bit, while memory stays bounded by the sampled frames; sizes are refused from the header, before decoding."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from lance_mlx import media, video_input
from lance_mlx.errors import InputNotFoundError, InvalidRequestError
from lance_mlx.processing import preprocess_video, sample_frame_indices
from lance_mlx.tasks import Understand, VideoEdit, load_video_input
from lance_mlx.video_input import probe_video, read_video

ROOT = Path(__file__).resolve().parent.parent
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
GIB = 2**30


def decode_everything(path):
    """The reader as it was: every frame of the file decoded, then sampled by the caller."""
    if str(path).endswith(".gif"):
        from PIL import Image

        with Image.open(path) as im:
            fps = 1000.0 / max(im.info.get("duration", 83), 1)
            frames = []
            for i in range(im.n_frames):
                im.seek(i)
                frames.append(np.asarray(im.convert("RGB")))
        return np.stack(frames), fps
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader]), float(meta["fps"])


def tiny_gif(width, height, frames, delay_cs=10) -> bytes:
    """A GIF whose logical screen is width x height with `frames` 1x1 frames: a few hundred bytes on disk."""
    out = b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + bytes([0x80, 0, 0, 0, 0, 0, 255,
                                                                                         255, 255])
    for _ in range(frames):
        out += bytes([0x21, 0xF9, 4, 0]) + delay_cs.to_bytes(2, "little") + bytes([0, 0])  # 100 ms per frame
        out += b"\x2c" + bytes(4) + (1).to_bytes(2, "little") * 2 + b"\x00" + bytes([2, 2, 0x44, 0x01, 0])
    return out + b"\x3b"


def color_clip(path, size, seconds, rate=24):
    """An H.264 clip of a flat colour: one second encoded (ultrafast), then repeated by stream copy (fast)."""
    one = path.with_name(path.stem + "_1s.mp4")
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-f", "lavfi", "-i", f"color=c=blue:size={size}:rate={rate}",
                    "-t", "1", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(rate),
                    str(one)], check=True, timeout=120)
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", "-stream_loop", str(seconds - 1), "-i", str(one), "-c", "copy",
                    str(path)], check=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("video_input")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(100)]
    paths = {"sample": ROOT / "samples" / "chelsea_pan.mp4",
             "clip24": media.save_video(frames, d / "clip24.mp4", fps=24),
             "clip8": media.save_video(frames[:30], d / "clip8.mp4", fps=8),  # fewer frames than 12 fps asks: repeats
             "gif": media.save_video(frames[:20], d / "clip.gif", fps=10)}
    return d, paths


@pytest.mark.parametrize("name", ["sample", "clip24", "clip8", "gif"])
def test_sampled_frames_are_bit_identical_to_decoding_everything(clips, name):
    path = clips[1][name]
    everything, fps = decode_everything(path)
    frames, got_fps = read_video(path, frame_indices=sample_frame_indices)
    assert got_fps == fps
    assert np.array_equal(frames, everything[sample_frame_indices(len(everything), fps)])
    assert np.array_equal(read_video(path)[0], everything)
    assert np.array_equal(read_video(path, max_frames=3)[0], everything[:3])
    assert np.array_equal(read_video(path, frame_indices=[4, 1, 1, 7])[0], everything[[4, 1, 1, 7]])
    # what the model sees: the preprocessed pixels and patches of a path and of the decoded frames agree
    ours, before = preprocess_video(path, "video_192p"), preprocess_video(everything, "video_192p", fps=fps)
    assert np.array_equal(ours.vae_pixels, before.vae_pixels) and np.array_equal(ours.vit_patches, before.vit_patches)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (everything.shape[2], everything.shape[1], len(everything))
    assert info.fps == fps


def test_requests_keep_only_the_sampled_frames(clips):
    path = clips[1]["clip24"]
    everything, fps = decode_everything(path)
    want = everything[sample_frame_indices(len(everything), fps)]
    frames, given_fps = load_video_input(path, None)
    assert given_fps is None and np.array_equal(frames, want)  # 100 frames @ 24 fps -> 49 kept
    edit = VideoEdit(path, "make it pink")
    assert edit.input_fps is None and np.array_equal(edit.video, want)
    ask = Understand(path, video=True)
    assert np.array_equal(ask.media, want)
    slow, _ = load_video_input(path, 12.0)  # --input-fps overrides the file's rate for the sampler
    assert np.array_equal(slow, everything[sample_frame_indices(len(everything), 12.0)])


def test_one_line_errors(clips, tmp_path):
    d, paths = clips
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 10)
    (tmp_path / "junk.gif").write_bytes(b"not a gif" * 10)
    cases = [(tmp_path / "empty.mp4", {}, "empty"), (tmp_path / "junk.mp4", {}, "cannot decode video"),
             (tmp_path / "junk.gif", {}, "not a GIF"), (paths["clip24"], {"max_pixels": 1000}, "64x48"),
             (paths["gif"], {"max_pixels": 1000}, "the limit is"),
             (paths["clip24"], {"frame_indices": [100]}, "outside the video's 100 frames")]
    for path, kw, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as e:
            read_video(path, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(InputNotFoundError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(InvalidRequestError, match="video too short"):
        load_video_input(media.save_video([np.zeros((16, 16, 3), np.uint8)], tmp_path / "one.mp4", fps=24), None)


def test_a_whole_read_is_refused_over_the_budget(clips, monkeypatch):
    monkeypatch.setattr(video_input, "MAX_DECODED_BYTES", 48 * 64 * 3 * 60)  # 60 frames of 64x48
    with pytest.raises(InvalidRequestError, match="keeping 100 frames of 64x48"):
        read_video(clips[1]["clip24"])
    assert len(read_video(clips[1]["clip24"], frame_indices=sample_frame_indices)[0]) == 49


# ------------------------------------------------------------------------------------ big inputs, bounded memory
# Peak resident memory of this process alone: Linux keeps ru_maxrss across exec (a child started by a large
# pytest process reports the parent's size), VmHWM belongs to the new address space; macOS has ru_maxrss in bytes.
PEAK_RSS = """
def peak_rss():
    import resource, sys
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
"""

CHILD = PEAK_RSS + """
import json, resource, sys, time
cap = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from lance_mlx import tasks, video_input
t0 = time.perf_counter()
try:
    if sys.argv[2] == "load":
        frames, _ = tasks.load_video_input(sys.argv[3], None)
    else:
        frames, _ = video_input.read_video(sys.argv[3], max_frames=int(sys.argv[2]))
    out = {"shape": list(frames.shape)}
except Exception as e:
    out = {"error": type(e).__name__, "message": str(e)}
out.update(seconds=time.perf_counter() - t0, maxrss=peak_rss())
print(json.dumps(out))
"""


def run_capped(cap_bytes, *args, timeout=300):
    """Read a video in a child process whose address space is capped; its result and peak resident memory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(int(cap_bytes)), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    d = tmp_path_factory.mktemp("big_inputs")
    (d / "huge.gif").write_bytes(tiny_gif(13000, 13000, 20))  # 169 MP a frame: ~10 GB decoded as before
    return {"huge.gif": d / "huge.gif", "4k_30s.mp4": color_clip(d / "4k_30s.mp4", "3840x2160", 30),
            "4k_10min.mp4": color_clip(d / "4k_10min.mp4", "3840x2160", 600)}


def test_a_30_second_4k_clip_keeps_only_its_69_sampled_frames(big):
    """720 frames of 3840x2160 were 17.9 GB decoded whole; the 69 sampled ones are 1.7 GB (under a 3 GiB cap)."""
    out = run_capped(3 * GIB, "load", big["4k_30s.mp4"])
    assert out.get("shape") == [69, 2160, 3840, 3], out
    assert out["maxrss"] < 2.3 * GIB, out


def test_a_10_minute_4k_clip_stops_decoding_after_the_frames_asked_for(big):
    """Decoding all 14400 frames takes minutes (about 2 min here); the first 3 take seconds, headers even less."""
    t0 = time.perf_counter()
    info = probe_video(big["4k_10min.mp4"])
    assert (info.width, info.height, info.num_frames, info.duration) == (3840, 2160, 14400, 600.0)
    assert time.perf_counter() - t0 < 20
    out = run_capped(2 * GIB, 3, big["4k_10min.mp4"])
    assert out.get("shape") == [3, 2160, 3840, 3], out
    assert out["seconds"] < 30 and out["maxrss"] < 0.6 * GIB, out


def test_a_13000_pixel_gif_is_refused_from_its_header(big):
    out = run_capped(1 * GIB, "load", big["huge.gif"])
    assert out["error"] == "InvalidRequestError" and "13000x13000" in out["message"], out
    assert "the limit is" in out["message"] and out["maxrss"] < 0.3 * GIB and out["seconds"] < 5, out
    from lance_mlx.processing import load_image

    with pytest.raises(ValueError, match=r"image is 169 MP; the limit is 64 MP"):
        load_image(big["huge.gif"])  # as an image: PIL's guard refuses it at open, before any pixel


def _caption(*args, timeout=600):
    """caption.py in a child, with its peak resident memory (that process alone) printed last."""
    code = PEAK_RSS + ("import runpy, sys\nsys.argv = ['caption.py'] + sys.argv[1:]\ntry:\n"
                       "    runpy.run_path('caption.py', run_name='__main__')\nfinally:\n"
                       "    print('maxrss', peak_rss(), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=timeout)
    lines = r.stderr.strip().splitlines()
    return r.returncode, "\n".join(lines[:-1]), int(lines[-1].split()[1])


def test_the_cli_refuses_a_huge_gif_in_one_line(big, tmp_path):
    code, err, maxrss = _caption("--video", big["huge.gif"], "--model", tmp_path / "no_model")
    assert code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "13000x13000" in err and "limit" in err and maxrss < 1 * GIB


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fixtures import write_golden_lance_folder, write_golden_vit_folder

    d = tmp_path_factory.mktemp("caption_model")
    write_golden_lance_folder(d / "Lance_3B")
    write_golden_vit_folder(d / "Qwen2.5-VL-ViT")
    return d / "Lance_3B"


def test_the_cli_describes_a_1080p_clip_within_the_bound(tmp_path, tiny_model):
    """30 s of 1920x1080 at 24 fps: 4.5 GB decoded whole before; with 69 sampled frames (0.43 GB) the whole
    caption run on a tiny model (at the small video_192p preset) stays under 2 GiB."""
    clip = color_clip(tmp_path / "1080p_30s.mp4", "1920x1080", 30)
    code, err, maxrss = _caption("--video", clip, "--model", tiny_model, "--dtype", "float32", "--max-tokens", "2",
                                 "--preset", "video_192p")
    assert code == 0, err
    assert maxrss < 2 * GIB, maxrss


def png_header(width, height) -> bytes:
    """A PNG whose header says width x height, with no pixel data: opening it reads the size only."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


@pytest.mark.parametrize("size,message", [((12000, 12000), "image is 144 MP; the limit is 64 MP"),
                                          ((9000, 9000), r"image is 9000x9000 \(81 MP\); the limit is 16384 px")])
def test_image_pixel_limit_from_the_header(tmp_path, size, message):
    """PIL's guard is set to our limit (it refuses above twice it in Image.open), our check covers the rest; both
    before any pixel is decoded, in one line naming the size and the limit."""
    from PIL import Image

    from lance_mlx import processing
    from lance_mlx.tasks import load_image_input

    assert Image.MAX_IMAGE_PIXELS == processing.MAX_IMAGE_PIXELS == 8192 * 8192
    path = tmp_path / "big.png"
    path.write_bytes(png_header(*size))
    with pytest.raises(InvalidRequestError, match=message) as e:
        load_image_input(path)
    assert "\n" not in str(e.value) and "downscale it first" in str(e.value)


def test_server_uploads_keep_only_the_sampled_frames(clips, tmp_path):
    from lance_mlx.server import inputs

    path = clips[1]["clip24"]
    everything, fps = decode_everything(path)
    upload = inputs.Media(path.read_bytes(), "video/mp4", "clip.mp4")
    frames, given_fps = inputs.video(upload, "video", tmp_path / "scratch")
    assert given_fps is None and np.array_equal(frames, everything[sample_frame_indices(len(everything), fps)])
    assert list((tmp_path / "scratch").iterdir()) == []  # the scratch copy is removed
    huge = inputs.Media(tiny_gif(13000, 13000, 2), "image/gif", "huge.gif")
    with pytest.raises(InvalidRequestError, match="13000x13000") as e:
        inputs.video(huge, "video", tmp_path / "scratch")
    assert e.value.param == "video"

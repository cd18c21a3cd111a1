"""Input preprocessing: buckets, crops, patch order, frame sampler, image loading and its error paths."""

import math

import numpy as np
import pytest
from PIL import Image

from lance_mlx import processing as P

# (H, W) after data/video/transforms/bucket_resize.py::BucketResize and divisible_crop.py (docs/vision.md),
# ratios 21:9, 16:9, 4:3, 1:1, 3:4, 9:16.
SPEC_TABLE = {
    (768, 16): [(496, 1152), (576, 1024), (672, 896), (768, 768), (896, 672), (1024, 576)],
    (672, 28): [(420, 1008), (504, 896), (560, 756), (672, 672), (756, 560), (896, 504)],
    (640, 16): [(416, 976), (480, 848), (560, 752), (640, 640), (752, 560), (848, 480)],
    (616, 28): [(392, 924), (448, 812), (504, 700), (588, 588), (700, 504), (812, 448)],
}
# The remaining presets' buckets (before cropping), as produced by upstream's BucketResize.init_buckets.
UPSTREAM_BUCKETS = {
    512: [(336, 784), (384, 688), (448, 592), (512, 512), (592, 448), (688, 384)],
    448: [(288, 672), (336, 592), (384, 512), (448, 448), (512, 384), (592, 336)],
    256: [(160, 368), (192, 336), (224, 304), (256, 256), (304, 224), (336, 192)],
    224: [(144, 336), (160, 288), (192, 256), (224, 224), (256, 192), (288, 160)],
    480: [(320, 752), (352, 624), (416, 560), (480, 480), (560, 416), (624, 352)],
    476: [(304, 704), (352, 624), (416, 560), (480, 480), (560, 416), (624, 352)],
}


def _rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ buckets


@pytest.mark.parametrize("res_crop", list(SPEC_TABLE))
def test_bucket_table_matches_spec(res_crop):
    res, crop = res_crop
    got = [(h - h % crop, w - w % crop) for h, w in P.bucket_table(res)]
    assert got == SPEC_TABLE[res_crop]


def test_bucket_tables_of_all_presets():
    for res, buckets in UPSTREAM_BUCKETS.items():
        assert list(P.bucket_table(res)) == buckets
    used = {r for p in P.PRESETS.values() for r in (p.vae_resolution, p.vit_resolution)}
    assert used == set(UPSTREAM_BUCKETS) | {768, 672, 640, 616}
    assert P.bucket_table(616)[3] == (608, 608)  # banker's rounding: 616 / 16 = 38.5 -> 38


def test_presets():
    assert {n: (p.vae_resolution, p.vit_resolution) for n, p in P.PRESETS.items()} == {
        "image_256res": (256, 224), "image_512res": (512, 448), "image_768res": (768, 672),
        "video_192p": (256, 224), "video_360p": (480, 476), "video_480p": (640, 616)}
    with pytest.raises(ValueError, match="image_768res"):
        P.get_preset("1080p")


def test_nearest_bucket():
    assert P.nearest_bucket(1920, 1080, 768) == (576, 1024)
    assert P.nearest_bucket(1000, 1000, 768) == (768, 768)
    assert P.nearest_bucket(1080, 1920, 640) == (848, 480)
    assert P.nearest_bucket(3000, 1000, 768) == (496, 1152)  # wider than 21:9 -> widest bucket


def _torchvision_rrc_params(width, height, ratio):
    """torchvision RandomResizedCrop.get_params(scale=(1, 1), ratio=(r, r)) with its float32 tensor math;
    returns (h, w, fallback?) — offsets are random only when an attempt succeeds."""
    import torch

    log_ratio = torch.log(torch.tensor((ratio, ratio)))
    area = height * width
    target_area = area * torch.empty(1).uniform_(1.0, 1.0).item()
    aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
        return h, w, False
    in_ratio = float(width) / float(height)
    if in_ratio < ratio:
        w, h = width, int(round(width / ratio))
    elif in_ratio > ratio:
        h, w = height, int(round(height * ratio))
    else:
        w, h = width, height
    return h, w, True


def test_crop_box_follows_torchvision_random_resized_crop():
    sizes = [(1920, 1080), (1921, 1080), (1000, 700), (700, 1000), (640, 480), (333, 999), (1024, 1024),
             (4000, 1000), (1280, 720), (1279, 721), (512, 513), (1366, 768)]
    for width, height in sizes:
        for res in (768, 672, 616, 224):
            bh, bw = P.nearest_bucket(width, height, res)
            left, top, right, bottom = P._crop_box(width, height, bw / bh)
            h, w, fallback = _torchvision_rrc_params(width, height, bw / bh)
            assert (bottom - top, right - left) == (h, w), (width, height, res)
            assert 0 <= top <= height - h and 0 <= left <= width - w
            if fallback:
                assert (top, left) == ((height - h) // 2, (width - w) // 2)


def test_divisible_crop_uses_round_half_even_offsets():
    v = np.arange(31 * 33).reshape(1, 31, 33, 1)
    out = P.divisible_crop(v, 28)  # H: 3 spare rows -> round(1.5) = 2; W: 5 spare cols -> round(2.5) = 2
    assert out.shape == (1, 28, 28, 1)
    assert out[0, 0, 0, 0] == v[0, 2, 2, 0]


# ------------------------------------------------------------------------------------------- patch order


def _upstream_patchify(video_cthw, p=14, tp=2, ms=2):
    """Upstream data_utils.patchify_video_with_merge, restated with torch for an independent check."""
    import torch

    v = torch.from_numpy(video_cthw).permute(1, 0, 2, 3)  # (T, C, H, W)
    T, C, H, W = v.shape
    gt, gh, gw = T // tp, H // p, W // p
    v = v.reshape(gt, tp, C, gh // ms, ms, p, gw // ms, ms, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return v.reshape(gt * gh * gw, C * tp * p * p).numpy()


def test_patch_order_matches_hf_qwen2vl_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = np.random.default_rng(0).standard_normal((56, 84, 3)).astype(np.float32)
    hf = Qwen2VLImageProcessorPil()(images=[img], do_resize=False, do_rescale=False, do_normalize=False,
                                    input_data_format="channels_last", return_tensors="np")
    ours, grid = P.patchify(np.stack([img, img]))  # images are duplicated to two frames
    assert grid == tuple(hf["image_grid_thw"][0]) == (1, 4, 6)
    np.testing.assert_array_equal(ours, hf["pixel_values"])


def test_patch_order_matches_upstream_for_video():
    video = np.random.default_rng(1).standard_normal((6, 56, 112, 3)).astype(np.float32)  # (T, H, W, C)
    ours, grid = P.patchify(video)
    assert grid == (3, 4, 8)
    np.testing.assert_array_equal(ours, _upstream_patchify(video.transpose(3, 0, 1, 2)))


# ------------------------------------------------------------------------------------------ full branches


def test_vit_branch_end_to_end_values():
    img = _rgb(1000, 700)
    patches, grid = P.prepare_vit_patches([img], 224, is_image=True)
    # Independent restatement: bucket 4:3 (192x256) of area 224^2; torchvision fallback crop keeps the full
    # height and round(700 * 4/3) = 933 columns from (1000 - 933) // 2; PIL bicubic; crop 28 from the centre.
    ref = np.asarray(img.crop((33, 0, 966, 700)).resize((256, 192), Image.Resampling.BICUBIC))[12:180, 2:254]
    ref = (ref.astype(np.float32) / np.float32(255) - np.float32(P.CLIP_MEAN)) / np.float32(P.CLIP_STD)
    video = np.stack([ref, ref]).transpose(3, 0, 1, 2)
    assert grid == (1, 12, 18) and patches.shape == (216, 1176) and patches.dtype == np.float32
    np.testing.assert_array_equal(patches, _upstream_patchify(video))


def test_vae_branch_shapes_and_range():
    out = P.preprocess_image(_rgb(1920, 1080), "image_768res")
    assert out.vae_pixels.shape == (1, 576, 1024, 3) and out.vae_pixels.dtype == np.float32
    assert out.vae_pixels.min() >= -1.0 and out.vae_pixels.max() <= 1.0
    assert out.grid_thw == (1, 36, 64) and out.vit_patches.shape == (36 * 64, 1176)
    only_vit = P.preprocess_image(_rgb(64, 64), "image_256res", vae=False)
    assert only_vit.vae_pixels is None and only_vit.grid_thw == (1, 16, 16)


def test_video_branch_pads_odd_frame_counts():
    frames = np.stack([np.asarray(_rgb(320, 180, seed=i)) for i in range(5)])
    out = P.preprocess_video(frames, "video_192p")
    assert out.vae_pixels.shape == (5, 192, 336, 3)
    assert out.grid_thw == (3, 10, 20)  # 16:9 ViT bucket 160x288 -> crop 140x280; 6 frames after padding
    last = out.vit_patches[-200:].reshape(200, 3, 2, 14 * 14)  # the third temporal patch: frame 4 twice
    np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])
    sampled = P.preprocess_video(np.repeat(frames, 20, axis=0), "video_192p", fps=24, vit=False)
    assert sampled.vae_pixels.shape[0] == 49  # 100 frames @ 24 fps = 4.17 s -> 50 -> 49


def test_video_from_file(tmp_path):
    import imageio_ffmpeg
    path = tmp_path / "clip.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (64, 48), fps=24, macro_block_size=1)
    writer.send(None)
    for i in range(30):
        writer.send(np.full((48, 64, 3), 8 * i, dtype=np.uint8).tobytes())
    writer.close()
    out = P.preprocess_video(path, "video_192p")
    assert out.vae_pixels.shape[0] == 13  # 1.25 s * 12 = 15 -> 13 (4k+1)
    assert out.grid_thw[0] == 7


# ------------------------------------------------------------------------------------------------ sampler


def test_frame_sampler_examples():
    idx = P.sample_frame_indices(93, 24)
    assert len(idx) == 45 and idx[:4] == [0, 2, 4, 6] and idx[-1] == 92
    assert idx == np.floor(np.linspace(0, 92, 45)).astype(int).tolist()
    assert len(P.sample_frame_indices(121, 24)) == 57
    assert len(P.sample_frame_indices(144, 24)) == 69  # exactly 6 s
    assert len(P.sample_frame_indices(24 * 60, 24)) == 69  # the cap; spread over the whole minute
    assert P.sample_frame_indices(24 * 60, 24)[-1] == 24 * 60 - 1
    assert P.sample_frame_indices(93, 23.976) == idx  # fps rounded to an int as upstream
    assert P.sample_frame_indices(2, 24) == [0]


def test_too_few_frames():
    with pytest.raises(ValueError, match="too short"):
        P.sample_frame_indices(1, 24)
    with pytest.raises(ValueError, match="no frames"):
        P.sample_frame_indices(0, 24)
    with pytest.raises(ValueError, match="no frames"):
        P.preprocess_video(np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="too short"):
        P.preprocess_video(np.zeros((1, 32, 32, 3), np.uint8), fps=30)


# ---------------------------------------------------------------------------------------- image loading


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 0
    rgba[0, 1, 3] = 128
    rgba[0, 2, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(P.load_image(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 2]) == (255, 0, 0)
    assert out[0, 1, 0] == 255 and abs(int(out[0, 1, 1]) - 127) <= 1  # 255 * (1 - 128/255)


def test_palette_transparency_and_other_modes(tmp_path):
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "p.png", transparency=1)
    assert tuple(np.asarray(P.load_image(tmp_path / "p.png"))[0, 0]) == (255, 255, 255)
    gray = P.load_image(Image.new("L", (3, 3), 77))
    assert gray.mode == "RGB" and tuple(np.asarray(gray)[0, 0]) == (77, 77, 77)
    # gray+alpha is composited on white exactly like the same picture in RGBA (upstream would drop its alpha)
    for alpha in (0, 128, 255):
        la = P.load_image(Image.new("LA", (3, 3), (77, alpha)))
        rgba = P.load_image(Image.new("RGBA", (3, 3), (77, 77, 77, alpha)))
        assert la.mode == "RGB" and np.array_equal(np.asarray(la), np.asarray(rgba))
    assert tuple(np.asarray(P.load_image(Image.new("LA", (3, 3), (77, 0))))[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(P.load_image(Image.new("LA", (3, 3), (77, 255))))[0, 0]) == (77, 77, 77)


def test_image_error_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        P.load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png.*empty"):
        P.load_image(tmp_path / "empty.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all" * 10)
    with pytest.raises(ValueError, match=r"junk\.jpg.*not a readable image"):
        P.load_image(tmp_path / "junk.jpg")
    _rgb(64, 64).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.png.*cannot decode"):
        P.load_image(tmp_path / "cut.png")
    Image.new("1", (20000, 8)).save(tmp_path / "strip.png")  # tiny file, huge side
    with pytest.raises(ValueError, match=r"strip\.png.*20000x8.*limit"):
        P.load_image(tmp_path / "strip.png")
    with pytest.raises(ValueError, match="limit"):
        P.check_image_size((9000, 8000))  # 72 MP
    P.check_image_size((8192, 8192))
    with pytest.raises(ValueError, match="zero"):
        P.load_image(Image.new("RGB", (0, 5)))

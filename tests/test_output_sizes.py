"""Output size presets: upstream's app sizes for its eight aspect ratios, in the CLI, the server and its page."""

import pytest

from lance_mlx import cmd_generate
from lance_mlx import processing as P
from lance_mlx.server import schemas
from lance_mlx.server.settings import ServerConfig

# bytedance/Lance common/gradio_utils/settings.py, written out: ASPECT_RATIO_CHOICES and (width, height) per ratio
# of IMAGE_ASPECT_RATIO_TO_SIZE, VIDEO_480P_ASPECT_RATIO_TO_SIZE and VIDEO_360P_ASPECT_RATIO_TO_SIZE.
UPSTREAM_CHOICES = ["21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16"]
UPSTREAM_IMAGE = {"21:9": (1168, 496), "16:9": (1024, 576), "3:2": (944, 624), "4:3": (880, 672),
                  "1:1": (768, 768), "3:4": (672, 880), "2:3": (624, 944), "9:16": (576, 1024)}
UPSTREAM_480P = {"21:9": (976, 416), "16:9": (848, 480), "3:2": (784, 528), "4:3": (736, 560),
                 "1:1": (640, 640), "3:4": (560, 736), "2:3": (528, 784), "9:16": (480, 848)}
UPSTREAM_360P = {"21:9": (672, 288), "16:9": (640, 352), "3:2": (528, 352), "4:3": (560, 416),
                 "1:1": (480, 480), "3:4": (416, 560), "2:3": (352, 528), "9:16": (352, 640)}
AREAS = {768: UPSTREAM_IMAGE, 640: UPSTREAM_480P, 480: UPSTREAM_360P}  # image_768res, video_480p, video_360p


def test_the_tables_are_upstreams():
    assert list(P.OUTPUT_ASPECT_RATIOS) == UPSTREAM_CHOICES
    assert P.OUTPUT_SIZES == AREAS
    for resolution, table in AREAS.items():
        for aspect, size in table.items():
            assert P.output_size(aspect, resolution) == size
    assert P.ASPECT_RATIOS == ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")  # the input buckets stay upstream's six


def test_other_areas_take_the_bucket_rule_for_all_eight():
    for resolution in (64, 256, 512, 1024):
        buckets = dict(zip(P.OUTPUT_ASPECT_RATIOS, P.bucket_table(resolution, aspect_ratios=P.OUTPUT_ASPECT_RATIOS)))
        for aspect in P.OUTPUT_ASPECT_RATIOS:
            w, h = P.output_size(aspect, resolution)
            assert (h, w) == buckets[aspect] and w % 16 == h % 16 == 0
            if aspect in P.ASPECT_RATIOS:  # the six shared ratios: the input buckets' sizes
                assert (h, w) == dict(zip(P.ASPECT_RATIOS, P.bucket_table(resolution)))[aspect]
    assert P.output_size("3:2", 512) == (624, 416) and P.output_size("2:3", 512) == (416, 624)


@pytest.mark.parametrize("argv, size", [
    (["--aspect", "3:2"], (944, 624)),  # an image: image_768res
    (["--aspect", "2:3", "--resolution", "480"], (352, 528)),
    (["--aspect", "4:3"], (880, 672)),
    (["--aspect", "3:2", "--frames", "9"], (784, 528)),  # a video: video_480p
    (["--aspect", "9:16", "--frames", "9", "--resolution", "480"], (352, 640)),
    ([], (768, 768)),
    (["--frames", "9"], (848, 480)),
])
def test_cli_aspect_presets(argv, size):
    req = cmd_generate.build_request(cmd_generate.parse_args(["--prompt", "x", "--out", "o.png", *argv]))
    assert (req.width, req.height) == size


@pytest.mark.parametrize("values, kind, size", [
    ({"aspect_ratio": "3:2"}, "image", (944, 624)),
    ({"aspect_ratio": "2:3", "resolution": 480}, "image", (352, 528)),
    ({"aspect_ratio": "3:2"}, "video", (784, 528)),
    ({"aspect_ratio": "4:3", "resolution": 640}, "image", (736, 560)),
])
def test_server_aspect_presets(values, kind, size):
    assert schemas.size(schemas.Fields(values), ServerConfig(), kind) == size


def test_the_app_21_9_image_size_is_accepted():
    """1168x496 is 73 latents wide: upstream's flat table index wraps columns 64..72 (tests/test_wide_sizes.py)."""
    req = cmd_generate.build_request(cmd_generate.parse_args(["--prompt", "x", "--out", "o.png", "--aspect", "21:9"]))
    assert (req.width, req.height) == (1168, 496)

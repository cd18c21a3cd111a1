"""Request validation: one case per rule, each raising before any weights load; checkpoint/task agreement."""

import math

import numpy as np
import pytest
from PIL import Image

from lance_mlx import LancePipeline, loading
from lance_mlx.config import SamplingParams
from lance_mlx.errors import InputNotFoundError, InvalidRequestError, InvalidTypeError, LanceError, WeightsError
from lance_mlx.tasks import (
    MAX_PROMPT_TOKENS,
    ImageEdit,
    ImageToVideo,
    Posterior,
    TextToImage,
    TextToVideo,
    Understand,
    VideoEdit,
)

IMG = (np.arange(32 * 48 * 3) % 255).astype(np.uint8).reshape(32, 48, 3)


@pytest.mark.parametrize("settings,message", [
    (dict(steps=0), "steps 0 is out of range"),
    (dict(steps=1001), "steps 1001 is out of range"),
    (dict(steps=2.5), "whole number"),
    (dict(steps="2"), "must be an integer"),
    (dict(steps=True), "must be an integer"),
    (dict(cfg_text=float("nan")), "finite"),
    (dict(cfg_text=math.inf), "finite"),
    (dict(cfg_text=-4), "out of range"),
    (dict(cfg_image=51), "out of range"),
    (dict(shift=0), r"use a value in \(0, 100\]"),
    (dict(shift=-1), "out of range"),
    (dict(cfg_interval=(1.0, 0.4)), "is empty"),
    (dict(cfg_interval=(0.4, 2.0)), "out of range"),
    (dict(cfg_interval=0.4), "two numbers"),
    (dict(renorm_min=1.5), "out of range"),
    (dict(seed=-1), r"\[0, 2\*\*63\)"),
    (dict(seed=2**70), r"\[0, 2\*\*63\)"),
    (dict(seed=None), "must be an integer"),
    (dict(seed=1.5), "whole number"),
    (dict(sampler="heun"), "unknown sampler"),
])
def test_sampling_rules(settings, message):
    with pytest.raises(LanceError, match=message) as e:
        SamplingParams(**settings)
    assert isinstance(e.value, (ValueError, TypeError))


def test_sampling_defaults_are_upstreams():
    s = SamplingParams()
    assert (s.steps, s.shift, s.cfg_text, s.cfg_image, s.cfg_interval, s.renorm_min, s.seed, s.sampler) == \
        (30, 3.5, 4.0, 1.0, (0.4, 1.0), 0.0, 42, "euler")
    with pytest.raises(InvalidTypeError, match="unknown sampling setting"):
        s.replace(num_steps=3)


@pytest.mark.parametrize("make,message,kind", [
    (lambda: TextToImage(""), "prompt is empty", InvalidRequestError),
    (lambda: TextToImage("   "), "prompt is empty", InvalidRequestError),
    (lambda: TextToImage(42), "must be text", InvalidTypeError),
    (lambda: TextToImage("a\udcffb"), "not valid text", InvalidRequestError),
    (lambda: TextToImage("x" * 100_000), "characters long", InvalidRequestError),
    (lambda: TextToImage("a cat", 30, 32), "use e.g. 16 or 32", InvalidRequestError),
    (lambda: TextToImage("a cat", 32, 0), "not a positive multiple", InvalidRequestError),
    (lambda: TextToImage("a cat", -5, 32), "not a positive multiple", InvalidRequestError),
    (lambda: TextToImage("a cat", 16, 31760), "largest that fit: 16x31744", InvalidRequestError),
    (lambda: TextToVideo("a boat", 121, 1040, 1024), "largest that fit: 1040x1008", InvalidRequestError),
    (lambda: TextToImage("a cat", True, 32), "whole number of pixels", InvalidTypeError),
    (lambda: TextToImage("a cat", 32.0, 32), "whole number of pixels", InvalidTypeError),
    (lambda: TextToImage("a cat", sampling=SamplingParams(cfg_image=2.0)), "edits only", InvalidRequestError),
    (lambda: TextToImage("a cat", sampling={"steps": 2}), "SamplingParams", InvalidTypeError),
    (lambda: TextToVideo("a boat", 10), "use 9 or 13", InvalidRequestError),
    (lambda: TextToVideo("a boat", 125), "at most 121 frames", InvalidRequestError),
    (lambda: TextToVideo("a boat", 0), "positive integer 4k\\+1", InvalidRequestError),
    (lambda: TextToVideo("a boat", 9, fps=0), "fps 0.0 is out of range", InvalidRequestError),
    (lambda: TextToVideo("a boat", 9, fps=-12), "out of range", InvalidRequestError),
    (lambda: TextToVideo("a boat", 9, fps=1e9), "out of range", InvalidRequestError),
    (lambda: ImageToVideo("a boat", IMG, 1), "at least 5 frames", InvalidRequestError),
    (lambda: ImageToVideo("a boat", IMG, 5, resolution=-5), "resolution -5 is out of range", InvalidRequestError),
    (lambda: ImageToVideo("a boat", None, 5), "no image given", InvalidTypeError),
    (lambda: ImageToVideo("a boat", "/no/such/image.png", 5), "not found", InputNotFoundError),
    (lambda: ImageEdit(IMG, None), "instruction is empty", InvalidRequestError),
    (lambda: ImageEdit(None, "make it pink"), "no image given", InvalidTypeError),
    (lambda: ImageEdit(IMG.astype(np.float32), "make it pink"), "uint8", InvalidRequestError),
    (lambda: ImageEdit(3.5, "make it pink"), "must be a file path", InvalidTypeError),
    (lambda: ImageEdit(IMG, "make it pink", preset="image_9000res"), "unknown resolution preset",
     InvalidRequestError),
    (lambda: ImageEdit(IMG, "make it pink", posterior=Posterior(seed=-3)), "posterior seed", InvalidRequestError),
    (lambda: VideoEdit(np.stack([IMG] * 10), "make it pink"), "source frame count 10", InvalidRequestError),
    (lambda: VideoEdit(np.stack([IMG]), "make it pink", input_fps=24), "video too short", InvalidRequestError),
    (lambda: VideoEdit(np.stack([IMG] * 5), "make it pink", input_fps=0), "input fps", InvalidRequestError),
    (lambda: Understand(IMG, ""), "question is empty", InvalidRequestError),
    (lambda: Understand(IMG, max_tokens=0), "max_tokens must be a positive", InvalidRequestError),
    (lambda: Understand(IMG, temperature=-1), "temperature", InvalidRequestError),
    (lambda: Understand(IMG, top_p=0.0), "top-p", InvalidRequestError),
    (lambda: Understand(IMG, seed=-1), "seed", InvalidRequestError),
    (lambda: Understand(np.zeros((2, 2))), "an image array is", InvalidRequestError),
])
def test_request_rules(make, message, kind):
    with pytest.raises(kind, match=message):
        make()


def test_image_inputs_are_decoded_and_normalized(tmp_path):
    # 16-bit grayscale is scaled to 8 bits, not clipped
    g16 = Image.fromarray((np.linspace(0, 65535, 32 * 48).reshape(32, 48)).astype(np.uint16))
    g16.save(tmp_path / "g16.png")
    rgb = np.asarray(ImageEdit(tmp_path / "g16.png", "make it pink").image)
    assert rgb.shape == (32, 48, 3) and 100 < rgb.mean() < 155
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InvalidRequestError, match="not a readable image"):
        ImageEdit(bad, "make it pink")


def test_prompt_token_limit(tiny_pipe):
    req = TextToImage(" cat" * (MAX_PROMPT_TOKENS + 1), 32, 32)
    with pytest.raises(InvalidRequestError, match=f"the limit is {MAX_PROMPT_TOKENS} tokens"):
        tiny_pipe.check(req)
    tiny_pipe.check(TextToImage(" cat" * 100, 32, 32))


def test_checkpoint_must_fit_the_task(tiny_pipe, converted, monkeypatch):
    image_pipe = LancePipeline(tiny_pipe.model, tiny_pipe.tokenizer, tiny_pipe.vit, tiny_pipe.vae, checkpoint="image")
    with pytest.raises(WeightsError, match="needs the video checkpoint \\(Lance_3B_Video\\)"):
        image_pipe.latents(TextToVideo("a boat", 5, 32, 32))

    def no_load(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(loading, "load_components", no_load)
    with pytest.raises(WeightsError, match="Lance_3B_Video"):
        LancePipeline.from_pretrained(converted["image"], task="t2v")
    with pytest.raises(WeightsError, match="needs the image checkpoint"):
        LancePipeline.from_pretrained(converted["video"], request=TextToImage("a cat", 32, 32))
    with pytest.raises(InvalidRequestError, match="tokens long"):
        LancePipeline.from_pretrained(converted["image"], request=TextToImage(" cat" * (MAX_PROMPT_TOKENS + 1)))

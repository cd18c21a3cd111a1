"""Prompt enhancement: by an OpenAI-compatible endpoint (a local stub) and by the tiny checkpoint's understanding
expert (random text, real path); failures are one line, or a warning and the original prompt with fallback."""

import base64
import io

import numpy as np
import pytest
from openai_stub import ChatStub, closed_url
from PIL import Image

from lance_mlx import enhance as E
from lance_mlx import tasks as T
from lance_mlx.config import SamplingParams
from lance_mlx.errors import InvalidRequestError
from tiny_checkpoints import tiny_pipeline

REVISED = "A close-up shows a red fox curled in fresh snow, soft morning light on its fur."


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture
def stub():
    with ChatStub(REVISED) as s:
        yield s


def frame():
    return (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ endpoint
def test_endpoint_rewrite_flows_into_the_request(stub, monkeypatch):
    monkeypatch.setenv(E.ENV_API_KEY, "sk-test")
    enhancer = E.Enhancer.from_env(endpoint=stub.url, model="stub-model")
    req, revised = enhancer.apply(T.TextToVideo("a fox", 5, 48, 32, negative_prompt="blurry"))
    assert revised == REVISED and req.prompt == REVISED and req.negative_prompt == "blurry"
    sent = stub.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    body = sent["body"]
    assert body["model"] == "stub-model" and body["temperature"] == E.TEMPERATURE
    assert body["max_tokens"] == E.ENDPOINT_MAX_TOKENS
    assert "a fox" in stub.last_text and "camera" in stub.last_text  # the t2v rule and the user's prompt


def test_endpoint_sees_the_first_frame_for_i2v(stub):
    req = T.ImageToVideo("the fox runs", frame(), 5, 64)
    out, _ = E.Enhancer(endpoint=stub.url, model="m").apply(req)
    assert out.prompt == REVISED and np.array_equal(np.asarray(out.image), frame())
    parts = stub.requests[-1]["body"]["messages"][0]["content"]
    url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
    png = base64.b64decode(url.split(",", 1)[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), frame())


def test_environment_variables_as_upstream(stub, monkeypatch):
    monkeypatch.setenv(E.ENV_BASE_URL, stub.url)
    monkeypatch.setenv(E.ENV_MODEL, "env-model")
    enhancer = E.Enhancer.from_env()
    assert enhancer.endpoint == stub.url and enhancer.model == "env-model" and not enhancer.needs_model
    monkeypatch.delenv(E.ENV_BASE_URL)
    assert E.Enhancer.from_env().needs_model  # no endpoint: the checkpoint rewrites


def test_endpoint_down_is_one_clear_error():
    req = T.TextToImage("a fox", 32, 32)
    with pytest.raises(E.EnhanceError, match="cannot reach http://127.0.0.1") as e:
        E.Enhancer(endpoint=closed_url(), model="m").apply(req)
    assert e.value.exit_code == 1 and "\n" not in str(e.value) and "fallback" in str(e.value)


def test_fallback_keeps_the_original_prompt_with_a_warning():
    req = T.TextToImage("a fox", 32, 32)
    warnings = []
    out, revised = E.Enhancer(fallback=True, endpoint=closed_url(), model="m").apply(req, warn=warnings.append)
    assert out is req and revised is None
    assert len(warnings) == 1 and warnings[0].startswith("warning: prompt enhancement failed")


def test_empty_answer_is_an_error():
    with ChatStub("  ") as s, pytest.raises(E.EnhanceError, match="empty prompt"):
        E.Enhancer(endpoint=s.url, model="m").apply(T.TextToImage("a fox", 32, 32))


@pytest.mark.parametrize("kwargs,err", [({"endpoint": "ftp://x", "model": "m"}, "http:// or https://"),
                                        ({"endpoint": "http://127.0.0.1:1/v1"}, "needs a model name")])
def test_bad_endpoint_settings(kwargs, err):
    with pytest.raises(InvalidRequestError, match=err):
        E.Enhancer(**kwargs)


def test_edits_are_not_enhanced():
    with pytest.raises(InvalidRequestError, match="applies to t2i, t2v, i2v"):
        E.Enhancer(endpoint="http://127.0.0.1:1/v1", model="m").apply(T.ImageEdit(frame(), "make it pink"))


def test_runs_that_cannot_enhance_are_refused():
    endpoint, checkpoint = E.Enhancer(endpoint="http://127.0.0.1:1/v1", model="m"), E.Enhancer()
    with pytest.raises(InvalidRequestError, match="one process"):
        E.check_run(endpoint, "t2v", shared_over_ranks=True, batch_item=False)
    with pytest.raises(InvalidRequestError, match="--prompts-file use --enhance-endpoint"):
        E.check_run(checkpoint, "t2i", shared_over_ranks=False, batch_item=True)
    E.check_run(endpoint, "t2i", shared_over_ranks=False, batch_item=True)  # each batch item is its own output
    E.check_run(checkpoint, "i2v", shared_over_ranks=False, batch_item=False)


def test_instructions_are_ours_per_task():
    for task in E.TASKS:
        text = E.rewrite_instruction(task, "  a fox  ")
        assert text.endswith("Prompt:\na fox\n\nCaption:") and all(ex in text for ex in E.EXAMPLES[task])
    assert "no camera movement" in E.rewrite_instruction("t2i", "x")
    assert "attached image" in E.rewrite_instruction("i2v", "x")


# ---------------------------------------------------------------------------------------------- checkpoint
def test_checkpoint_rewrite_is_greedy_text_of_its_own_expert(pipe):
    text = E.rewrite_with_checkpoint(pipe, "t2i", "a red fox", max_tokens=8)
    assert text and text == E.rewrite_with_checkpoint(pipe, "t2i", "a red fox", max_tokens=8)  # greedy: repeats
    # the prompt it decoded from: the system prompt and our instruction as one chat turn, positions 0..L-1
    p = E.text_prompt(pipe.tokenizer, E.rewrite_instruction("t2i", "a red fox"))
    assert pipe.tokenizer.decode(p.input_ids[:3].tolist()) == "<|im_start|>system\n"
    assert p.last_position == len(p) - 1


def test_checkpoint_rewrite_of_i2v_sees_the_image(pipe):
    a = E.rewrite_with_checkpoint(pipe, "i2v", "the fox runs", Image.fromarray(frame()), max_tokens=6)
    b = E.rewrite_with_checkpoint(pipe, "i2v", "the fox runs", Image.fromarray(255 - frame()), max_tokens=6)
    assert a and b and a != b  # another first frame, another rewrite (the ViT block is in the prompt)


def test_checkpoint_rewrite_flows_into_generation(pipe, monkeypatch):
    calls = []
    orig = E.rewrite_with_checkpoint

    def short(pipeline, task, prompt, image=None, max_tokens=6):
        calls.append(task)
        return orig(pipeline, task, prompt, image, max_tokens=6)

    monkeypatch.setattr(E, "rewrite_with_checkpoint", short)
    req = T.TextToImage("a red fox", 32, 32, SamplingParams(steps=1))
    out, revised = E.Enhancer().apply(req, pipe)
    assert calls == ["t2i"] and out.prompt == revised != req.prompt
    assert pipe.latents(out).shape == (1, 1, 2, 2, 48)

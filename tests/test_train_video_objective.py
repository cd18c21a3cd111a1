"""The video training objective (t2v, first-frame-to-video, video edit, video understanding) against upstream's
Lance.forward + compute_training_loss (tests/golden/README.md), and the video layouts the training data builds."""

import random

import numpy as np
import pytest
from test_train_objective import assert_loss_matches, example

from fixtures import GOLDEN

CASES = {"t2v": ["t2v"], "ff2v": ["ff2v"], "video_edit": ["video_edit"], "v2t": ["v2t"],
         "packed_video": ["t2v", "ff2v", "video_edit", "v2t"]}


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "golden_train_loss_video.npz")


@pytest.fixture(scope="module")
def model():
    from tiny_checkpoints import tiny_lance

    return tiny_lance()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_upstream(golden, model, case):
    assert_loss_matches(golden, model, CASES[case], case)


def test_first_frame_is_clean_and_out_of_the_loss(golden, model):
    """ff2v: the first latent frame enters at t = 0 (x_t = x0) and only the later frames carry MSE; without
    clean_frames the same sample gives another loss (the golden case tells them apart)."""
    from lance_mlx.train import objective as O

    ex, z, noise = example(golden, "ff2v")
    draws = O.fixed_draws([ex], [z], [noise])
    packed = O.pack(model, [ex], draws)
    t, h, w = ex.seq.splits[ex.seq.noise_index].grid
    assert len(packed.mse_index) == (t - 1) * h * w
    start = int(np.cumsum([0] + ex.seq.split_lens)[ex.seq.noise_index]) + 1
    assert packed.mse_index[0] == start + h * w
    ex.clean_frames = 0
    plain = O.losses(model, O.pack(model, [ex], draws), vocab_limit=151665)
    assert float(plain.loss.item()) != pytest.approx(float(golden["ff2v/expected"][0]), rel=1e-3)


def test_layouts_are_our_video_task_layouts(golden, tok):
    """The stored layouts are the ones the video training data builds (template, prompt split, blocks)."""
    import mlx.core as mx

    from lance_mlx.train.data import understanding_prompts
    from lance_mlx.train.video_examples import VideoFeatures, build_example

    ids = (lambda s: np.asarray(tok(s, add_special_tokens=False)["input_ids"]))
    zero = (lambda n: mx.zeros((n, 48)))
    t2v = VideoFeatures(ids("a paper boat drifting down a stream"), zero(12), zero(12) - 30, (2, 2, 3))
    ff2v = VideoFeatures(ids("a dog runs across a beach at sunset"), zero(12), zero(12) - 30, (3, 2, 2))
    edit = VideoFeatures(ids("turn the car red"), zero(12), zero(12) - 30, (2, 2, 3), zero(12), zero(12) - 30,
                         mx.zeros((4, 64)), (2, 1, 2))
    v2t = VideoFeatures(ids("The man opens the door and walks out."), vit=mx.zeros((4, 64)), vit_grid=(2, 1, 2),
                        question_ids=ids("What does the man do?"))
    prompts = understanding_prompts(tok, "video")
    key = mx.random.key(0)
    built = {"t2v": build_example(t2v, "t2v", random.Random(0), key, 0.0, 0.0, ff2v_rate=0.0),
             "ff2v": build_example(ff2v, "i2v", random.Random(0), key, 0.0, 0.0),
             "video_edit": build_example(edit, "video-edit", random.Random(0), key, 0.0, 0.0),
             "v2t": build_example(v2t, "v2t", random.Random(0), key, prompts=prompts)}
    for name, ex in built.items():
        assert ex.seq.input_ids.tolist() == golden[f"{name}/input_ids"].tolist(), name
        assert ex.seq.split_lens == golden[f"{name}/split_lens"].tolist(), name
        assert ex.seq.attn_modes == [str(m) for m in golden[f"{name}/attn_modes"]], name
        assert ex.seq.modality.tolist() == golden[f"{name}/modality"].tolist(), name
        assert ex.clean_frames == int(golden[f"{name}/clean_frames"]), name
    assert built["v2t"].ce_index.tolist() == golden["v2t/ce_index"].tolist()
    assert built["v2t"].labels.tolist() == golden["v2t/labels"].tolist()

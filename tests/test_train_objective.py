"""The training objective against upstream's Lance.forward + compute_training_loss (tests/golden/README.md)."""

import numpy as np
import pytest

from fixtures import GOLDEN

CASES = {"t2i": ["t2i"], "edit": ["edit"], "i2t": ["i2t"], "packed": ["t2i", "edit", "i2t"]}


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "golden_train_loss.npz")


@pytest.fixture(scope="module")
def model():
    from tiny_checkpoints import tiny_lance

    return tiny_lance()


def example(z, name):
    """The stored sample as an Example (splits rebuilt from the stored layout) and its stored draws."""
    from lance_mlx.sequence import Sequence, Split, latent_split, vit_split
    from lance_mlx.train.objective import Example

    ids, lens, modes = z[f"{name}/input_ids"], z[f"{name}/split_lens"], [str(m) for m in z[f"{name}/attn_modes"]]
    mod, grids = z[f"{name}/modality"], z[f"{name}/grids"]
    splits, o = [], 0
    for n, mode, g in zip(lens, modes, grids):
        g = tuple(int(v) for v in g)
        if mode == "noise":
            s = latent_split(g, "target", z[f"{name}/latent_target"])
        elif mode == "full_noise":
            s = latent_split(g, "cond", z[f"{name}/latent_cond"])
        elif mode == "full":
            s = vit_split(g, z[f"{name}/vit"])
        else:
            s = Split(ids=ids[o:o + n], attn=mode, modality=mod[o:o + n])
        assert list(s.ids) == list(ids[o:o + n]) and list(s.modality) == list(mod[o:o + n])
        splits.append(s)
        o += n
    clean = z.get(f"{name}/clean_frames")  # stored by the video cases (first-frame-to-video)
    ex = Example(Sequence(splits), ce_index=z.get(f"{name}/ce_index"), labels=z.get(f"{name}/labels"),
                 clean_frames=0 if clean is None else int(clean))
    return ex, [float(v) for v in z[f"{name}/z"]], [z[f"{name}/noise"]] if len(z[f"{name}/z"]) else []


def assert_loss_matches(golden, model, parts_of_case, case):
    """Our loss of the stored samples of `case` (packed together) equals upstream's stored [loss, mse, ce]."""
    from lance_mlx.train import objective as O

    parts = [example(golden, p) for p in parts_of_case]
    exs = [p[0] for p in parts]
    draws = O.fixed_draws(exs, [p[1] for p in parts], [p[2] for p in parts])
    r = O.losses(model, O.pack(model, exs, draws), vocab_limit=151665)
    loss, mse, ce = golden[f"{case}/expected"]
    assert float(r.loss.item()) == pytest.approx(loss, rel=1e-5)
    assert float(r.mse.item() if r.mse is not None else 0.0) == pytest.approx(mse, rel=1e-5)
    assert float(r.ce.item() if r.ce is not None else 0.0) == pytest.approx(ce, rel=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_upstream(golden, model, case):
    assert_loss_matches(golden, model, CASES[case], case)


def test_layouts_are_our_task_layouts(golden):
    """The stored layouts are the ones the training data builds (template, prompt split, blocks)."""
    from transformers import AutoTokenizer

    from lance_mlx.sequence import edit_sequence, generation_sequence

    tok = AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))
    ids = (lambda s: tok(s, add_special_tokens=False)["input_ids"])
    t2i = generation_sequence("t2i", ids("a watercolor fox in the snow"), (1, 3, 4))
    edit = edit_sequence(ids("make the sky purple"), (1, 2, 3), (1, 3, 4))
    for name, seq in (("t2i", t2i), ("edit", edit)):
        assert seq.input_ids.tolist() == golden[f"{name}/input_ids"].tolist()
        assert seq.split_lens == golden[f"{name}/split_lens"].tolist()


def test_timestep_shift_and_noising():
    """t = sigmoid(z), shifted by 4 as upstream's scripts; x_t = t noise + (1 - t) x0 (checked in float64)."""
    import mlx.core as mx

    from lance_mlx.train.objective import shifted_timestep

    for z in (-3.0, -0.5, 0.0, 0.7, 2.5):
        t = 1 / (1 + np.exp(-z))
        assert float(shifted_timestep(z).item()) == pytest.approx(4 * t / (1 + 3 * t), rel=1e-6)
    assert float(shifted_timestep(mx.array(-np.inf)).item()) == 0.0


def test_checkpointing_gives_the_same_gradients(golden, model):
    """mx.checkpoint per decoder layer recomputes activations: same loss and LoRA gradients as without."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lance_mlx import lora as L
    from lance_mlx.train import objective as O
    from tiny_checkpoints import tiny_lance

    m = tiny_lance()
    m.freeze()
    factors = L.add_adapter(m, L.match_targets(m, L.GEN_EXPERT_TARGETS), 4, 4.0, seed=1)
    for a in factors:
        a.lora_b = mx.ones(a.lora_b.shape) * 0.01
    ex, z, noise = example(golden, "edit")
    draws = O.fixed_draws([ex], [z], [noise])
    out = []
    for ck in (False, True):
        loss, g = nn.value_and_grad(m, lambda mm: O.losses(mm, O.pack(mm, [ex], draws), checkpoint=ck).loss)(m)
        out.append((float(loss.item()), dict(tree_flatten(g))))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert out[0][1].keys() == out[1][1].keys() and len(out[0][1]) == 2 * len(factors)
    for k, v in out[0][1].items():
        np.testing.assert_allclose(np.array(out[1][1][k]), np.array(v), rtol=1e-5, atol=1e-7)

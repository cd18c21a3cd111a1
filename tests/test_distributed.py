"""Generation over 2 and 4 ranks (`mlx.launch --backend ring` on 127.0.0.1) equals the single-process result."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dist_rank import SCENARIOS, SOURCE, tiny_pipe
from PIL import Image

from lance_mlx import distributed as D
from lance_mlx.config import SamplingParams
from lance_mlx.distributed_seq import latent_bounds, shard_bounds
from lance_mlx.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent
# `lance-mlx-launch`: mlx.launch with an exit status that reports a failed rank
LAUNCHER = [sys.executable, "-m", "lance_mlx.launch"]
# each rank one thread, so several ranks share this machine's cores fairly
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
REL = 1e-5  # float32 latents of every rank against the single-process loop


def free_port(n: int) -> int:
    """A base port whose next n ports were free a moment ago (the ring backend listens on base .. base+n-1)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65536 and all(_free(base + i) for i in range(1, n)):
            return base
    raise RuntimeError("no free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch(n: int, *command, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [*LAUNCHER, "--backend", "ring", "-n", str(n), "--hosts", "127.0.0.1", "--starting-port",
           str(free_port(n)), "--", sys.executable, *map(str, command)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert (r.returncode == 0) == ("exited with code" not in r.stderr and "was killed" not in r.stderr), r.stderr
    return r


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def reference(pipe, name):
    plan = pipe.plan(SCENARIOS[name][0]())
    x = None
    for step in pipe.denoise(plan):
        x = step.latents
    return np.array(x)


def check_ranks(pipe, out: Path, n: int, layouts: dict) -> None:
    for name, layout in layouts.items():
        ref = reference(pipe, name)
        runs = [json.loads((out / f"{name}.r{r}.json").read_text()) for r in range(n)]
        for r in range(n):
            x = np.load(out / f"{name}.r{r}.npy")
            err = np.abs(x - ref).max() / np.abs(ref).max()
            assert err <= REL, (name, r, err)
            assert np.array_equal(x, np.load(out / f"{name}.r0.npy")), (name, r)  # every rank holds the same latents
            # the same collectives, in the same order and shapes, on every rank
            assert runs[r]["trace"] == runs[0]["trace"], (name, r)
            assert runs[r]["layout"] == list(layout), name
        assert runs[0]["received"] > 0


# ------------------------------------------------------------------------------------------------- no launch
@pytest.mark.parametrize("mode, size, branches, expect", [
    ("auto", 1, 2, (1, 1)), ("auto", 2, 2, (2, 1)), ("auto", 2, 1, (1, 2)), ("auto", 4, 2, (2, 2)),
    ("auto", 4, 3, (2, 2)), ("auto", 3, 3, (3, 1)), ("auto", 3, 2, (1, 3)), ("cfg", 2, 3, (2, 1)),
    ("cfg", 4, 2, (2, 2)), ("seq", 4, 3, (1, 4)),
])
def test_layout(mode, size, branches, expect):
    lay = D.choose_layout(mode, size, size - 1, branches)
    assert (lay.groups, lay.shards) == expect and lay.size == size
    assert lay.rank_of(lay.group, lay.shard) == size - 1


@pytest.mark.parametrize("mode, size, branches, message", [
    ("cfg", 2, 1, "guidance is off"), ("cfg", 3, 2, "evenly"), ("batch", 2, 2, "does not split"),
])
def test_layout_refused(mode, size, branches, message):
    with pytest.raises(InvalidRequestError, match=message):
        D.choose_layout(mode, size, 0, branches)


def test_shards_cover_the_block_once():
    for length, shards in ((47, 2), (47, 4), (14, 4), (5, 4)):
        b = shard_bounds(length, shards)
        sizes = [hi - lo for lo, hi in b]
        assert b[0][0] == 0 and b[-1][1] == length and all(b[i][1] == b[i + 1][0] for i in range(shards - 1))
        assert max(sizes) - min(sizes) <= 1
        rows = latent_bounds(b, length)
        assert rows[0][0] == 0 and rows[-1][1] == length - 2
        assert sum(hi - lo for lo, hi in rows) == length - 2


def test_one_rank_equals_single_process(pipe):
    """The distributed loop on a launch of one (no collectives) gives the library loop's latents."""
    for name in ("t2i", "edit", "i2v_seq"):
        plan = pipe.plan(SCENARIOS[name][0]())
        x = None
        for step in D.denoise(pipe.model, plan.sequence, plan.params, plan.frozen):
            x = step.latents
        ref = reference(pipe, name)
        assert np.abs(np.array(x) - ref).max() <= REL * np.abs(ref).max(), name


def test_prompts_file_items(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('a cat\n\n# skipped\n{"prompt": "a dog", "seed": 7, "out": "x.png", "cfg-interval": [0.5, 1]}\n')
    options = {"prompt": None, "seed": 1, "out": Path("o.png"), "cfg_interval": (0.4, 1.0), "model": "m"}
    items = D.read_prompts(f, "prompt", options)
    assert items == [{"prompt": "a cat"}, {"prompt": "a dog", "seed": 7, "out": Path("x.png"),
                                           "cfg_interval": (0.5, 1)}]
    f.write_text('{"model": "other"}\n')
    with pytest.raises(InvalidRequestError, match=":1: unknown or fixed option"):
        D.read_prompts(f, "prompt", options)
    assert D.numbered(Path("out/cat.png"), 3) == Path("out/cat-003.png")


# ---------------------------------------------------------------------------------------------- mlx.launch
def test_two_ranks(pipe, tmp_path):
    """Guidance-parallel t2i (the last step outside the guidance interval) and image edit (3 branches on 2 ranks),
    sequence-parallel t2v and i2v (47- and 32-token blocks), each equal to the single-process loop; ranks given
    different requests refuse together."""
    names = ["t2i", "edit", "t2v_seq", "t2v_auto", "i2v_seq", "mismatch"]
    r = launch(2, "tests/dist_rank.py", tmp_path, *names)
    assert "Traceback" not in r.stderr, r.stderr
    check_ranks(pipe, tmp_path, 2, {"t2i": (2, 1), "edit": (2, 1), "t2v_seq": (1, 2), "t2v_auto": (2, 1),
                                    "i2v_seq": (1, 2)})
    # a rank launched with another request: every rank refuses before the first step, nothing is exchanged
    for rank in (0, 1):
        assert "ranks [1] differ from rank 0" in (tmp_path / f"mismatch.r{rank}.err").read_text()
        assert not (tmp_path / f"mismatch.r{rank}.npy").exists()


def test_three_ranks(pipe, tmp_path):
    """Three-branch image guidance on 3 ranks (one branch each) and a 47-token block in shards of 16, 16, 15."""
    r = launch(3, "tests/dist_rank.py", tmp_path, "edit", "t2v_seq")
    assert "Traceback" not in r.stderr, r.stderr
    check_ranks(pipe, tmp_path, 3, {"edit": (3, 1), "t2v_seq": (1, 3)})


def test_four_ranks(pipe, tmp_path):
    """Sequence-parallel over 4 (a 47-token block: shards of 12, 12, 12, 11) and guidance x sequence (2 x 2)."""
    r = launch(4, "tests/dist_rank.py", tmp_path, "edit", "t2v_seq", "t2v_auto")
    assert "Traceback" not in r.stderr, r.stderr
    check_ranks(pipe, tmp_path, 4, {"edit": (2, 2), "t2v_seq": (1, 4), "t2v_auto": (2, 2)})


def test_failing_rank_ends_the_launch(tmp_path):
    """Rank 1 raises after a step while rank 0 waits in the next step's collective: the launch ends at once
    with the error shown, and rank 0 never finishes."""
    t0 = time.monotonic()
    r = launch(2, "tests/dist_rank.py", tmp_path, "fail", timeout=120)
    assert time.monotonic() - t0 < 90
    assert "injected failure on rank 1" in r.stderr
    assert "rank 1 exited with code 1" in r.stderr  # mlx.launch saw the failure and terminated the other ranks
    assert r.returncode == 1  # and lance-mlx-launch says so in its exit status
    assert not list(tmp_path.glob("fail.*"))


def test_batch_over_two_ranks(pipe, tmp_path):
    """inference.py --prompts-file over 2 ranks, 5 items (item i seeded seed + i unless its line says otherwise),
    each rank writing its share: every PNG within 1 level of the single-process image."""
    prompts = ["a red fox", "a blue car", "an old tree", "a small boat", "a cup of tea"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:4] + [json.dumps({"prompt": prompts[4], "seed": 3})]) + "\n")
    r = launch(2, "tests/dist_cli.py", "t2i", "--steps", "2", "--width", "64", "--height", "48", "--seed", "40",
               "--prompts-file", tmp_path / "p.txt", "--out", tmp_path / "img.png", "--parallel", "batch")
    assert "Traceback" not in r.stderr, r.stderr
    for i, prompt in enumerate(prompts):
        assert f"[rank {i % 2}] saved {tmp_path / f'img-{i:03d}.png'}" in r.stderr
        want = pipe.generate_image(prompt, 64, 48, steps=2, seed=40 + i if i < 4 else 3)
        got = Image.open(tmp_path / f"img-{i:03d}.png")
        assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1, i


def test_cli_guidance_parallel(pipe, tmp_path):
    """inference.py with --parallel cfg on 2 ranks: rank 0 alone reports and writes the PNG, within 1 level of the
    single-process image."""
    r = launch(2, "tests/dist_cli.py", "t2i", "--steps", "2", "--width", "64", "--height", "48", "--prompt",
               "a red fox", "--out", tmp_path / "cfg.png", "--parallel", "cfg")
    assert "Traceback" not in r.stderr and "2 guidance group(s) x 1 token shard(s)" in r.stderr, r.stderr
    assert "[rank 1]" not in r.stderr and r.stderr.count("saved") == 1 and r.stderr.count("[load]") == 1
    want = pipe.generate_image("a red fox", 64, 48, steps=2)
    got = Image.open(tmp_path / "cfg.png")
    assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1


def test_edit_prompts_file_in_one_process(pipe, tmp_path):
    """edit.py --prompts-file without a launch: the items one after the other on the loaded model, item i seeded
    --seed + i and written to OUT-00i."""
    from lance_mlx import cmd_edit

    D._LOADED[D.load_key("tiny", "image_edit", "float32")] = pipe
    (tmp_path / "p.txt").write_text("make it pink\nmake it snow\n")
    Image.fromarray(SOURCE).save(tmp_path / "in.png")
    try:
        assert cmd_edit.main(["--model", "tiny", "--dtype", "float32", "--image", str(tmp_path / "in.png"),
                              "--preset", "image_256res", "--steps", "1", "--seed", "5", "--prompts-file",
                              str(tmp_path / "p.txt"), "--out", str(tmp_path / "e.png")]) == 0
    finally:
        D._LOADED.clear()
    for i, instruction in enumerate(["make it pink", "make it snow"]):
        meta = Image.open(tmp_path / f"e-{i:03d}.png").text
        assert meta["instruction"] == instruction and meta["seed"] == str(5 + i)


def test_one_output_refuses_batch():
    with pytest.raises(InvalidRequestError, match="give --prompt"):
        D.run_prompts(type("A", (), {"prompts_file": None, "prompt": None, "parallel": "auto"})(), None, "prompt")
    assert SamplingParams().steps == 30  # the defaults the CLI items start from are upstream's


@pytest.mark.parametrize("rank,decodes", [(0, True), (1, False)])
def test_each_rank_loads_what_it_uses(rank, decodes, converted, monkeypatch):
    """A rank that never decodes (not rank 0 of a shared t2i output) never loads the VAE; no rank keeps lm_head.
    The rank's pipeline still plans and denoises exactly as a full one."""
    import argparse

    from lance_mlx.pipeline import LancePipeline
    from lance_mlx.tasks import TextToImage

    class Rank:
        def rank(self):
            return rank

        def size(self):
            return 2

    monkeypatch.setattr(D, "world", lambda: Rank())
    args = argparse.Namespace(model=str(converted["image"]), dtype="float32", compute_dtype=None, low_memory=False,
                              und_bits=None)
    request = TextToImage("a red fox", 32, 32, SamplingParams(steps=2))
    D._LOADED.clear()
    try:
        pipe = D._pipeline(args, request)
    finally:
        D._LOADED.clear()
    assert pipe.model.language_model.lm_head is None
    assert (pipe.vae is not None) == decodes and pipe.low_memory == (not decodes)
    full = LancePipeline.from_pretrained(converted["image"], "t2i", dtype="float32")
    assert np.array_equal(np.array(pipe.latents(request)), np.array(full.latents(request)))

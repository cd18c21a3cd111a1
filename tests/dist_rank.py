"""One rank of the distributed tests: runs named scenarios on the tiny model and saves each rank's latents and trace.

Run by tests/test_distributed.py as `mlx.launch --backend ring -n N --hosts 127.0.0.1 -- python tests/dist_rank.py
OUT NAME...`; the scenarios are also imported there to compute the single-process references.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lance_mlx.config import SamplingParams  # noqa: E402
from lance_mlx.processing import Preset  # noqa: E402
from lance_mlx.tasks import ImageEdit, ImageToVideo, Posterior, TextToImage, TextToVideo  # noqa: E402

TINY_IMAGE = Preset("tiny_image", 48, 56)  # as tests/test_edit.py: 4x3 latents, a small ViT grid
SOURCE = (np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8)
# 9 frames at 80x48: 3 x 3 x 5 = 45 latent tokens, a 47-token noise block (odd; 47 % 4 = 3)
VIDEO = dict(num_frames=9, width=80, height=48)

SCENARIOS = {
    # guidance off for the last step (t = 0.64 is outside (0.7, 1]): rank 1 idles there
    "t2i": (lambda: TextToImage("a red fox", 64, 48, SamplingParams(steps=3, cfg_interval=(0.7, 1.0))), "cfg"),
    # three guidance branches (image guidance) over the ranks
    "edit": (lambda: ImageEdit(SOURCE, "make it pink", TINY_IMAGE, SamplingParams(steps=2, cfg_image=1.5),
                               Posterior(sample=True, seed=3)), "auto"),
    "t2v_seq": (lambda: TextToVideo("waves on a beach", sampling=SamplingParams(steps=2), **VIDEO), "seq"),
    "t2v_auto": (lambda: TextToVideo("waves on a beach", sampling=SamplingParams(steps=2, cfg_interval=(0.7, 1.0)),
                                     **VIDEO), "auto"),
    # per-token times (the frozen first latent frame), tokens sharded
    "i2v_seq": (lambda: ImageToVideo("a boat", SOURCE, 5, resolution=64, sampling=SamplingParams(steps=2)), "seq"),
    # rank 1 is given another prompt: every rank must refuse before the first step
    "mismatch": (lambda: TextToImage("a red fox", 64, 48, SamplingParams(steps=2)), "cfg"),
    # rank 1 raises after the first step while the others wait in the next step's collectives
    "fail": (lambda: TextToImage("a red fox", 64, 48, SamplingParams(steps=3)), "cfg"),
}


class ByteLevelTokenizer:
    """The golden vocabulary as a byte-level BPE from `tokenizers`: importing transformers (and with it torch) in
    four ranks at once on two cores takes longer than the whole test; ranks and references use this one."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers

        from fixtures import GOLDEN

        folder = GOLDEN / "tokenizer"
        self.tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": self.tok.encode(text, add_special_tokens=add_special_tokens).ids}


def tiny_pipe():
    """tiny_checkpoints.tiny_pipeline with the tokenizer above (the same seeded tiny VAE and golden ViT)."""
    import json as _json

    import mlx.core as mx

    from fixtures import GOLDEN
    from lance_mlx.config import ViTConfig
    from lance_mlx.pipeline import LancePipeline
    from lance_mlx.vae_wan22 import Wan2_2_VAE
    from lance_mlx.vit import load_vit
    from tiny_checkpoints import TINY_VAE, tiny_lance

    mx.random.seed(0)
    vae = Wan2_2_VAE(**TINY_VAE)
    mx.eval(vae.model.parameters())
    vit = load_vit(GOLDEN / "vit_tiny.safetensors",
                   ViTConfig.from_dict(_json.loads((GOLDEN / "vit_config.json").read_text())))
    return LancePipeline(tiny_lance(), ByteLevelTokenizer(), vit, vae)


def main(out: Path, names) -> None:
    from dataclasses import replace

    from lance_mlx import distributed as D
    from lance_mlx.errors import GenerationError

    pipe = tiny_pipe()
    group = D.world()
    rank = group.rank()
    for name in names:
        make, mode = SCENARIOS[name]
        request = make()
        if name == "mismatch" and rank == 1:
            request = replace(request, prompt="a blue car")
        plan = pipe.plan(request)
        exchange = D.Exchange(group, trace=[])
        layout = D.choose_layout(mode, group.size(), rank, D.num_branches(plan.params))
        x = None
        try:
            for step in D.denoise(pipe.model, plan.sequence, plan.params, plan.frozen, layout, exchange):
                x = step.latents
                if name == "fail" and rank == 1:
                    raise RuntimeError("injected failure on rank 1")
        except GenerationError as e:
            if name != "mismatch":
                raise
            (out / f"{name}.r{rank}.err").write_text(str(e))
            continue
        np.save(out / f"{name}.r{rank}.npy", np.array(x))
        (out / f"{name}.r{rank}.json").write_text(json.dumps({"trace": exchange.trace, "layout": [
            layout.groups, layout.shards], "received": exchange.received}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

"""Image-understanding speed at full-size Lance shapes: 504² image prefill and decode tokens/s, next to mlx-vlm."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from common import blas_words  # bench/common.py (this script's folder)
from mlx.utils import tree_flatten

from lance_mlx import understanding as U  # noqa: E402
from lance_mlx.config import LanceConfig, ViTConfig  # noqa: E402
from lance_mlx.lance import Lance  # noqa: E402
from lance_mlx.loading import DTYPES  # noqa: E402
from lance_mlx.processing import patchify  # noqa: E402
from lance_mlx.vit import VisionTransformer  # noqa: E402

TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "golden" / "tokenizer"  # the real Qwen2.5 vocab
FULL_LLM_LAYERS, FULL_VIT_BLOCKS = 36, 32


def full_attention_blocks(depth: int):
    """Keep upstream's share of full-attention ViT blocks (every 8th, from 7) in a shallower tower."""
    full = [i for i in (7, 15, 23, 31) if i < depth]
    return tuple(full or [depth - 1])


def materialize(module, skip=()) -> None:
    """Evaluate parameters one tensor at a time (keeps the float32 init transient); `skip` stays lazy, unused."""
    for k, p in tree_flatten(module.parameters()):
        if not any(s in k for s in skip):
            mx.eval(p)


def image_patches(size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((2, size, size, 3)).astype(np.float32)  # an image is two identical frames upstream
    img[1] = img[0]
    return patchify(img)  # (N, 1176), grid (1, size/14, size/14)


def timed_head(lm_head, hidden: int, dtype, reps: int = 3) -> float:
    x = mx.random.normal((1, hidden)).astype(dtype)
    mx.eval(mx.argmax(lm_head(x), axis=-1))
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(mx.argmax(lm_head(x), axis=-1))
    return (time.perf_counter() - t0) / reps


def bench_lance(dtype, llm_layers: int, vit_blocks: int, size: int, tokens: int, tok) -> dict:
    cfg = LanceConfig()
    cfg = replace(cfg, llm=replace(cfg.llm, num_hidden_layers=llm_layers))
    mx.random.seed(0)
    model = Lance(cfg)
    model.set_dtype(dtype)
    # Understanding runs only the und expert; the gen expert and latent adapters are never materialized.
    materialize(model, skip=("moe_gen", "vae2llm", "llm2vae", "time_embedder"))
    vit = VisionTransformer(replace(ViTConfig(), depth=vit_blocks, fullatt_block_indexes=full_attention_blocks(
        vit_blocks)))
    vit.set_dtype(dtype)
    materialize(vit)
    patches, grid = image_patches(size)

    mx.reset_peak_memory()
    t0 = time.perf_counter()
    embeds = U.encode_visual(vit, patches, grid)
    mx.eval(embeds)
    t_vit = time.perf_counter() - t0
    prompt = U.build_prompt(tok, grid, "image", "What is in the image?", vit_embeds=embeds)
    t1 = time.perf_counter()
    cache = U.prefill(model, prompt)
    t_llm = time.perf_counter() - t1
    stamps = []
    for _tok, _ in U.decode_tokens(model, cache, prompt.last_token, prompt.last_position, tokens,
                                   U.make_sampler(), len(tok), stop_ids=()):
        stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    head = timed_head(model.language_model.lm_head, cfg.llm.hidden_size, dtype)
    out = dict(prompt_tokens=len(prompt), t_vit=t_vit, t_llm=t_llm, t_first=stamps[0] - t1 - t_llm, ttft=ttft,
               decode_tps=decode, head=head, peak=mx.get_peak_memory() / 2**30)
    del model, vit, cache
    gc.collect()
    mx.clear_cache()
    return out


def bench_mlx_vlm(dtype, llm_layers: int, vit_blocks: int, size: int, tokens: int, tok) -> dict:
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.models.qwen2_5_vl import Model, ModelConfig
    from mlx_vlm.models.qwen2_5_vl.config import TextConfig, VisionConfig

    # Qwen2.5-VL-3B-Instruct shapes (config.json of the release): the same text tower and ViT as Lance's und path.
    text = TextConfig(model_type="qwen2_5_vl", hidden_size=2048, num_hidden_layers=llm_layers,
                      intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
                      vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True,
                      rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = VisionConfig(depth=vit_blocks, hidden_size=1280, intermediate_size=3420, out_hidden_size=2048,
                          num_heads=16, fullatt_block_indexes=list(full_attention_blocks(vit_blocks)))
    mx.random.seed(0)
    model = Model(ModelConfig(text_config=text, vision_config=vision, model_type="qwen2_5_vl", vocab_size=151936))
    model.set_dtype(dtype)
    materialize(model)
    patches, grid = image_patches(size)
    n_img = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    # Qwen2.5-VL's own chat template with <|image_pad|> placeholders; same length as Lance's prompt
    text_ids = tok("<|im_start|>system\nLook at the image carefully and answer the question.<|im_end|>\n"
                   "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
                   "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    k = text_ids.index(151655)
    ids = mx.array([text_ids[:k] + [151655] * n_img + text_ids[k + 1:]])

    mx.reset_peak_memory()
    stamps = []
    t0 = time.perf_counter()
    for _tok, _ in generate_step(ids, model, mx.array(patches), None, max_tokens=tokens, temperature=0.0,
                                 image_grid_thw=mx.array([grid])):
        stamps.append(time.perf_counter())
    lm = model.language_model
    head = timed_head(lm.model.embed_tokens.as_linear, 2048, dtype)
    out = dict(prompt_tokens=int(ids.shape[1]), ttft=stamps[0] - t0,
               decode_tps=(len(stamps) - 1) / (stamps[-1] - stamps[0]), head=head,
               peak=mx.get_peak_memory() / 2**30)
    del model
    gc.collect()
    mx.clear_cache()
    return out


def full_depth(r: dict, llm_layers: int, vit_blocks: int) -> dict:
    """Linear extrapolation to 36 LLM layers / 32 ViT blocks. Decode: the per-token lm_head time (measured alone)
    is kept once and the rest scaled by 36 / layers. Prefill: ViT scaled by 32 / blocks (patch embedding and
    merger included, so slightly high), LLM prefill by 36 / layers."""
    s_llm, s_vit = FULL_LLM_LAYERS / llm_layers, FULL_VIT_BLOCKS / vit_blocks
    per_tok = 1.0 / r["decode_tps"]
    out = {"decode_tps": 1.0 / ((per_tok - r["head"]) * s_llm + r["head"])}
    if "t_vit" in r:
        out["ttft"] = r["t_vit"] * s_vit + (r["t_llm"] + r["t_first"]) * s_llm
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--llm-layers", type=int, default=FULL_LLM_LAYERS,
                   help="decoder layers built (default 36 = full); fewer keeps a CPU run short, results are "
                        "also extrapolated to full depth")
    p.add_argument("--vit-blocks", type=int, default=FULL_VIT_BLOCKS, help="ViT blocks built (default 32 = full)")
    p.add_argument("--size", type=int, default=504, help="ViT input side in pixels, multiple of 28 (default 504)")
    p.add_argument("--tokens", type=int, default=8, help="decoded tokens (default 8)")
    p.add_argument("--skip-mlx-vlm", action="store_true")
    args = p.parse_args(argv)
    if args.size % 28:
        raise SystemExit("error: --size must be a multiple of 28")
    if args.tokens < 2:
        raise SystemExit("error: --tokens must be at least 2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    L, V = args.llm_layers, args.vit_blocks
    print(f"# x2t benchmark: {args.size}x{args.size} image ({(args.size // 28) ** 2} ViT tokens), {args.tokens} "
          f"decoded tokens, random weights", file=sys.stderr)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name in args.dtypes:
        dt = DTYPES[name]
        print(f"lance-mlx {name} ...", file=sys.stderr, flush=True)
        rows.append(("lance-mlx (und expert)", name, bench_lance(dt, L, V, args.size, args.tokens, tok)))
        if not args.skip_mlx_vlm:
            print(f"mlx-vlm {name} ...", file=sys.stderr, flush=True)
            rows.append(("mlx-vlm qwen2_5_vl", name, bench_mlx_vlm(dt, L, V, args.size, args.tokens, tok)))

    print(f"\nMachine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, MLX {mx.__version__} on "
          f"{mx.default_device()}, BLAS: {blas_words()}")
    if hasattr(os, "getloadavg"):  # other work on the machine inflates every number
        print(f"Load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"Built with {L}/{FULL_LLM_LAYERS} LLM layers and {V}/{FULL_VIT_BLOCKS} ViT blocks; full-depth columns "
          "are linear extrapolations (see full_depth()); peak memory is at the built depth.\n")
    print("| model | dtype | prompt tokens | time to first token (s) | of which ViT (s) | decode tokens/s "
          "| full depth: first token (s) | full depth: decode tokens/s | peak memory (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, name, r in rows:
        f = full_depth(r, L, V)
        ttft_full = f"{f['ttft']:.1f}" if "ttft" in f else "n/a"
        if model.startswith("mlx-vlm"):
            # same shapes as ours: scale the whole time to first token by our measured ViT/LLM split
            ours = next(x for m, n, x in rows if n == name and m.startswith("lance"))
            share = ours["t_vit"] / ours["ttft"]
            ttft_full = f"{r['ttft'] * (share * FULL_VIT_BLOCKS / V + (1 - share) * FULL_LLM_LAYERS / L):.1f}*"
        vit = f"{r['t_vit']:.2f}" if "t_vit" in r else "n/a"
        print(f"| {model} | {name} | {r['prompt_tokens']} | {r['ttft']:.2f} | {vit} | {r['decode_tps']:.2f} | "
              f"{ttft_full} | {f['decode_tps']:.2f} | {r['peak']:.2f} |")
    if not args.skip_mlx_vlm:
        print("\n`*` mlx-vlm's time to first token is not split into ViT and LLM parts; it is extrapolated with "
              "lance-mlx's measured split.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

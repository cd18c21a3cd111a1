"""Peak memory of each task at the full-size config with bf16 random weights, default and low-memory pipelines."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from lance_mlx import conditioning as C
from lance_mlx import memory_estimate as M
from lance_mlx import sequence as Q
from lance_mlx import understanding as U
from lance_mlx.config import LanceConfig, ViTConfig
from lance_mlx.lance import Lance
from lance_mlx.processing import get_preset, preprocess_image, preprocess_video
from lance_mlx.quantize import quantize_lance
from lance_mlx.vae_wan22 import Wan2_2_VAE
from lance_mlx.vit import VisionTransformer

GB = 2**30
FULL = LanceConfig()
PROMPT_IDS = [32, 8251, 9982, 264, 22361, 448, 47613, 1467, 330, 50669, 1]  # an 11-token prompt
ATTN_CHUNK = 1024  # query rows per attention call in the fused-attention emulation
T_GUIDED = 0.8  # a step inside upstream's guidance interval: both branches run

# case: (task, pixels W x H, frames); t2v 480p is upstream's video_480p 16:9 bucket 848x480
CASES = {
    "t2i 512²": ("t2i", (512, 512), 1), "t2i 768²": ("t2i", (768, 768), 1), "t2i 1024²": ("t2i", (1024, 1024), 1),
    "edit 768²": ("edit", (768, 768), 1),
    "t2v 480p × 25": ("t2v", (848, 480), 25), "t2v 480p × 121": ("t2v", (848, 480), 121),
    "x2t image": ("x2t", (1024, 768), 1), "x2t video × 32": ("x2t", (848, 480), 32),
}


def params_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def evaluated(module):
    for _, p in tree_flatten(module.parameters()):  # one tensor at a time: no float32 copy of the whole model
        mx.eval(p)
    return module


class Peak:
    """Peak MLX memory of a phase above what was allocated when it began."""

    def __enter__(self):
        gc.collect()
        mx.clear_cache()
        self.base = mx.get_active_memory()
        mx.reset_peak_memory()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.extra = mx.get_peak_memory() - self.base
        self.seconds = time.perf_counter() - self.t0
        print(f"  phase: {self.extra / GB:.2f} GB above {self.base / GB:.2f} GB, {self.seconds:.0f} s", file=sys.stderr,
              flush=True)


def fused_attention_emulation():
    """Swap MLX's attention for a query-chunked one: the CPU fallback stores the whole (B, H, L, T) score matrix,
    MLX's fused Metal kernel does not; chunks of ATTN_CHUNK queries store only (B, H, ATTN_CHUNK, T)."""
    orig = mx.fast.scaled_dot_product_attention

    def chunked(q, k, v, *, scale, mask=None, **kw):
        L, T = q.shape[2], k.shape[2]
        if L <= ATTN_CHUNK:
            return orig(q, k, v, scale=scale, mask=mask, **kw)
        outs = []
        for s in range(0, L, ATTN_CHUNK):
            e = min(L, s + ATTN_CHUNK)
            m = mask
            if isinstance(mask, str):  # causal, lower-right aligned
                m = mx.arange(T)[None] <= (T - L + mx.arange(s, e))[:, None]
            elif isinstance(mask, mx.array) and mask.ndim >= 2 and mask.shape[-2] == L:
                m = mask[..., s:e, :]
            outs.append(orig(q[:, :, s:e], k, v, scale=scale, mask=m, **kw))
        return mx.concatenate(outs, axis=2)

    mx.fast.scaled_dot_product_attention = chunked


def build_components(layers: int, vit_blocks: int, vae_dtype):
    cfg = replace(FULL, llm=replace(FULL.llm, num_hidden_layers=layers))
    mx.random.seed(0)
    model = Lance(cfg)
    model.set_dtype(mx.bfloat16)
    vit = VisionTransformer(replace(ViTConfig(), depth=vit_blocks))
    vit.set_dtype(mx.bfloat16)
    vae = Wan2_2_VAE(dtype=vae_dtype)
    vae.model.set_dtype(vae_dtype)
    evaluated(vae.model)
    return evaluated(model), evaluated(vit), vae


def full_bytes(model, vit, vae):
    """Weight bytes at full depth (36 LLM layers, 32 ViT blocks): measured per layer / block, times the count."""
    llm_layer = params_bytes(model.language_model.model.layers[0])
    llm = params_bytes(model) + (FULL.llm.num_hidden_layers - len(model.language_model.model.layers)) * llm_layer
    vit_block = params_bytes(vit.blocks[0])
    vit_full = params_bytes(vit) + (ViTConfig().depth - len(vit.blocks)) * vit_block
    # the und expert in 4 bits: quantize a copy of one layer and scale
    one = Lance(replace(FULL, llm=replace(FULL.llm, num_hidden_layers=1)))
    one.set_dtype(mx.bfloat16)
    quantize_lance(one, {"bits": 4, "experts": "und"})
    und4_layer = params_bytes(one.language_model.model.layers[0])
    und4 = llm - FULL.llm.num_hidden_layers * (llm_layer - und4_layer)
    return {"llm": llm, "llm_und4": und4, "vit": vit_full, "vae": params_bytes(vae.model), "llm_layer": llm_layer}


def kv_bytes(caches) -> int:
    return sum(a.nbytes for c in caches for a in (c.keys, c.values) if a is not None)


def branch_caches(ctx):
    return [c for s in (ctx.cond, ctx.uncond, ctx.vision) if s is not None for c in s.cache]


def tokenizer():
    """The Qwen2.5-VL tokenizer files kept with the tests (only the prompt's length matters here)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(__file__).resolve().parents[1] / "tests" / "golden" / "tokenizer"))


def edit_inputs(model, vit, vae, size, preset):
    """Edit conditioning of a random source: ViT and VAE encode measured apart, and the edit sequence."""
    W, H = size
    src = Image.fromarray((np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8))
    visual = preprocess_image(src, get_preset(preset))
    with Peak() as vit_p:
        emb, grid = C.vit_embeddings(vit, visual.vit_patches, visual.grid_thw)
    with Peak() as vae_p:
        cond = C.encode_latent(vae, visual.vae_pixels, True, C.posterior_keys(None)[1])
        mx.eval(cond)
    inputs = C.EditInputs(emb, grid, cond)
    return inputs.sequence(np.array(PROMPT_IDS), "image"), inputs.latent_shape, vit_p, vae_p, len(visual.vit_patches)


def llm_calibration(model, vit, vae):
    """Per-token activation bytes of the LLM phases, measured on the layers built (bf16): a guided t2i 512² step,
    an edit context prefill (image_256res source, also standing for understanding prompts); the ViT per patch."""
    out = {}
    seq, shape, vit_p, _, patches = edit_inputs(model, vit, vae, (384, 256), "image_256res")
    out["vit_per_patch"] = vit_p.extra / patches
    ctx_tokens = sum(len(sp) for sp in seq.splits[:seq.noise_index])
    with Peak() as p:
        ctx = model.prepare_generation(seq, cfg=True)
        kv = kv_bytes(branch_caches(ctx))
    out["prefill_per_token"] = (p.extra - kv) / ctx_tokens  # transient, per context token of one branch
    del ctx
    seq = Q.generation_sequence("t2i", np.array(PROMPT_IDS), (1, 32, 32))
    ctx = model.prepare_generation(seq, cfg=True)
    x = mx.random.normal((1024, 48), key=mx.random.key(0))
    with Peak() as p:
        mx.eval(model.velocity(ctx, x, T_GUIDED, 4.0).v)
    batch = getattr(ctx._batched.get("step"), "batch", None)
    stacked = sum(a.nbytes for a in batch.keys + batch.values) if batch is not None else 0
    out["step_per_token"] = (p.extra - stacked) / 1024  # both guidance branches of one noise token
    out["stacked_per_kv"] = stacked / max(1, kv_bytes(branch_caches(ctx)))
    del ctx
    return out


def vae_phase(vae, fn):
    with Peak() as p:
        fn()
    return p.extra


DECODED = {}  # (pixel frames of the largest chunk, h * w latents) -> measured decode bytes


def decode_peak(vae, t, h, w):
    """Streamed decode: one latent frame at a time (the first one alone, then chunks of 4 pixel frames), so two
    latent frames stand for any length. When the machine lacks the memory (other jobs), the decode's extra is
    scaled by area from the largest one measured with the same chunk length, and marked so."""
    chunk = 4 if t > 1 else 1

    def measure(h, w):
        if (chunk, h * w) not in DECODED:
            lat = mx.random.normal((1, min(t, 2), h, w, 48), key=mx.random.key(1))
            DECODED[(chunk, h * w)] = vae_phase(vae, lambda: [mx.eval(c) for c in vae.decode_stream(lat)])
        return DECODED[(chunk, h * w)]

    if not any(k[0] == chunk for k in DECODED):
        measure(16, 16)  # a small probe first, to know whether the full size fits beside other jobs
    area, extra = max((k[1], v) for k, v in DECODED.items() if k[0] == chunk)
    if (chunk, h * w) not in DECODED and extra * h * w / area * 1.3 > M.available_memory_bytes():
        return extra * h * w / area, True
    return measure(h, w), False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--layers", type=int, default=1, help="LLM layers built (full width); the others add their "
                                                             "exact weight and KV-cache bytes")
    ap.add_argument("--vit-blocks", type=int, default=2, help="ViT blocks built (full width)")
    ap.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="VAE dtype (default float32: MLX's bf16 convolutions on CPU take many minutes per image)")
    ap.add_argument("--cpu-attention", action="store_true",
                    help="keep MLX's CPU attention (stores the whole score matrix) instead of the fused emulation")
    args = ap.parse_args(argv)
    if not args.cpu_attention:
        fused_attention_emulation()
    model, vit, vae = build_components(args.layers, args.vit_blocks, getattr(mx, args.vae_dtype))
    wb = full_bytes(model, vit, vae)
    L = FULL.llm.num_hidden_layers
    print(f"MLX {mx.__version__} {mx.default_device()}; LLM and ViT bf16, random weights, {args.layers} of {L} "
          f"layers / {args.vit_blocks} of 32 ViT blocks built. Full-size weights (GiB): LLM {wb['llm'] / GB:.2f} "
          f"(und expert 4-bit: {wb['llm_und4'] / GB:.2f}), ViT {wb['vit'] / GB:.2f}, VAE ({args.vae_dtype}) "
          f"{wb['vae'] / GB:.2f}; attention {'CPU (score matrix stored)' if args.cpu_attention else 'fused'}",
          file=sys.stderr, flush=True)
    cal = llm_calibration(model, vit, vae)
    print("calibration (bytes): " + ", ".join(f"{k} {v:,.0f}" for k, v in cal.items()), file=sys.stderr, flush=True)
    # one context token of one branch, all layers: keys and values, bf16 (caches grow in slots of 256 tokens)
    kv_tok = M.kv_bytes_per_token(FULL)
    weights = M.Weights(wb["llm"], wb["vit"], wb["vae"])
    weights4 = M.Weights(wb["llm_und4"], wb["vit"], wb["vae"])
    tok = tokenizer()
    rows = ["| case | noise / context tokens | phases above weights (GiB) | default | low-memory | low-memory, "
            "und 4-bit |", "|---|---|---|---|---|---|"]
    for name in args.cases:
        task, (W, H), frames = CASES[name]
        t0 = time.perf_counter()
        if task == "x2t":
            rng = np.random.default_rng(0)
            if frames > 1:
                visual = preprocess_video((rng.random((frames, H, W, 3)) * 255).astype(np.uint8), "video_480p",
                                          vae=False, vit=True)
            else:
                visual = preprocess_image(Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)),
                                          get_preset("image_768res"), vae=False, vit=True)
            n_patch = len(visual.vit_patches)
            t, gh, gw = visual.grid_thw
            emb = mx.zeros((n_patch // 4, FULL.llm.hidden_size), dtype=mx.bfloat16)
            n_ctx = len(U.build_prompt(tok, visual.grid_thw, "video" if frames > 1 else "image", "Describe it.",
                                       vit_embeds=emb))
            enc = cal["vit_per_patch"] * n_patch
            run = cal["prefill_per_token"] * n_ctx + kv_tok * n_ctx
            phases = {"ViT": enc, "prefill + KV": run}
            default, low, low4 = (M.understanding_peak(w, enc, run, low_memory=lm)
                                  for w, lm in ((weights, False), (weights, True), (weights4, True)))
            n = f"{n_ctx} prompt ({n_patch} ViT patches)"
        else:
            vit_w, enc = 0, 0.0
            if task == "edit":
                seq, (t, h, w), vit_p, vae_p, patches = edit_inputs(model, vit, vae, (W, H), "image_768res")
                n_ctx = sum(len(sp) for sp in seq.splits[:seq.noise_index])
                enc, vit_w = max(cal["vit_per_patch"] * patches, vae_p.extra), wb["vit"]
            else:
                t, h, w = (frames - 1) // 4 + 1, H // 16, W // 16
                n_ctx = len(Q.generation_sequence(task, np.array(PROMPT_IDS), (1, 1, 1)).splits[0])
            N = t * h * w
            kv = 2 * kv_tok * n_ctx  # the two guidance branches
            prefill = cal["prefill_per_token"] * n_ctx + kv
            step = cal["step_per_token"] * N + kv * (1 + cal["stacked_per_kv"])
            dec, scaled = decode_peak(vae, t, h, w)
            phases = {"encode": enc, "prefill": prefill, "step": step, "decode (scaled)" if scaled else "decode": dec}
            default, low, low4 = (M.generation_peak(w, enc, prefill, step, dec, low_memory=lm, vit_loaded=bool(vit_w),
                                                    vae_encodes=task == "edit")
                                  for w, lm in ((weights, False), (weights, True), (weights4, True)))
            n = f"{N} / {n_ctx}"
        detail = ", ".join(f"{k} {v / GB:.2f}" for k, v in phases.items() if v)
        rows.append(f"| {name} | {n} | {detail} | {default / GB:.1f} | {low / GB:.1f} | {low4 / GB:.1f} |")
        print(rows[-1] + f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

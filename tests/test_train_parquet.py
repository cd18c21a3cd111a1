"""Upstream's local parquet training data (train_dataset.md) for every task: rows read as items, and every malformed
file refused in one line with exit status 2 before any weights load."""

import io

import numpy as np
import pytest
from PIL import Image


def png(seed=0, size=(40, 56)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write(path, columns, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def i2t_columns(**over):
    cols = {"image_bytes": [png(0), png(1)], "caption_i": ["Describe the image.", "Answer briefly."],
            "caption_q": ["", "How many cats?"], "caption_a": ["Two cats on a sofa.", "Two.\n"]}
    cols.update(over)
    return cols


def test_i2t_rows_as_upstream_reads_them(tmp_path):
    """caption_i becomes the item's system prompt, caption_q "" no question, caption_a the answer; i2t texts are
    kept as written (upstream's x2t reader cleans none of them)."""
    from lance_mlx.train import data as D

    items = D.find_items(write(tmp_path / "u.parquet", i2t_columns()), "i2t")
    assert [(i.name, i.system, i.question, i.text) for i in items] == [
        ("row000000", "Describe the image.", None, "Two cats on a sofa."),
        ("row000001", "Answer briefly.", "How many cats?", "Two.\n")]
    assert D.open_image(items[1].image).size == (56, 40)
    # line breaks opening caption_i / caption_a would merge with the template's "\n" in upstream's tokenization
    items = D.find_items(write(tmp_path / "w.parquet", i2t_columns(caption_i=["\n Look.", "  Look."],
                                                                    caption_a=[" \nTwo cats.", "\r\nTwo."])), "i2t")
    assert [(i.system, i.text) for i in items] == [("Look.", "Two cats."), ("  Look.", "Two.")]
    # an empty caption_i: our default prompts (question-answering / caption) instead of an empty system turn
    items = D.find_items(write(tmp_path / "v.parquet", i2t_columns(caption_i=["", None])), "i2t")
    assert [i.system for i in items] == [None, None]


def test_system_prompt_reaches_the_features_cache(tmp_path):
    """The item's system prompt is tokenized, cached with the features and part of the data hash."""
    import mlx.core as mx

    from lance_mlx.train import data as D

    items = D.find_items(write(tmp_path / "u.parquet", i2t_columns()), "i2t")
    f = D.Features(text_ids=np.array([1, 2]), system_ids=np.array([5, 6, 7]), question_ids=np.array([9]),
                   vit=mx.zeros((2, 4)), vit_grid=(1, 1, 2))
    D.save_features(f, tmp_path / "f.safetensors")
    g = D.load_features(tmp_path / "f.safetensors")
    assert g.system_ids.tolist() == [5, 6, 7] and g.question_ids.tolist() == [9]
    other = [D.Item(i.name, i.text, i.image, question=i.question, system="Something else.") for i in items]
    assert D.data_hash(items, {}) != D.data_hash(other, {})
    plain = [D.Item(i.name, i.text, i.image, question=i.question) for i in items]
    assert D.data_hash(plain, {}) != D.data_hash(items, {})


@pytest.mark.parametrize("problem", ["missing-column", "binary-caption", "string-image", "empty-answer",
                                     "null-image", "corrupt-image", "not-parquet", "video-rows"])
def test_bad_i2t_parquet_is_one_line_exit_2(problem, tmp_path, no_model, capsys):
    import pyarrow as pa

    from lance_mlx.train.cli import main

    path = tmp_path / "u.parquet"
    cols = i2t_columns()
    if problem == "missing-column":
        del cols["caption_q"]
        write(path, cols)
    elif problem == "binary-caption":
        write(path, i2t_columns(caption_a=[b"x", b"y"]))
    elif problem == "string-image":
        write(path, i2t_columns(image_bytes=["a.png", "b.png"]))
    elif problem == "empty-answer":
        write(path, i2t_columns(caption_a=["fine", "  "]))
    elif problem == "null-image":
        schema = pa.schema([("image_bytes", pa.binary()), ("caption_i", pa.string()), ("caption_q", pa.string()),
                            ("caption_a", pa.string())])
        write(path, i2t_columns(image_bytes=[png(0), None]), schema)
    elif problem == "corrupt-image":
        write(path, i2t_columns(image_bytes=[png(0), b"junk"]))
    elif problem == "not-parquet":
        path.write_bytes(b"PAR1 not really")
    elif problem == "video-rows":  # upstream's v2t rows: video_bytes instead of image_bytes
        cols["video_bytes"] = cols.pop("image_bytes")
        write(path, cols)
    with pytest.raises(SystemExit) as e:
        main(["--task", "i2t", "--data", str(path), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_errors_are_lance_errors(tmp_path):
    from lance_mlx.errors import InputNotFoundError, InvalidRequestError
    from lance_mlx.train import data as D

    with pytest.raises(InvalidRequestError, match="lacks the column"):
        D.find_items(write(tmp_path / "t.parquet", {"caption": ["a fox"], "image_bytes": [png()]}), "i2t")
    with pytest.raises(InvalidRequestError, match="caption_a is binary"):
        D.find_items(write(tmp_path / "b.parquet", i2t_columns(caption_a=[b"x", b"y"])), "i2t")
    with pytest.raises(InputNotFoundError):
        D.find_items(tmp_path / "missing.parquet", "i2t")


def test_i2t_parquet_trains_end_to_end(upstream_root, tmp_path):
    """lance-mlx-train --task i2t on upstream's parquet: cached with the rows' system prompts, one step, an adapter."""
    import json

    from lance_mlx.train import data as D
    from lance_mlx.train.cli import main

    data = write(tmp_path / "u.parquet", i2t_columns())
    out = tmp_path / "run"
    assert main(["--task", "i2t", "--data", str(data), "--out", str(out), "--model", str(upstream_root),
                 "--dtype", "float32", "--resolution", "128", "--rank", "2", "--warmup", "1", "--steps", "1"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert np.isfinite(json.loads((out / "loss.jsonl").read_text().splitlines()[0])["ce"])
    cached = sorted((out / "cache").rglob("*.safetensors"))
    assert len(cached) == 2 and all(D.load_features(p).system_ids is not None for p in cached)


def test_video_rows_share_the_reader(tmp_path):
    """The video tasks read through the same reader: v2t texts as upstream's x2t reader gives them (as i2t), the
    media columns checked to be binary, video-edit pairs in order."""
    import pyarrow as pa

    from lance_mlx.errors import InvalidRequestError
    from lance_mlx.train import video_data as V

    clip_a, clip_b = b"GIF89a-first", b"GIF89a-second"  # only read here, decoded later
    items = V.scan_parquet(write(tmp_path / "u.parquet", {"video_bytes": [clip_a], "caption_i": ["\nWatch."],
                                                          "caption_q": [""], "caption_a": ["Two.\n"]}), "v2t")
    assert [(i.video, i.system, i.question, i.text) for i in items] == [(clip_a, "Watch.", None, "Two.\n")]
    [pair] = V.scan_parquet(write(tmp_path / "e.parquet", {"caption": [" redder "], "input_video_bytes": [clip_a],
                                                           "output_video_bytes": [clip_b]}), "video-edit")
    assert (pair.text, pair.video, pair.target) == ("redder", clip_a, clip_b)
    strings = write(tmp_path / "s.parquet", {"caption": ["x"], "video_bytes": ["not bytes"]},
                    schema=pa.schema([("caption", pa.string()), ("video_bytes", pa.string())]))
    with pytest.raises(InvalidRequestError, match="video_bytes is string, not binary"):
        V.scan_parquet(strings, "t2v")

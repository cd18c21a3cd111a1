"""Upstream's local parquet training data (train_dataset.md): the rows of one file, checked before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..errors import InvalidRequestError

# Columns per task, as upstream's train_dataset.md and the row readers (base_mm_parquet_dataset.py::transform_row;
# dataset_x2v_interleave_local.py::_validate_local_row): text2image_general / text2video_general (caption,
# image_bytes / video_bytes), image2image / video2video (caption, input_*_bytes, output_*_bytes), x2t_general
# (image_bytes / video_bytes, caption_i the instruction / system prompt, caption_q the question, "" for none,
# caption_a the answer).
PARQUET_COLUMNS = {
    "t2i": ("caption", "image_bytes"),
    "edit": ("caption", "input_image_bytes", "output_image_bytes"),
    "i2t": ("image_bytes", "caption_i", "caption_q", "caption_a"),
    "t2v": ("caption", "video_bytes"),
    "i2v": ("caption", "video_bytes"),
    "video-edit": ("caption", "input_video_bytes", "output_video_bytes"),
    "v2t": ("video_bytes", "caption_i", "caption_q", "caption_a"),
}
MEDIA_COLUMNS = ("image_bytes", "input_image_bytes", "output_image_bytes", "video_bytes", "input_video_bytes",
                 "output_video_bytes")
UNDERSTANDING_TASKS = ("i2t", "v2t")
EDIT_TASKS = ("edit", "video-edit")


def _schema(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidRequestError("reading parquet needs pyarrow: pip install pyarrow", param="data") from None
    try:
        return pq, pq.read_schema(str(path))
    except Exception as e:  # pyarrow raises its own error types for unreadable files
        raise InvalidRequestError(f"{path} is not a readable parquet file ({e})", param="data") from None


def _check_types(path: Path, schema, cols) -> None:
    import pyarrow as pa

    for c in cols:
        t = schema.field(c).type
        ok = (pa.types.is_binary(t) or pa.types.is_large_binary(t)) if c in MEDIA_COLUMNS else \
            (pa.types.is_string(t) or pa.types.is_large_string(t))
        if not ok:
            want = "binary (the encoded file)" if c in MEDIA_COLUMNS else "string"
            raise InvalidRequestError(f"{path} column {c} is {t}, not {want} (upstream's train_dataset.md)",
                                      param="data")


def _text(path: Path, n: int, value, column: str, required: bool = True) -> Optional[str]:
    if value is None or not value.strip():
        if required:
            raise InvalidRequestError(f"{path} row{n:06d}: empty {column}", param="data")
        return None
    return value


def _after_newline(text: Optional[str]) -> Optional[str]:
    """A text the template puts right after a line break ("system\n", "assistant\n"), without leading white space
    when that holds a line break: upstream tokenizes the rendered template as a whole, where such breaks would merge
    with the template's (and its "assistant\n" search then fails and the row is skipped); other text stays as is."""
    if text is None:
        return None
    head = text[:len(text) - len(text.lstrip())]
    return text.lstrip() if ("\n" in head or "\r" in head) else text


def read_parquet(path, task: str) -> List[Dict]:
    """Rows of an upstream-format local parquet file as dicts (name, text, media, target, question, system), media
    as bytes: `media` is the t2i / t2v target, the edit source or the understanding input. Generation captions are
    stripped (upstream's TextCleaner); understanding texts are kept as written, as upstream renders them (its x2t
    reader cleans none of caption_i / caption_q / caption_a), but for line breaks at the start of caption_i /
    caption_a (`_after_newline`)."""
    path = Path(path)
    if task not in PARQUET_COLUMNS:
        raise InvalidRequestError(f"parquet data is supported for {', '.join(PARQUET_COLUMNS)}, not {task}",
                                  param="data")
    pq, schema = _schema(path)
    cols = PARQUET_COLUMNS[task]
    missing = [c for c in cols if c not in schema.names]
    if missing:
        raise InvalidRequestError(f"{path} lacks the column(s) {', '.join(missing)} (the {task} parquet format needs "
                                  f"{', '.join(cols)}, as upstream's train_dataset.md)", param="data")
    _check_types(path, schema, cols)
    try:
        rows = pq.read_table(str(path), columns=list(cols)).to_pylist()
    except Exception as e:
        raise InvalidRequestError(f"{path} is not a readable parquet file ({e})", param="data") from None
    out = []
    for n, row in enumerate(rows):
        name = f"row{n:06d}"
        media = [c for c in cols if c in MEDIA_COLUMNS and not row[c]]
        if media:
            raise InvalidRequestError(f"{path} {name}: nothing in {', '.join(media)}", param="data")
        files = [bytes(row[c]) for c in cols if c in MEDIA_COLUMNS]
        if task in UNDERSTANDING_TASKS:
            # upstream: caption_q "" means no question; an empty caption_i falls back to our default prompts
            out.append(dict(name=name, text=_after_newline(_text(path, n, row["caption_a"], "caption_a")),
                            media=files[0], question=row["caption_q"] or None,
                            system=_after_newline(_text(path, n, row["caption_i"], "caption_i", required=False))))
            continue
        text = _text(path, n, row["caption"], "caption").strip()
        out.append(dict(name=name, text=text, media=files[0], target=files[1] if task in EDIT_TASKS else None))
    return out


__all__ = ["PARQUET_COLUMNS", "read_parquet"]

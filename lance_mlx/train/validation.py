"""Validation outputs of a training run: one step's images side by side in a grid, saved like every output."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from ..media import SOFTWARE, save_image


def image_grid(images: Sequence[Image.Image], columns: Optional[int] = None) -> Image.Image:
    """The images in order, row by row (`columns` per row, default ceil(sqrt(n))), each centred in a cell as large as
    the largest image; black around images smaller than their cell. At least one image."""
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cw, ch = max(im.width for im in images), max(im.height for im in images)
    grid = Image.new("RGB", (cols * cw, rows * ch))
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        grid.paste(im.convert("RGB"), (c * cw + (cw - im.width) // 2, r * ch + (ch - im.height) // 2))
    return grid


def save_validation_grid(images: Sequence[Image.Image], prompts: Sequence[str], path, step: int) -> Path:
    """One step's validation images as one PNG (prompts in order, listed in its metadata), written atomically; an
    earlier grid of this run under that name (a resumed run repeating the step) is replaced, nothing else is."""
    meta = {"software": SOFTWARE, "step": str(step), "prompts": json.dumps(list(prompts), ensure_ascii=False)}
    return save_image(image_grid(images), Path(path), meta, replace=True)


__all__ = ["image_grid", "save_validation_grid"]

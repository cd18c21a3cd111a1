"""Admission by memory: each generation and understanding request's estimated peak (lance_mlx/memory_estimate.py)
checked against the server's memory budget before it is queued, so a request inside the count limits that cannot
fit is a 400 naming what would fit, not a crashed or killed server."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

from .. import memory_estimate as M
from ..errors import LanceError
from .fields import ApiError
from .jobs import FULL_TASK
from .settings import ServerConfig

NO_VIT_TASKS = ("t2i", "t2v", "i2v")  # tasks whose estimate leaves the ViT out; the server's pipeline holds it
# The request field a refusal names when no smaller variant fits, per task.
INPUT_FIELD = {"t2i": "size", "t2v": "size", "i2v": "resolution", "image_edit": "image", "video_edit": "video",
               "x2t_image": "messages", "x2t_video": "messages"}


class Admission:
    """The budget and the loading options of one server, fixed at start (before any model is resident)."""

    def __init__(self, config: ServerConfig):
        self.source = "--max-memory"
        if config.max_memory is not None:
            self.budget: Optional[int] = config.max_memory
        elif M.skip_requested():
            self.budget, self.source = None, f"off ({M.SKIP_ENV})"
        else:
            self.budget = M.available_memory_bytes()
            self.source = M.AVAILABLE_ENV if os.environ.get(M.AVAILABLE_ENV) else "available at start"
        self.options: Dict[str, M.MemoryOptions] = {}
        if self.budget is not None:  # built now, before the worker runs: the lazy model build uses MLX
            self.options = {kind: _options(config, kind) for kind in FULL_TASK}
        # What /health shows: the budget, where it comes from, and each checkpoint's weights as loaded.
        self.summary: Dict[str, Any] = {"budget_bytes": self.budget, "source": self.source, "weights_bytes": {
            k: _resident_weights(o) for k, o in self.options.items()}}

    def peak(self, request, kind: str) -> int:
        """Estimated peak of `request` on this server: memory_estimate's, plus the ViT's weights for the tasks whose
        own estimate leaves them out (the server loads every component of a checkpoint, jobs.FULL_TASK)."""
        options = self.options[kind]
        extra = M.weight_bytes(options).vit if request.task in NO_VIT_TASKS else 0
        return M.estimate_peak_bytes(request, options) + extra

    def check(self, request, resident: Optional[str] = None) -> Optional[int]:
        """The estimate, or ApiError 400 naming the field to change and the largest value that fits. Blocking
        (tens of estimates for the suggestion): call it off the event loop."""
        if self.budget is None:
            return None
        kind = request.checkpoint or resident or "image"  # understanding runs on the resident checkpoint
        need = self.peak(request, kind)
        if need <= self.budget:
            return need
        found = M.largest_fitting(request, lambda r: self.peak(r, kind) <= self.budget)
        message = (f"this {request.task} request needs about {need / M.GIB:.1f} GiB of memory (estimate, "
                   f"docs/memory.md) and this server's budget is {self.budget / M.GIB:.1f} GiB ({self.source}); ")
        if found is None:
            param = INPUT_FIELD.get(request.task, "prompt")
            floor = _resident_weights(self.options[kind]) / M.GIB
            message += (f"no smaller {param} fits (the model's weights alone take {floor:.1f} GiB); send a smaller "
                        "input or start the server with more memory")
        else:
            param, smaller = found
            value = {"num_frames": lambda r: r.num_frames, "resolution": lambda r: r.resolution,
                     "size": lambda r: f"{r.width}x{r.height}"}[param](smaller)
            message += f"{param} {value} would fit"
        raise ApiError(400, message, param=param, code="insufficient_memory")


def _resident_weights(options: M.MemoryOptions) -> int:
    w = M.weight_bytes(options)
    return w.llm + w.vit + w.vae


def _options(config: ServerConfig, kind: str) -> M.MemoryOptions:
    """The server's loading options (dtype, compute dtype; no low-memory mode, no und quantization) with the
    geometry of a local folder; a hub id not on disk yet is estimated as the full-size model (nothing is
    downloaded here)."""
    model = config.model_for(kind)
    if not Path(model).expanduser().exists():
        return M.MemoryOptions(config.dtype, config.compute_dtype)
    args = SimpleNamespace(model=model, dtype=config.dtype, compute_dtype=config.compute_dtype, low_memory=False,
                           und_bits=None)
    try:
        return M.options_for_model(args, FULL_TASK[kind])
    except LanceError:  # a folder without this checkpoint: its jobs fail when loading, with that error
        return M.MemoryOptions(config.dtype, config.compute_dtype)

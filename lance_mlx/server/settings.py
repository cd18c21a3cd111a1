"""Server settings: the model to serve, where outputs and history go, and the limits every request is held to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

from ..checkpoints import UPSTREAM_REPO
from ..tasks import MAX_FRAMES

if TYPE_CHECKING:
    from ..enhance import Enhancer

# Our serving limits (none are upstream's): they bound what one request may cost before it reaches the queue.
MAX_BODY_MB = 64  # a request body: a few input images or a short video as data URLs or uploads
MAX_STEPS = 100  # upstream samples 30 steps; more rarely helps and blocks the one worker for long
MAX_PIXELS = 1024 * 1024  # width x height of an output (a bound on a server's work; the model's is tasks.check_size)
MAX_IMAGES = 4  # `n` of one image request
MAX_QUEUE = 16  # jobs waiting behind the running one
HISTORY_PAGE = 100  # default and largest page of GET /v1/videos and /v1/jobs


@dataclass(frozen=True)
class ServerConfig:
    """What `serve.py` passes to `create_app`. `model` is a folder or hub id holding the image checkpoint (the
    upstream root holds both); `video_model` one with the video checkpoint (default: `model`)."""

    model: str = UPSTREAM_REPO
    video_model: Optional[str] = None
    output_dir: Path = Path("lance-outputs")
    dtype: str = "bfloat16"
    compute_dtype: Optional[str] = None  # the LLM's activations (None: dtype)
    loras: tuple = ()  # "PATH[:SCALE]" LoRA adapters applied to every checkpoint loaded (docs/training.md)
    api_key: Optional[str] = None
    host: str = "127.0.0.1"  # the address it listens on: its Host names are allowed (guard.allowed_hosts)
    allowed_hosts: Tuple[str, ...] = ()  # more Host names to answer to (--allow-host), "*" for any
    max_queue: int = MAX_QUEUE
    allow_local_files: bool = False
    max_body_bytes: int = MAX_BODY_MB * 2**20
    max_steps: int = MAX_STEPS
    max_pixels: int = MAX_PIXELS
    max_frames: int = MAX_FRAMES
    max_images: int = MAX_IMAGES
    # what rewrites prompts of requests with enhance_prompt (serve.py --enhance-endpoint / --enhance-model);
    # None: upstream's LANCE_REWRITE_* variables as each job runs, else the loaded checkpoint
    enhancer: Optional["Enhancer"] = None
    max_memory: Optional[int] = None  # bytes a job may peak at (server/admission.py); None: available at start

    def model_for(self, kind: str) -> str:
        """The folder or repo id to load the `kind` ("image" / "video") checkpoint from."""
        return (self.video_model or self.model) if kind == "video" else self.model

    @property
    def outputs(self) -> Path:
        return Path(self.output_dir) / "outputs"

    @property
    def scratch(self) -> Path:
        """Where uploaded videos are decoded from (each file removed once read; the folder emptied on start)."""
        return self.outputs / ".lance-inputs"

    @property
    def database(self) -> Path:
        return Path(self.output_dir) / "history.sqlite3"

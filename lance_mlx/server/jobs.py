"""The one model worker: a bounded queue of jobs run in arrival order, step events, cancellation, one resident model."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from .. import checkpoints
from ..config import MAX_SEED
from ..errors import InvalidRequestError, InvalidTypeError, LanceError
from ..media import SOFTWARE, check_free_space, estimate_output_bytes
from ..tasks import ImageEdit, Request, TextToImage, Understand
from .history import History
from .settings import ServerConfig

log = logging.getLogger("lance_mlx.server")

# The task each checkpoint is loaded for: the one needing every component (tokenizer, ViT, VAE), so one load serves
# every task of that checkpoint (checkpoints.TASKS).
FULL_TASK = {"image": "image_edit", "video": "video_edit"}
STOPPED = "the server stopped before this job could finish"
DENOISE_SHARE = 95  # progress (percent) reached when the last denoising step is done; decoding takes the rest


class Cancelled(Exception):
    """Raised in the worker when a job's cancel flag is seen between steps."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the job queue is full")
        self.retry_after = retry_after


class EventLog:
    """A job's events, appended by the worker thread and followed by any number of async readers."""

    def __init__(self):
        self._events: List[Dict[str, Any]] = []
        self._closed = False
        self._lock = threading.Lock()
        self._waiters: list = []  # (event loop, asyncio.Event) of readers waiting for more

    def emit(self, event: Dict[str, Any], final: bool = False) -> None:
        with self._lock:
            self._events.append(event)
            self._closed = self._closed or final
            waiters, self._waiters = self._waiters, []
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that reader's loop has closed
                pass

    async def follow(self, start: int = 0, heartbeat: Optional[float] = None
                     ) -> AsyncIterator[Optional[Dict[str, Any]]]:
        """Every event from index `start`, then each new one as it comes, until the final one. With `heartbeat`,
        None is yielded after that many seconds without an event (a reader can keep its connection alive)."""
        i = start
        while True:
            ready = None
            with self._lock:
                batch, closed = self._events[i:], self._closed
                if not batch and not closed:
                    ready = asyncio.Event()
                    self._waiters.append((asyncio.get_running_loop(), ready))
            for event in batch:
                yield event
            i += len(batch)
            if ready is not None:
                try:
                    await asyncio.wait_for(ready.wait(), heartbeat)
                except asyncio.TimeoutError:
                    yield None
            elif closed and not batch:
                return


@dataclass
class Job:
    """One request on its way through the queue; `record()` is what the history keeps of it."""

    object: str  # "image", "video" or "chat.completion"
    request: Request
    settings: Dict[str, Any]
    model: str
    n: int = 1
    id: str = ""
    status: str = "queued"
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    started_at: Optional[int] = None
    completed_at: Optional[int] = None
    outputs: List[str] = field(default_factory=list)
    error: Optional[Dict[str, Any]] = None
    answer: Optional[str] = None
    usage: Optional[Dict[str, int]] = None
    finish_reason: Optional[str] = None
    events: EventLog = field(default_factory=EventLog)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        if not self.id:
            self.id = {"image": "img_", "video": "video_"}.get(self.object, "chatcmpl-") + uuid.uuid4().hex

    @property
    def task(self) -> str:
        return self.request.task

    def record(self) -> Dict[str, Any]:
        return {"id": self.id, "object": self.object, "task": self.task, "status": self.status,
                "progress": self.progress, "created_at": self.created_at, "started_at": self.started_at,
                "completed_at": self.completed_at, "model": self.model, "prompt": self.request.text,
                "settings": self.settings, "outputs": list(self.outputs), "error": self.error, "answer": self.answer}


def default_loader(config: ServerConfig) -> Callable[[str], Any]:
    """kind ("image" / "video") -> LancePipeline with every component of that checkpoint."""

    def load(kind: str):
        from ..pipeline import LancePipeline

        return LancePipeline.from_pretrained(config.model_for(kind), task=FULL_TASK[kind], dtype=config.dtype,
                                             compute_dtype=config.compute_dtype, loras=config.loras)

    return load


class Engine:
    """Owns the model and runs jobs one at a time on its own thread; the HTTP layer only submits, reads, cancels."""

    def __init__(self, config: ServerConfig, history: History, loader: Optional[Callable[[str], Any]] = None):
        self.config, self.history = config, history
        self._load = loader or default_loader(config)
        self._pending: collections.deque = collections.deque()
        self._active: Dict[str, Job] = {}
        self._cond = threading.Condition()
        self._tokenizers: Dict[str, Any] = {}  # kind -> the HTTP side's tokenizer (None: not available yet)
        self._tokenizer_lock = threading.Lock()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._pipe = None
        self.resident: Optional[str] = None  # "image" / "video": the checkpoint in memory
        self.running: Optional[Job] = None
        self._seconds_per_job = 10.0  # running mean of job durations, for Retry-After

    # ------------------------------------------------------------------------------------------ HTTP side
    def start(self) -> None:
        # Import the model stack now, before the server answers: a first import (mlx, transformers) holds the GIL
        # for seconds, which would stall every route if it happened in the worker while requests come in.
        from transformers import AutoTokenizer  # noqa: F401  (loading.load_tokenizer imports it late)

        from .. import lance, pipeline, torch_checkpoint, vae_wan22, vit  # noqa: F401

        for kind in ("image", "video"):  # the HTTP side's tokenizers, built now rather than in a request (~1 s each)
            self._text_tokenizer(kind)
        self._thread = threading.Thread(target=self._loop, name="lance-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            if self.running is not None:
                self.running.cancel_flag.set()
            self._cond.notify_all()
        for job in left:
            self._finish(job, "failed", {"code": "server_stopped", "message": STOPPED})
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        self.check_text(job)
        with self._cond:
            if self._stopping:
                raise QueueFull(self.retry_after())
            if len(self._pending) >= self.config.max_queue:
                raise QueueFull(self.retry_after())
            self.history.add(job.record())
            self._pending.append(job)
            self._active[job.id] = job
            job.events.emit({"type": "queued", "position": len(self._pending)})
            self._cond.notify_all()
        return job

    def check_text(self, job: Job) -> None:
        """Refuse text over the token limit before the job is queued (a 400, not a failed job). Counted with a
        tokenizer of the checkpoint's own (the worker's is not shared across threads), built once per checkpoint;
        a hub id not downloaded yet is left to the worker, which checks the text when it loads the model."""
        from ..pipeline import count_text_tokens

        request = job.request
        if request.text is None:
            return
        tokenizer = self._text_tokenizer(request.checkpoint or self.resident or "image")
        if tokenizer is None:
            return
        try:
            count_text_tokens(tokenizer, request)
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), e.param or _text_param(job)) from None

    def _text_tokenizer(self, kind: str):
        from ..loading import load_tokenizer

        with self._tokenizer_lock:
            if kind not in self._tokenizers:
                model = self.config.model_for(kind)
                try:
                    local = Path(model).expanduser().exists()
                    files = checkpoints.resolve(model, FULL_TASK[kind]) if local else None
                    self._tokenizers[kind] = files and load_tokenizer(files.tokenizer_dir, shared=False)
                except LanceError:
                    self._tokenizers[kind] = None
            return self._tokenizers[kind]

    def retry_after(self) -> int:
        return max(1, math.ceil(self._seconds_per_job))

    def active(self, job_id: str) -> Optional[Job]:
        return self._active.get(job_id)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def position(self, job: Job) -> int:
        """1 for the next job to run, 0 when not queued."""
        with self._cond:
            try:
                return self._pending.index(job) + 1
            except ValueError:
                return 0

    def cancel(self, job_id: str) -> Optional[Job]:
        """Cancel a queued job now, a running one at its next step; None if the job is not queued or running."""
        with self._cond:
            job = self._active.get(job_id)
            if job is None:
                return None
            if job in self._pending:
                self._pending.remove(job)
                self._announce_positions()
            else:
                job.cancel_flag.set()
                return job
        self._finish(job, "cancelled", None)
        return job

    # ---------------------------------------------------------------------------------------- worker side
    def _announce_positions(self) -> None:
        for i, queued in enumerate(self._pending):
            queued.events.emit({"type": "queued", "position": i + 1})

    def _loop(self) -> None:
        import mlx.core as mx

        # MLX streams belong to the thread that made them (since MLX 0.31.2 the main thread's default stream cannot
        # be used here: "There is no Stream(gpu, 0) in current thread"), so the worker runs on one of its own.
        with mx.stream(mx.new_stream(mx.default_device())):
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                self.running = job
                self._announce_positions()
            t0 = time.perf_counter()
            try:
                self._run(job)
            finally:
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.perf_counter() - t0)
                with self._cond:
                    self.running = None

    def _run(self, job: Job) -> None:
        job.status, job.started_at = "in_progress", int(time.time())
        self.history.update(job.id, status=job.status, started_at=job.started_at)
        job.events.emit({"type": "started"})
        try:
            if job.cancel_flag.is_set():
                raise Cancelled
            if isinstance(job.request, Understand):
                self._answer(job)
            else:
                self._generate(job)
        except Cancelled:
            if self._stopping:
                return self._finish(job, "failed", {"code": "server_stopped", "message": STOPPED})
            return self._finish(job, "cancelled", None)
        except LanceError as e:
            code = "invalid_request" if isinstance(e, (InvalidRequestError, InvalidTypeError)) else _snake(e)
            param = e.param
            if param is None and "tokens long" in str(e):  # the text, counted with the model's tokenizer
                param = _text_param(job)
            return self._finish(job, "failed", {"code": code, "message": str(e), "param": param})
        except Exception as e:  # a bug or an environment failure: keep the server up, record it on the job
            log.exception("job %s failed", job.id)
            return self._finish(job, "failed", {"code": "internal_error", "message": f"{type(e).__name__}: {e}"})
        self._finish(job, "completed", None)

    def _finish(self, job: Job, status: str, error: Optional[Dict[str, Any]]) -> None:
        job.status, job.error, job.completed_at = status, error, int(time.time())
        if status == "completed":
            job.progress = 100
        self.history.update(job.id, status=status, error=error, completed_at=job.completed_at,
                            progress=job.progress, outputs=job.outputs, answer=job.answer)
        with self._cond:
            self._active.pop(job.id, None)
        job.events.emit({"type": "done", "status": status, "progress": job.progress, "error": error,
                         "outputs": list(job.outputs)}, final=True)
        job.done.set()

    def _pipeline(self, kind: str, task: str):
        if self._pipe is not None and (self.resident == kind or task.startswith("x2t")):
            return self._pipe  # understanding runs on either checkpoint (pipeline.check_checkpoint)
        import mlx.core as mx

        self._pipe, self.resident = None, None  # at most one checkpoint in memory: free it before loading
        gc.collect()
        mx.clear_cache()
        self._pipe, self.resident = self._load(kind), kind
        return self._pipe

    def _check_cancel(self, job: Job) -> None:
        if job.cancel_flag.is_set():
            raise Cancelled

    def _generate(self, job: Job) -> None:
        from ..config import OUTPUT_FPS

        request = job.request
        job.events.emit({"type": "loading", "checkpoint": request.checkpoint})
        pipe = self._pipeline(request.checkpoint, request.task)
        steps = request.sampling.steps
        image = isinstance(request, (TextToImage, ImageEdit))
        fps = getattr(request, "fps", OUTPUT_FPS)
        for i in range(job.n):
            r = request if i == 0 else dataclasses.replace(
                request, sampling=request.sampling.replace(seed=(request.sampling.seed + i) % MAX_SEED))
            self._check_cancel(job)
            job.events.emit({"type": "prepare", "index": i})
            plan = pipe.plan(r)
            t, h, w = plan.latent_shape
            name = f"{job.id}-{i}.png" if image else f"{job.id}-{i}.mp4"
            path = self.config.outputs / name
            check_free_space(path, estimate_output_bytes(path, 16 * w, 16 * h, 4 * (t - 1) + 1))  # before the work
            latents = None
            for step in pipe.denoise(plan):
                done = i * steps + step.index
                job.progress = int(DENOISE_SHARE * done / (job.n * steps))
                job.events.emit({"type": "step", "index": i, "step": step.index, "total": step.total,
                                 "progress": job.progress})
                self._check_cancel(job)
                latents = step.latents
            job.events.emit({"type": "decode", "index": i})
            meta = {"prompt" if r.text_field == "prompt" else "instruction": r.text, "task": r.task,
                    "width": 16 * w, "height": 16 * h, **r.sampling.as_metadata(), "model": job.model,
                    "dtype": self.config.dtype, "job": job.id, "software": SOFTWARE}
            if not image:
                meta.update(frames=4 * (t - 1) + 1, fps=fps)
            self.config.outputs.mkdir(parents=True, exist_ok=True)
            pipe.save(latents.reshape(1, t, h, w, -1), path, fps=fps, metadata=meta)
            job.outputs.append(name)
            self.history.update(job.id, outputs=job.outputs)

    def _answer(self, job: Job) -> None:
        request = job.request
        job.events.emit({"type": "loading", "checkpoint": request.checkpoint})
        pipe = self._pipeline(request.checkpoint, request.task)
        stream = pipe.answer(request)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            job.events.emit({"type": "text", "delta": piece})
            self._check_cancel(job)
        r = stream.result
        job.answer = r.text if r is not None else "".join(pieces)
        job.finish_reason = r.finish_reason if r is not None else "stop"
        prompt_tokens = r.prompt_tokens if r is not None else 0
        completion = r.generated_tokens if r is not None else len(pieces)
        job.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion}


def _text_param(job: Job) -> str:
    """The request field that holds a job's text, as the API names it."""
    return "messages" if job.object == "chat.completion" else "prompt"


def _snake(e: Exception) -> str:
    name = type(e).__name__.replace("Error", "")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") + "_error"

"""The one model worker: a bounded queue of jobs run in arrival order, step events, cancellation, one resident model."""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import math
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .. import checkpoints
from ..config import MAX_SEED
from ..errors import InvalidRequestError, InvalidTypeError, LanceError, OutputError
from ..media import SOFTWARE, check_free_space, estimate_output_bytes
from ..tasks import ImageEdit, Request, TextToImage, Understand
from .history import History, StorageError, out_of_space, storage_error, storage_reason
from .job import EventLog, Job  # noqa: F401  (EventLog: re-exported for the routes and tests)
from .redact import redact
from .settings import ServerConfig

log = logging.getLogger("lance_mlx.server")

# The task each checkpoint is loaded for: the one needing every component (tokenizer, ViT, VAE), so one load serves
# every task of that checkpoint (checkpoints.TASKS).
FULL_TASK = {"image": "image_edit", "video": "video_edit"}
STOPPED = "the server stopped before this job could finish"
DENOISE_SHARE = 95  # progress (percent) reached when the last denoising step is done; decoding takes the rest
OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}  # an image job's output_format -> its file
MAX_UNSAVED = 1000  # finished jobs kept in memory while the history cannot be written
MIN_FREE_BYTES = 8 * 2**20  # a degraded server takes jobs again once its output disk has this much free
PREVIEW_INTERVAL_S = 1.0  # at most one `preview` event a second (each a small JPEG, ~10-30 kB)
PREVIEW_MAX_SIDE = 384  # longest side of a preview event's image, in pixels


class Cancelled(Exception):
    """Raised in the worker when a job's cancel flag is seen between steps."""


class Unavailable(Exception):
    """New jobs are refused: the history database or the output disk failed (`reason` says how)."""

    def __init__(self, reason: Dict[str, str]):
        super().__init__(reason["message"])
        self.reason = reason


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the job queue is full")
        self.retry_after = retry_after


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
        self.degraded: Optional[Dict[str, str]] = None  # {code, message} of the last storage failure, until it heals
        self._unsaved: Dict[str, Job] = {}  # finished jobs whose final state the history could not take yet

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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> Optional[Dict[str, str]]:
        """None when jobs can run, else {code, message}: a storage failure not healed yet (probed again now: a freed
        disk is seen without a restart) or a dead worker. Blocking (a database write): call it off the event loop."""
        if self._thread is not None and not self.alive and not self._stopping:
            return {"code": "worker_stopped", "message": "the model worker has stopped; restart the server"}
        if self.degraded is not None:
            try:
                self.history.probe()
                self.config.outputs.mkdir(parents=True, exist_ok=True)
                if shutil.disk_usage(self.config.outputs).free < MIN_FREE_BYTES:
                    raise StorageError(f"the output disk has less than {MIN_FREE_BYTES // 2**20} MiB free; free "
                                       "some space", "storage_full")
            except StorageError as e:
                self.degraded = {"code": e.code, "message": str(e)}
            except OSError as e:
                self.degraded = storage_reason(storage_error(e, "checking the output folder"))
            else:
                log.warning("storage works again: taking jobs")
                self.degraded = None
                self._save_unsaved()
        return self.degraded

    def _save_unsaved(self) -> None:
        for job in list(self._unsaved.values()):
            try:
                self._save_final(job)
            except StorageError:
                return
            self._unsaved.pop(job.id, None)

    def submit(self, job: Job) -> Job:
        """Queue a job (QueueFull when the queue is full, Unavailable while storage fails). Blocking (a database
        write): call it off the event loop."""
        reason = self.health()
        if reason is not None:
            raise Unavailable(reason)
        with self._cond:
            if self._stopping:
                raise QueueFull(self.retry_after())
            if len(self._pending) >= self.config.max_queue:
                raise QueueFull(self.retry_after())
            try:
                self.history.add(job.record())
            except StorageError as e:
                self.degraded = storage_reason(e)
                raise Unavailable(self.degraded) from None
            self._pending.append(job)
            self._active[job.id] = job
            job.events.emit({"type": "queued", "position": len(self._pending)})
            self._cond.notify_all()
        return job

    def check_text(self, job: Job) -> None:
        """Refuse text over the token limit before the job is queued (a 400, not a failed job): each text of the
        request (prompt, question, system prompt) counted alone and together. Counted with a tokenizer of the
        checkpoint's own (the worker's is not shared across threads), built once per checkpoint, used by one thread
        at a time; a hub id not downloaded yet is left to the worker, which checks the text when it loads the model.
        Blocking (seconds for long texts): call it off the event loop."""
        from ..tasks import check_token_count

        request = job.request
        texts = [t for t in (job.texts or (request.text, getattr(request, "system_prompt", None))) if t]
        if not texts:
            return
        tokenizer = self._text_tokenizer(request.checkpoint or self.resident or "image")
        if tokenizer is None:
            return
        param = _text_param(job)
        with self._tokenizer_lock:
            counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        try:
            check_token_count(sum(counts), "chat's text (every message's text together)" if len(texts) > 1
                              else request.text_field if request.text else "system prompt")
        except InvalidRequestError as e:
            raise InvalidRequestError(str(e), param) from None

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
        """A queued or running job, or a finished one the history has not taken yet (its disk was full)."""
        return self._active.get(job_id) or self._unsaved.get(job_id)

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
        """Run jobs until stopped. Nothing a job does can end this loop: every failure ends that job (its stream
        closed with an error event), and the next job runs."""
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
            except BaseException as e:  # noqa: BLE001  a bug in the error handling itself: the job still ends
                log.exception("job %s ended abnormally", job.id)
                self._finish(job, "failed", {"code": "internal_error", "message": type(e).__name__})
            finally:
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.perf_counter() - t0)
                with self._cond:
                    self.running = None

    def _run(self, job: Job) -> None:
        try:
            job.status, job.started_at = "in_progress", int(time.time())
            self.history.update(job.id, status=job.status, started_at=job.started_at)
            job.events.emit({"type": "started"})
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
        except StorageError as e:
            self.degraded = storage_reason(e)
            return self._finish(job, "failed", self.degraded)
        except OutputError as e:  # a write that hit a full disk degrades the server; a refused estimate does not
            if out_of_space(e):
                self.degraded = storage_reason(storage_error(e, "writing the output"))
                return self._finish(job, "failed", self.degraded)
            return self._finish(job, "failed", {"code": _snake(e), "message": str(e), "param": e.param})
        except LanceError as e:  # before OSError: a missing input or weights file is the request's / setup's
            code = "invalid_request" if isinstance(e, (InvalidRequestError, InvalidTypeError)) else _snake(e)
            param = e.param
            if param is None and "tokens long" in str(e):  # the text, counted with the model's tokenizer
                param = _text_param(job)
            return self._finish(job, "failed", {"code": code, "message": str(e), "param": param})
        except OSError as e:  # the disk failed under a write that is not ours to wrap (decoder, cache)
            if out_of_space(e):
                self.degraded = storage_reason(storage_error(e, "writing the output"))
                return self._finish(job, "failed", self.degraded)
            log.exception("job %s failed", job.id)
            return self._finish(job, "failed", {"code": "internal_error", "message": type(e).__name__})
        except Exception as e:  # a bug or an environment failure: keep the server up, record it on the job
            log.exception("job %s failed", job.id)
            return self._finish(job, "failed", {"code": "internal_error", "message": type(e).__name__})
        self._finish(job, "completed", None)

    def _finish(self, job: Job, status: str, error: Optional[Dict[str, Any]]) -> None:
        """End a job: history, then its final event. Always ends the job's event stream, even when the history
        cannot be written (the job then fails with the storage error and keeps no outputs)."""
        if status != "completed":
            self._drop_outputs(job)  # a cancelled or failed job keeps nothing (n > 1: its first images too)
        if error is not None:
            error = {**error, "message": redact(str(error.get("message", "")))}
        job.status, job.error, job.completed_at = status, error, int(time.time())
        if status == "completed":
            job.progress = 100
        try:
            self._save_final(job)
        except StorageError as e:
            self.degraded = storage_reason(e)
            self._drop_outputs(job)
            job.status, job.error = "failed", self.degraded
            if len(self._unsaved) < MAX_UNSAVED:
                self._unsaved[job.id] = job  # still shown (as failed) until the history can take it
        finally:
            with self._cond:
                self._active.pop(job.id, None)
            job.events.emit({"type": "done", "status": job.status, "progress": job.progress, "error": job.error,
                             "outputs": list(job.outputs)}, final=True)
            job.done.set()

    def _save_final(self, job: Job) -> None:
        self.history.update(job.id, status=job.status, error=job.error, completed_at=job.completed_at,
                            progress=job.progress, outputs=job.outputs, answer=job.answer)

    def _drop_outputs(self, job: Job) -> None:
        for name in job.outputs:
            (self.config.outputs / name).unlink(missing_ok=True)
        job.outputs = []

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
        if job.settings.get("enhance_prompt"):
            request = self._enhance(job, pipe)  # job.request keeps the prompt as asked
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
            suffix = OUTPUT_FORMATS[job.settings.get("output_format", "png")] if image else ".mp4"
            name = f"{job.id}-{i}{suffix}"
            path = self.config.outputs / name
            check_free_space(path, estimate_output_bytes(path, 16 * w, 16 * h, 4 * (t - 1) + 1))  # before the work
            latents, last_preview = None, -math.inf
            for step in pipe.denoise(plan):
                done = i * steps + step.index
                job.progress = int(DENOISE_SHARE * done / (job.n * steps))
                job.events.emit({"type": "step", "index": i, "step": step.index, "total": step.total,
                                 "progress": job.progress})
                if job.preview and time.monotonic() - last_preview >= PREVIEW_INTERVAL_S:
                    last_preview = time.monotonic()
                    from ..preview import step_preview_url  # mlx: imported by the worker, not the HTTP side

                    image = step_preview_url(step, PREVIEW_MAX_SIDE)
                    job.events.emit({"type": "preview", "index": i, "step": step.index, "image": image})
                self._check_cancel(job)
                latents = step.latents
            job.events.emit({"type": "decode", "index": i})
            meta = {"prompt" if r.text_field == "prompt" else "instruction": r.text, "task": r.task,
                    "width": 16 * w, "height": 16 * h, **r.sampling.as_metadata(), "model": job.model,
                    "dtype": self.config.dtype, "job": job.id, "software": SOFTWARE}
            if not image:
                meta.update(frames=4 * (t - 1) + 1, fps=fps)
            meta.update({k: job.settings[k] for k in ("negative_prompt", "revised_prompt") if k in job.settings})
            if "revised_prompt" in job.settings:  # the prompt as asked, beside the one generated from
                meta["prompt"] = job.settings["prompt"]
            self.config.outputs.mkdir(parents=True, exist_ok=True)
            self._save(job, pipe, latents.reshape(1, t, h, w, -1), path, fps, meta)
            job.outputs.append(name)
            self.history.update(job.id, outputs=job.outputs)

    def _save(self, job: Job, pipe, latents, path: Path, fps: float, meta: Dict[str, Any]) -> None:
        """Decode and write one output (pipeline.save's two paths), a video checked for cancel between VAE chunks:
        a cancel during a long decode stops it there, and media's atomic write leaves nothing behind."""
        from PIL import Image

        from ..media import IMAGE_SUFFIXES, save_image, save_video

        if latents.shape[1] == 1 and path.suffix in IMAGE_SUFFIXES:
            save_image(Image.fromarray(pipe.decode(latents)[0]), path, meta)
            return

        def frames():
            for frame in pipe.iter_frames(latents):
                self._check_cancel(job)
                yield frame

        save_video(frames(), path, fps=fps, metadata=meta)

    def _enhance(self, job: Job, pipe) -> Request:
        """The job's request with its prompt rewritten (docs/steering.md) by the server's enhancer (serve.py
        --enhance-endpoint, else upstream's LANCE_REWRITE_* variables, else the loaded checkpoint); kept in the job's
        settings. With enhance_prompt "fallback" a failed rewrite is a warning there and the original prompt."""
        from ..enhance import Enhancer, enhance_request

        job.events.emit({"type": "enhance"})
        request, revised, warning = enhance_request(self.config.enhancer or Enhancer.from_env(), job.request,
                                                    job.settings["enhance_prompt"] == "fallback", pipe)
        if revised is not None:
            job.settings["revised_prompt"] = revised
        if warning is not None:
            job.settings["revised_prompt_error"] = warning = redact(warning)
        self.history.update(job.id, settings=job.settings)
        job.events.emit({"type": "enhanced", "revised_prompt": revised, **({"warning": warning} if warning else {})})
        return request

    def _answer(self, job: Job) -> None:
        request = job.request
        job.events.emit({"type": "loading", "checkpoint": request.checkpoint})
        pipe = self._pipeline(request.checkpoint, request.task)
        stream = pipe.answer(request)
        text, sent, stopped = "", 0, False
        hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may span pieces: hold back its length
        for piece in stream:
            text += piece
            if job.stop:
                cut = min((i for i in (text.find(s, max(0, sent - hold)) for s in job.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, stopped = text[:cut], True
            ready = len(text) if stopped else len(text) - hold
            if ready > sent:
                job.events.emit({"type": "text", "delta": text[sent:ready]})
                sent = ready
            self._check_cancel(job)
            if stopped:
                break
        if len(text) > sent:
            job.events.emit({"type": "text", "delta": text[sent:]})
        r = stream.result  # None when a stop string ended the answer early
        job.answer = r.text if r is not None and not job.stop else text
        job.finish_reason = r.finish_reason if r is not None else "stop"
        prompt_tokens = r.prompt_tokens if r is not None else 0
        completion = r.generated_tokens if r is not None else len(pipe.tokenizer(text, add_special_tokens=False)[
            "input_ids"]) if text else 0
        job.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion}


def _text_param(job: Job) -> str:
    """The request field that holds a job's text, as the API names it."""
    return "messages" if job.object == "chat.completion" else "prompt"


def _snake(e: Exception) -> str:
    name = type(e).__name__.replace("Error", "")
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_") + "_error"

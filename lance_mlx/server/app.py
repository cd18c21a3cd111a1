"""FastAPI routes: OpenAI's images, chat and videos APIs, job events and cancel, history, the web page."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoints import IMAGE_LLM_DIR, TASKS, VIDEO_LLM_DIR, checkpoint_kind_for
from ..errors import InvalidRequestError, InvalidTypeError, LanceError
from ..processing import OUTPUT_ASPECT_RATIOS, PRESETS, output_size
from . import chat, schemas, views
from .admission import Admission
from .guard import BodyTooLarge, Guard, Signer, allowed_hosts, form_allowed, too_large
from .history import History, StorageError
from .jobs import Engine, Job, QueueFull, Unavailable
from .lock import OutputLock
from .redact import redact
from .schemas import ApiError, Fields, Parsed, Upload
from .settings import HISTORY_PAGE, ServerConfig

log = logging.getLogger("lance_mlx.server")
STATIC = Path(__file__).parent / "static"
PRESET_RESOLUTIONS = (256, 384, 480, 512, 640, 768, 1024)  # areas offered by the page's aspect-ratio presets
MAX_FORM_FILES, MAX_FORM_FIELDS = 4, 64
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
HEARTBEAT_S = 4.0  # an event stream waiting in the queue sends a comment this often (httpx times out after 5 s)
DISCONNECT_POLL_S = 0.5  # how often a waiting synchronous request checks that its client is still there
MEDIA_WORKERS = 2  # request bodies with media decoded at once (each holds its decoded frames); more wait for a slot
MEDIA_WAIT_S = 30.0  # longest wait for a decoding slot; then 429 with Retry-After
MEDIA_FIELDS = ("image", "image[]", "input_reference", "image_reference", "video")
JSON_ON_LOOP = 2**20  # JSON bodies up to this size are parsed on the event loop; larger ones in a thread
INTERRUPTED = "the server stopped while this job was queued or running (restart, crash or kill)"


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def lance_error(e: LanceError) -> ApiError:
    """A request error of the task layer as a 400; anything else the model raised as a 500."""
    if isinstance(e, (InvalidRequestError, InvalidTypeError)):
        return ApiError(400, str(e), param=e.param, code="invalid_value")
    return ApiError(500, str(e), "server_error", e.param, type(e).__name__)


def create_app(config: ServerConfig, loader: Optional[Callable[[str], Any]] = None,
               lock: Optional[OutputLock] = None) -> FastAPI:
    """The app of one server: its history, worker and routes. `loader(kind)` builds a pipeline (tests pass one).
    `lock`: the output folder's lock, already held by the caller (serve.py takes it before binding its port);
    without it the app takes its own at start-up (FolderInUse when another server holds it)."""
    state: Dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        own = lock is None
        held = lock if lock is not None else OutputLock(config.output_dir).acquire()
        try:
            async with serving():
                yield
        finally:
            if own:
                held.release()

    @contextlib.asynccontextmanager
    async def serving():
        """Only under the folder's lock: clean what a killed server left, then run the worker."""
        config.outputs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(config.scratch, ignore_errors=True)  # scratch copies of uploaded videos
        for prefix in (".img_", ".video_"):  # partial writes of our jobs (media.atomic_output) a killed process left
            for stale in config.outputs.glob(prefix + "*.partial*"):
                stale.unlink(missing_ok=True) if stale.is_file() else shutil.rmtree(stale, ignore_errors=True)
        admission = await run_in_threadpool(Admission, config)  # before the worker starts: no model resident
        history = History(config.database)
        failed = history.fail_interrupted(INTERRUPTED)
        if failed:
            log.warning("marked %d interrupted job(s) failed", failed)
        engine = Engine(config, history, loader)
        engine.start()
        state.update(history=history, engine=engine, admission=admission,
                     media_slots=anyio.CapacityLimiter(MEDIA_WORKERS))
        try:
            yield
        finally:
            engine.stop()
            history.close()

    app = FastAPI(title="lance-mlx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    signer = Signer()
    hosts, any_ip = allowed_hosts(config.host, config.allowed_hosts)
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_body_bytes, hosts=hosts, any_ip_host=any_ip,
                       signer=signer)
    sign = signer.query if config.api_key else None  # a keyed server's output links carry a signature
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -------------------------------------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(LanceError)
    async def _lance_error(request, e: LanceError):
        return _error_response(lance_error(e))

    @app.exception_handler(StorageError)
    async def _storage_error(request, e: StorageError):
        return _error_response(ApiError(507, str(e), "server_error", code=e.code))

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request, e):
        return _error_response(too_large(config.max_body_bytes))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        return _error_response(ApiError(400, f"invalid request: {e.errors()[:1]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(ApiError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))

    # ------------------------------------------------------------------------------------------- helpers
    def job_object(record: Dict[str, Any], position: int = 0) -> Dict[str, Any]:
        return views.job_object(record, position, sign)

    def engine() -> Engine:
        return state["engine"]

    def history() -> History:
        return state["history"]

    async def body(request: Request, form: bool = False) -> Tuple[Fields, Dict[str, Upload]]:
        """The fields of a JSON body, or with `form` (the routes OpenAI takes multipart on, and the page's) of a
        form body that `guard.form_allowed` lets through."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in FORM_TYPES and not form:
            raise ApiError(415, f"this route takes application/json, not {ctype}", code="unsupported_media_type")
        if ctype in FORM_TYPES and not form_allowed(request.headers):
            raise ApiError(403, "form bodies from other web pages are refused: send the form from this server's page, "
                                "or with an Authorization: Bearer header", code="origin_not_allowed")
        if ctype in FORM_TYPES:
            try:
                form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS,
                                          max_part_size=config.max_body_bytes)
            except BodyTooLarge:
                raise
            except Exception as e:  # malformed or truncated multipart: the parser's message says where
                raise ApiError(400, f"malformed form body: {e}") from None
            values, files = {}, {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files[key] = Upload(value.filename or "", value.content_type or "", await value.read())
                else:
                    values[key] = value
            return Fields(values, form=True), files
        if ctype in ("application/json", ""):
            raw = await request.body()
            return (schemas.parse_json(raw) if len(raw) <= JSON_ON_LOOP
                    else await run_in_threadpool(schemas.parse_json, raw)), {}
        raise ApiError(415, f"unsupported content type {ctype!r}: send application/json or multipart/form-data",
                       code="unsupported_media_type")

    def _submit(parsed: Parsed, preview: bool = False) -> Job:
        job = Job(parsed.object, parsed.request, parsed.settings, _model_name(parsed.request.checkpoint),
                  n=parsed.n, texts=parsed.texts, stop=parsed.stop, preview=preview)
        state["admission"].check(job.request, engine().resident)
        engine().check_text(job)
        try:
            return engine().submit(job)
        except QueueFull as e:
            raise ApiError(429, "the job queue is full; retry later", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except Unavailable as e:  # 507 Insufficient Storage: the history or the output disk cannot be written
            status = 503 if e.reason["code"] == "worker_stopped" else 507
            raise ApiError(status, f"this server cannot take jobs now: {e.reason['message']}", "server_error",
                           code=e.reason["code"]) from None

    async def submit(parsed: Parsed, preview: bool = False) -> Job:
        """Check the request's memory, count its text's tokens and queue it, off the event loop (a long text takes
        seconds to count)."""
        return await run_in_threadpool(_submit, parsed, preview)

    async def parse(fn, fields: Fields, files: Dict[str, Upload], *args):
        """`fn(fields, [files,] *args)` off the event loop; a body carrying media (uploads, data URLs, local paths)
        takes one of MEDIA_WORKERS decoding slots, waiting at most MEDIA_WAIT_S for one (then 429)."""
        call = (fn, fields, files, *args) if files is not None else (fn, fields, *args)
        if not _carries_media(fields, files or {}):
            return await run_in_threadpool(*call)
        slots, acquired = state["media_slots"], False
        with anyio.move_on_after(MEDIA_WAIT_S):
            await slots.acquire()
            acquired = True
        if not acquired:
            raise ApiError(429, "the server is busy decoding other uploads; retry later", "rate_limit_error",
                           code="decoders_busy", headers={"Retry-After": str(int(MEDIA_WAIT_S))})
        try:
            return await run_in_threadpool(*call)
        finally:
            slots.release()

    async def finished(job: Job, request: Optional[Request] = None) -> Job:
        """Wait for the job's end; with `request`, cancel the job if its client goes away first (a closed curl or
        a client-side timeout should not keep the model busy for nobody)."""
        async def follow():
            async for _ in job.events.follow():
                pass

        if request is None:
            await follow()
            return job
        done = asyncio.ensure_future(follow())
        while not done.done():
            await asyncio.wait([done], timeout=DISCONNECT_POLL_S)
            if not done.done() and await request.is_disconnected():
                engine().cancel(job.id)
                await done
        return job

    def failure(job: Job) -> ApiError:
        if job.status == "cancelled":
            return ApiError(409, f"job {job.id} was cancelled", code="cancelled")
        err = job.error or {}
        # 507: the output folder's disk is full (media.check_free_space / a failed write); 502: the prompt
        # enhancement endpoint failed (enhance.EnhanceError); else a bug: 500
        status = {"invalid_request": 400, "output_error": 507, "write_error": 507, "storage_full": 507,
                  "storage_error": 507, "enhance_error": 502}.get(err.get("code"), 500)
        return ApiError(status, err.get("message", "the job failed"), "invalid_request_error" if status == 400
                        else "server_error", err.get("param") if status == 400 else None, err.get("code"))

    def record(job_id: str) -> Tuple[Dict[str, Any], int]:
        job = engine().active(job_id)
        if job is not None:
            return job.record(), engine().position(job)
        rec = history().get(job_id)
        if rec is None:
            raise ApiError(404, f"no job {job_id!r}", param="id", code="not_found")
        return rec, 0

    def listing(objects: Optional[tuple], limit: int, after: Optional[str]) -> Dict[str, Any]:
        limit = max(1, min(limit, HISTORY_PAGE))
        rows = history().list(limit + 1, objects, after)
        data = [job_object(r) for r in rows[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}

    # -------------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        e = engine()
        reason = await run_in_threadpool(e.health) if e.degraded or not e.alive else None
        running = e.running
        out = {"status": "ok" if reason is None else "degraded", "resident": e.resident,
               "running": running.id if running else None, "queued": e.queued, "memory": state["admission"].summary}
        if reason is not None:  # 503: a load balancer or supervisor sees that jobs cannot run now, and why
            return JSONResponse({**out, "reason": reason}, status_code=503)
        return out

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    async def models():
        resident = engine().resident
        data = []
        for kind, name in (("image", IMAGE_LLM_DIR), ("video", VIDEO_LLM_DIR)):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "bytedance-research",
                         "root": config.model_for(kind), "checkpoint": kind, "resident": resident == kind,
                         "tasks": [t for t in TASKS if checkpoint_kind_for(t) == kind]})
        return {"object": "list", "data": data, "enhancer": enhancer_info(config)}

    @app.get("/v1/presets")
    async def presets():
        return {"aspect_ratios": list(OUTPUT_ASPECT_RATIOS),
                "buckets": {str(r): {a: dict(zip(("width", "height"), output_size(a, r))) for a in OUTPUT_ASPECT_RATIOS}
                            for r in PRESET_RESOLUTIONS},
                "presets": list(PRESETS),
                "limits": {"max_steps": config.max_steps, "max_pixels": config.max_pixels,
                           "max_frames": config.max_frames, "max_images": config.max_images,
                           "max_body_bytes": config.max_body_bytes, "max_queue": config.max_queue}}

    @app.post("/v1/images/generations")
    async def image_generations(request: Request):
        fields, _ = await body(request)
        parsed = await run_in_threadpool(schemas.image_generation, fields, config)
        return await image_result(parsed, request)

    @app.post("/v1/images/edits")
    async def image_edits(request: Request):
        fields, files = await body(request, form=True)
        parsed = await parse(schemas.image_edit, fields, files, config)
        return await image_result(parsed, request)

    async def image_result(parsed: Parsed, request: Request):
        job = await finished(await submit(parsed), request)
        if job.status != "completed":
            raise failure(job)
        return await run_in_threadpool(views.images_response, job, config, parsed.response_format,
                                       str(request.base_url), sign)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        fields, _ = await body(request)
        parsed = await parse(chat.chat, fields, None, config)
        include_usage = isinstance(fields.values.get("stream_options"), dict) and bool(
            fields.values["stream_options"].get("include_usage"))
        job = await submit(parsed)
        if not parsed.stream:
            await finished(job, request)
            if job.status != "completed":
                raise failure(job)
            return views.chat_response(job)
        return StreamingResponse(chat_stream(job, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def chat_stream(job: Job, include_usage: bool):
        try:
            yield views.chat_chunk(job, {"role": "assistant", "content": ""})
            async for event in job.events.follow():
                if event["type"] == "text":
                    yield views.chat_chunk(job, {"content": event["delta"]})
            if job.status == "completed":
                yield views.chat_chunk(job, {}, job.finish_reason or "stop")
                if include_usage:
                    yield views.chat_chunk(job, {}, usage=job.usage)
            else:
                yield views.sse(failure(job).body())
            yield views.sse("[DONE]")
        finally:
            if not job.done.is_set():  # the client went away: stop generating for nobody
                engine().cancel(job.id)

    async def queue_job(request: Request, parse_fn) -> Dict[str, Any]:
        """Parse a job body with `parse_fn` (off the event loop: it decodes media), queue it, answer its job object."""
        fields, files = await body(request, form=True)
        preview = fields.boolean("preview")  # `preview` events on /v1/jobs/{id}/events (docs/steering.md)
        fields.values.pop("preview", None)
        job = await submit(await parse(parse_fn, fields, files, config), preview)
        return job_object(job.record(), engine().position(job))

    @app.post("/v1/videos")
    async def create_video(request: Request):
        return await queue_job(request, schemas.video_job)

    @app.post("/v1/jobs")
    async def create_job(request: Request):
        return await queue_job(request, schemas.job)

    @app.get("/v1/videos")
    async def list_videos(limit: int = 20, after: Optional[str] = None):
        return listing(("video",), limit, after)

    @app.get("/v1/jobs")
    async def list_jobs(limit: int = 20, after: Optional[str] = None):
        return listing(None, limit, after)

    @app.get("/v1/videos/{job_id}")
    async def get_video(job_id: str):
        return job_object(*video_record(job_id))

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str):
        return job_object(*record(job_id))

    def video_record(job_id: str):
        rec, position = record(job_id)
        if rec["object"] != "video":
            raise ApiError(404, f"no video {job_id!r}", param="id", code="not_found")
        return rec, position

    @app.get("/v1/videos/{job_id}/content")
    async def video_content(job_id: str, variant: str = "video"):
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not available; use video", param="variant")
        return content(video_record(job_id)[0], 0)

    @app.get("/v1/jobs/{job_id}/content")
    async def job_content(job_id: str, index: int = 0):
        return content(record(job_id)[0], index)

    def content(rec: Dict[str, Any], index: int):
        path = views.output_file(config, rec, index)
        if path is None:
            state_ = "is " + rec["status"] if rec["status"] != "completed" else "has no such output"
            raise ApiError(404, f"job {rec['id']} {state_}", param="index", code="not_found")
        return FileResponse(path, media_type=views.CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
                            filename=path.name)

    @app.delete("/v1/videos/{job_id}")
    async def delete_video(job_id: str):
        rec, _ = video_record(job_id)
        job = engine().cancel(job_id)
        if job is not None:
            await finished(job)
            rec = job.record()
        for name in rec.get("outputs") or []:
            (config.outputs / Path(name).name).unlink(missing_ok=True)
        history().delete(job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        rec, _ = record(job_id)
        job = engine().cancel(job_id)
        if job is None:
            raise ApiError(409, f"job {job_id} is already {rec['status']}", param="id", code="not_cancellable")
        out = job_object(job.record())
        out["cancel_requested"] = True
        return out

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str):
        job = engine().active(job_id)
        if job is None:
            rec, _ = record(job_id)

            async def replay():
                yield views.sse({"type": "done", "status": rec["status"], "job": job_object(rec)}, "done")
            return StreamingResponse(replay(), media_type="text/event-stream")

        async def follow():
            async for event in job.events.follow(heartbeat=HEARTBEAT_S):
                if event is None:  # an SSE comment: clients ignore it, idle-timeouts see traffic
                    yield ": keep-alive\n\n"
                    continue
                if event["type"] == "done":
                    event = {**event, "job": job_object(job.record())}
                yield views.sse(event, event["type"])
        return StreamingResponse(follow(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.state.server = state
    return app


def _carries_media(fields: Fields, files: Dict[str, Upload]) -> bool:
    """Whether a body has input media to decode: an upload, a media field, or a chat part other than text."""
    if files or any(name in fields.values for name in MEDIA_FIELDS):
        return True
    messages = fields.values.get("messages")
    return isinstance(messages, list) and any(
        isinstance(part, dict) and part.get("type") != "text" for m in messages if isinstance(m, dict)
        for part in (m.get("content") if isinstance(m.get("content"), list) else ()))


def _model_name(kind: str) -> str:
    return VIDEO_LLM_DIR if kind == "video" else IMAGE_LLM_DIR


def enhancer_info(config: ServerConfig) -> Dict[str, Any]:
    """What rewrites the prompts of requests with enhance_prompt, for GET /v1/models: the checkpoint, or the endpoint
    and model (enhance.Enhancer.describe: never the key, nor credentials in the URL)."""
    from ..enhance import Enhancer

    try:
        return (config.enhancer or Enhancer.from_env()).describe()
    except InvalidRequestError as e:  # LANCE_REWRITE_* set wrong for a server made without serve.py's start-up check
        return {"by": "endpoint", "error": redact(str(e))}

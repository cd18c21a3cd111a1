"""Response bodies: job objects in the shape of OpenAI's video object, image results, chat completions, SSE frames."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .jobs import Job
from .settings import ServerConfig

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp", ".mp4": "video/mp4"}
Signing = Callable[[str, int], str]  # (job id, output index) -> the query string of a signed link


def job_object(record: Dict[str, Any], position: int = 0, sign: Optional[Signing] = None) -> Dict[str, Any]:
    """A job as the API shows it: OpenAI's video fields (id, object, model, status, progress, created_at,
    completed_at, size, seconds, error) plus Lance's task, settings and output URLs (signed with `sign`: a keyed
    server's links work without the key until they expire)."""
    settings = record.get("settings") or {}
    out = {"id": record["id"], "object": record["object"], "model": record.get("model"), "status": record["status"],
           "progress": record.get("progress") or 0, "created_at": record["created_at"],
           "completed_at": record.get("completed_at"), "task": record["task"], "prompt": record.get("prompt"),
           "settings": settings, "error": record.get("error"),
           "outputs": [content_path(record["id"], i, sign) for i in range(len(record.get("outputs") or []))]}
    if record["object"] == "video":  # OpenAI's video object (and vLLM-Omni's): seconds a whole number, as a string
        out.update(size=settings.get("size") or "auto", seconds=video_seconds(settings), expires_at=None,
                   remixed_from_video_id=None)
    if settings.get("revised_prompt"):  # OpenAI's name for the prompt a model rewrote (docs/steering.md)
        out["revised_prompt"] = settings["revised_prompt"]
    if record["object"] == "chat.completion":
        out["answer"] = record.get("answer")
    if position:
        out["queue_position"] = position
    return out


def video_seconds(settings: Dict[str, Any]) -> str:
    """The clip's length in whole seconds (at least 1), from its frame count and fps."""
    frames, fps = settings.get("num_frames"), settings.get("fps") or 0
    if not frames or fps <= 0:
        return str(settings.get("seconds") or "1").split(".")[0] or "1"
    return str(max(1, round(frames / fps)))


def content_path(job_id: str, index: int, sign: Optional[Signing] = None) -> str:
    return f"/v1/jobs/{job_id}/content?" + (sign(job_id, index) if sign else f"index={index}")


def images_response(job: Job, config: ServerConfig, response_format: str, base_url: str,
                    sign: Optional[Signing] = None) -> Dict[str, Any]:
    """OpenAI's images response: {created, data: [{b64_json | url, revised_prompt}]}; URLs are absolute, as
    OpenAI's, on the address the request came to, and signed on a keyed server."""
    data = []
    for i, name in enumerate(job.outputs):
        item: Dict[str, Any] = {"revised_prompt": job.settings.get("revised_prompt") or job.request.text}
        if response_format == "url":
            item["url"] = base_url.rstrip("/") + content_path(job.id, i, sign)
        else:
            item["b64_json"] = base64.b64encode((config.outputs / name).read_bytes()).decode("ascii")
        data.append(item)
    out = {"created": job.created_at, "data": data, "output_format": job.settings.get("output_format", "png")}
    if job.settings.get("size"):
        out["size"] = job.settings["size"]
    return out


def chat_response(job: Job) -> Dict[str, Any]:
    return {"id": job.id, "object": "chat.completion", "created": job.created_at, "model": job.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": job.answer},
                         "finish_reason": job.finish_reason or "stop"}],
            "usage": job.usage}


def chat_chunk(job: Job, delta: Dict[str, Any], finish_reason: Optional[str] = None,
               usage: Optional[Dict[str, int]] = None) -> str:
    """One `chat.completion.chunk` as an SSE data line."""
    body: Dict[str, Any] = {"id": job.id, "object": "chat.completion.chunk", "created": job.created_at,
                            "model": job.model,
                            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if usage:
        body["usage"] = usage
    return sse(body)


def sse(data: Any, event: Optional[str] = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def output_file(config: ServerConfig, record: Dict[str, Any], index: int) -> Optional[Path]:
    """The output file `index` of a job, only if it is one of the job's own outputs and still exists."""
    outputs = record.get("outputs") or []
    if not 0 <= index < len(outputs):
        return None
    path = config.outputs / Path(outputs[index]).name
    return path if path.is_file() else None

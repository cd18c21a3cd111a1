"""A job on its way through the server: its request and state, and the log of events its readers follow."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from ..tasks import Request


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
    texts: Tuple[str, ...] = ()  # every text the token limit counts (default: the request's text)
    stop: Tuple[str, ...] = ()  # chat: the answer ends before the first of these
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
    preview: bool = False  # send `preview` events (the picture forming) while denoising
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

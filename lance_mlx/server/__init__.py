"""The local OpenAI-compatible HTTP server: FastAPI routes, one model worker with a bounded queue, SQLite history."""

from .app import create_app
from .settings import ServerConfig

__all__ = ["ServerConfig", "create_app"]

"""ASGI entry point for uvicorn (``service.http.asgi:app``): settings and Redis URLs from the environment."""

from __future__ import annotations

from service.config import Settings
from service.http.app import create_app
from service.logs import setup

_settings = Settings.from_env()
setup(_settings.log_level)
if not _settings.redis_url:
    raise SystemExit("REDIS_URL is not set: run `persona-sync dev` (embedded Redis) or set REDIS_URL")
app = create_app(_settings, _settings.redis_url, _settings.queue_redis_url or _settings.redis_url)

"""ASGI entry point for uvicorn (``service.http.asgi:app``): settings from the environment; Redis is REDIS_URL, else
the embedded server of a ``persona-sync dev`` under DATA_DIR."""

from __future__ import annotations

from service.config import Settings, queue_url, state_url
from service.http.app import create_app
from service.logs import setup

_settings = Settings.from_env()
setup(_settings.log_level)
app = create_app(_settings, state_url(_settings), queue_url(_settings))

"""Starlette: the app, the receiver (intake, auth, limits), the Profile API, admin and read APIs, metrics, the
bounded HTTP protocol the web runs, and the OpenAPI document of it all (``openapi/``)."""

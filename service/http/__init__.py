"""Starlette: the app, the receiver (intake, auth, limits), the Profile API, admin and read APIs, metrics and
the bounded HTTP protocol the web runs."""

"""The API described (``GET /openapi.json``, OpenAPI 3.0.3) and rendered for a person (``GET /docs``).

One module per group of routes (``intake``, ``profiles``, ``operator``) plus the shared ``components``;
``document`` assembles them and ``docs`` serves the result. ``tests/http/test_openapi.py`` fails when a route of the
app is missing here, when a documented path answers from no route, and when a real response does not match.
"""

"""Mavera: the HTTP client, the rate limiter shared by every worker, persona and narrative sync."""

"""Markdown from Mave (the channel narrative) → HTML that is safe to put in a page (pure).

The text comes from a third party and is shown to operators, so it is treated as untrusted: markdown-it-py
(https://markdown-it-py.readthedocs.io/, CommonMark) renders it with raw HTML turned off, which escapes every
``<`` of the source; images are off (a page must not load anything from elsewhere, and its Content-Security-Policy
would refuse them anyway); links keep only ``http``, ``https`` and ``mailto`` targets, so a ``javascript:`` or
``data:`` link is left as plain text.
"""

from __future__ import annotations

from markdown_it import MarkdownIt

SAFE_SCHEMES = ("http://", "https://", "mailto:")


class _Safe(MarkdownIt):
    def validateLink(self, url: str) -> bool:  # noqa: N802 (markdown-it-py's name)
        return url.strip().lower().startswith(SAFE_SCHEMES)


_RENDERER = _Safe("commonmark", {"html": False, "linkify": False, "typographer": False}).disable("image")


def to_html(text: str) -> str:
    """Sanitised HTML of ``text``; the caller may mark it safe (raw HTML in the source comes out escaped)."""
    return str(_RENDERER.render(text))

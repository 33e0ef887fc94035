"""HTTP and the profile state: everything an event touches on its way in, and the read APIs.

Rooms: ``spec`` (pure Segment and KPI rules), ``state`` (Redis), ``http`` (Starlette), ``devstack`` (``persona-sync
dev``); ``cli``, ``config`` and ``logs`` at the top. Imports flow ``http`` → ``state`` → ``spec``; nothing here
imports ``workers``.
"""

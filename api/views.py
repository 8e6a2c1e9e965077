"""How stored requests look to API users: sessions/status.py, shared with the callbacks' bodies
(webhooks/delivery.py), which may not import the API."""

from __future__ import annotations

from sluicegate.sessions.status import request_view

__all__ = ["request_view"]

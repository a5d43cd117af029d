"""Errors of the admin side that the process entry points handle.

Kept apart from admin/server.py so that catching them does not import uvicorn
and FastAPI: data-plane workers never serve the admin API and never load them.
"""

from __future__ import annotations


class ServerStartError(RuntimeError):
    """The embedded server could not start listening or its app failed to start."""
